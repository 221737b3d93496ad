"""`vlmscale eval` on 1 and 2 ranks gives identical metrics (work is dealt in fixed batches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, deepspeed_cmd, port

pytestmark = pytest.mark.distributed


def _eval(nproc, out_file, model, reference, data):
    args = ["vqa,grounding,pope,text,drift", "--model", str(model), "--reference", str(reference), "--data", str(data),
            "--max-samples", "12", "--max-new-tokens", "8", "--out", str(out_file)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "vlmscale.cli", "eval", *args]
    else:
        cmd = deepspeed_cmd(nproc, port(29900, 50), "--no_local_rank", "--module", "vlmscale.cli", "eval", *args)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out_file.read_text())
    result.pop("model")
    return result


def test_one_and_two_ranks_agree(sft_run, start_model, demo_dir, tmp_path):
    out, _ = sft_run
    one = _eval(1, tmp_path / "one.json", out / "hf", start_model, demo_dir / "heldout")
    two = _eval(2, tmp_path / "two.json", out / "hf", start_model, demo_dir / "heldout")
    assert one == two
    assert one["text"]["tokens"] > 0 and 0.0 < one["drift"]["cosine"] < 1.0
    proc = subprocess.run([sys.executable, "-m", "vlmscale.cli", "eval", "compare", str(tmp_path / "one.json"),
                           str(tmp_path / "two.json")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "text/loss" in proc.stdout


@pytest.mark.parametrize("gather_max_bytes", [0, 1 << 30], ids=["per-layer", "gathered"])
def test_ranks_finishing_at_different_steps_do_not_hang(demo_dir, tmp_path, gather_max_bytes):
    out = tmp_path / "lengths.json"
    cmd = deepspeed_cmd(2, port(29950, 40), "--no_local_rank", str(REPO / "tests" / "distributed" / "zero3_generate_script.py"),
                        str(demo_dir), str(out), str(gather_max_bytes))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0 = json.loads((tmp_path / "lengths.json.rank0").read_text())
    rank1 = json.loads((tmp_path / "lengths.json.rank1").read_text())
    r0, r1 = rank0["lengths"], rank1["lengths"]
    assert r0 and r1
    assert rank0["gathered"] == rank1["gathered"] == (gather_max_bytes > 0)
    assert len(rank0["sampled"]) == 3 and len(rank1["sampled"]) == 1  # unequal local prompt counts completed
    if not gather_max_bytes:  # lock step: the finished rank ran as many forwards as the other
        assert rank0["forwards"] == rank1["forwards"]
    # rank 0 stopped at its first token (its end-of-sequence, returned with the ids); rank 1 kept decoding
    # (up to 12) while rank 0 stepped along idle
    assert max(r0.values()) == 1 < max(r1.values()), (r0, r1)
