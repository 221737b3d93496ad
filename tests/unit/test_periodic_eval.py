"""The drift reference is used by every rank or by none (two gloo processes, no model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import port


def _prepare_on_rank(rank: int, out: str, fresh: bool, master_port: int) -> None:
    import vlmscale.eval.periodic as periodic
    from vlmscale.config.schema import EvalConfig
    from vlmscale.distributed.group import DistInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        periodic.drift_reference = lambda *a, rank, **k: {"features": torch.full((2,), float(rank)), "computed": True}
        ev = periodic.PeriodicEval(EvalConfig(suites=["drift"]), heldout=Path(out), output_dir=Path(out),
                                   dist=DistInfo(rank, 2, rank), assets=None)
        ev.prepare(None, fresh=fresh)
        ref = ev.reference
        Path(out, f"result-{rank}.json").write_text(json.dumps(None if ref is None else bool(ref.get("computed"))))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fresh", [True, False])
def test_a_drift_reference_on_one_rank_only_is_used_by_no_rank(tmp_path, fresh):
    (tmp_path / "eval").mkdir()
    torch.save({"features": torch.zeros(2)}, tmp_path / "eval" / "drift_reference-w2-rank00000.pt")  # rank 0's only
    mp.spawn(_prepare_on_rank, args=(str(tmp_path), fresh, port(33000, 1000)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1)]
    # fresh: both compute a new reference (and store it); resumed: neither runs the drift suite
    assert results == ([True, True] if fresh else [None, None])
    if fresh:
        for r in (0, 1):
            stored = torch.load(tmp_path / "eval" / f"drift_reference-w2-rank{r:05d}.pt", weights_only=True)
            assert stored["features"].tolist() == [float(r)] * 2


def test_no_drift_reference_for_a_run_that_never_evaluates(tmp_path, monkeypatch):
    import vlmscale.eval.periodic as periodic
    from vlmscale.config.schema import EvalConfig
    from vlmscale.distributed.group import DistInfo

    calls = []
    monkeypatch.setattr(periodic, "drift_reference", lambda *a, **k: calls.append(1) or {"features": torch.zeros(1)})
    never = EvalConfig(suites=["drift"], every_steps=0, at_end=False, at_start=False)
    ev = periodic.PeriodicEval(never, heldout=tmp_path, output_dir=tmp_path, dist=DistInfo(0, 1, 0), assets=None)
    ev.prepare(None, fresh=True)  # an encoder pass over every held-out image that nothing would use
    assert calls == [] and ev.reference is None and not (tmp_path / "eval").exists()
    at_end = periodic.PeriodicEval(EvalConfig(suites=["drift"], every_steps=0), heldout=tmp_path, output_dir=tmp_path,
                                   dist=DistInfo(0, 1, 0), assets=None)
    at_end.prepare(None, fresh=True)
    assert calls == [1] and at_end.reference is not None
