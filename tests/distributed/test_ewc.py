"""EWC under ZeRO-3 through the real launcher: the Fisher command on 1 and 2 ranks, partition-local
F and theta*, and SFT with the penalty on 2 ranks giving the same parameters as on 1 rank."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, deepspeed_cmd, launch, metrics, port

pytestmark = pytest.mark.distributed
FISHER_SAMPLES = 7  # not a multiple of the world size: the last round has an idle rank


def _run(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m vlmscale.cli ...`` for one rank, ``deepspeed --num_gpus N --no_local_rank --module`` otherwise."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "vlmscale.cli", *args]
    else:
        cmd = deepspeed_cmd(nproc, port(29850, 40), "--no_local_rank", "--module", "vlmscale.cli", *args)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _fisher(nproc: int, out, start_model, demo_dir) -> subprocess.CompletedProcess:
    return _run(nproc, "ewc", "fisher", "--model", str(start_model), "--data", str(demo_dir / "train" / "vqa"),
                "--out", str(out), "--samples", str(FISHER_SAMPLES), "--params", "both", "--dtype", "float32")


def _tensors(d) -> dict[str, torch.Tensor]:
    meta = json.loads((d / "ewc.json").read_text())
    out = {}
    for f in meta["files"]:
        out.update(load_file(str(d / f)))
    return out


@pytest.fixture(scope="session")
def fisher_two_ranks(tmp_path_factory, start_model, demo_dir):
    out = tmp_path_factory.mktemp("ewc") / "fisher2"
    _fisher(2, out, start_model, demo_dir)
    return out


def test_fisher_on_two_ranks_equals_one_rank(fisher_two_ranks, start_model, demo_dir, tmp_path):
    one = tmp_path / "fisher1"
    proc = _fisher(1, one, start_model, demo_dir)
    assert '"samples": 7' in proc.stdout
    meta1, meta2 = (json.loads((d / "ewc.json").read_text()) for d in (one, fisher_two_ranks))
    assert meta2["world_size"] == 2 and meta1["world_size"] == 1
    assert meta1["samples"] == meta2["samples"] == FISHER_SAMPLES and meta2["skipped"] == {}
    a, b = _tensors(one), _tensors(fisher_two_ranks)
    assert a.keys() == b.keys() and len(a) == 2 * 60  # F and theta* of the 60 LLM + vision tensors
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7 * float(a[key].abs().max())), key
    # theta* is the start model's weights; F is not trivial
    weights = load_file(str(start_model / "model.safetensors"))
    assert torch.equal(b["anchor.model.language_model.norm.weight"], weights["language_model.model.norm.weight"].float())
    assert all(float(b[k].sum()) > 0 for k in b if k.startswith("fisher.model.language_model.layers."))


def test_each_rank_holds_its_partition_of_f_and_theta(fisher_two_ranks, start_model, demo_dir, tmp_path):
    out = tmp_path / "script"
    cmd = deepspeed_cmd(2, port(29890, 40), "--no_local_rank", str(REPO / "tests" / "distributed" / "ewc_script.py"),
                        str(start_model), str(fisher_two_ranks), str(demo_dir), str(out))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"script.rank{r}").read_text()) for r in (0, 1)]
    shapes = json.loads((fisher_two_ranks / "ewc.json").read_text())["shapes"]
    numel = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(numel.values())
    per_rank = sum(-(-n // 2) for n in numel.values())  # ZeRO-3: ceil(numel / world) per tensor, padded
    assert total == 67200 and per_rank == 33600  # the tiny model's LLM + vision: no tensor has an odd size
    for r in ranks:
        assert r["total_numel"] == total
        assert r["sizes"] == {n: [-(-k // 2)] * 2 for n, k in numel.items()}
        assert r["local_numel"] == per_rank == total / 2
        assert r["anchor_is_local_master"] and r["padding_is_zero"]
        assert max(r["grad_errors"]) < 1e-6
    # the logged penalty is the sum of the ranks' shares; it is 0 at the anchor and grows once theta moves
    for step in range(3):
        assert ranks[0]["penalties"][step] == ranks[1]["penalties"][step]
        assert ranks[0]["penalties"][step] == pytest.approx(ranks[0]["local_values"][step] + ranks[1]["local_values"][step],
                                                            rel=1e-12)
    assert ranks[0]["penalties"][0] == 0 < ranks[0]["penalties"][1] < ranks[0]["penalties"][2]
    assert all(v > 0 for r in ranks for v in r["local_values"][1:])  # both ranks hold part of it


def _sft(nproc: int, out, demo_dir, start_model, ewc_dir, weight: float):
    # one rank accumulates two micro-batches of 4; two ranks take one each: the same 8 samples per step
    return launch("sft", f"output_dir={out}", f"data.demo_dir={demo_dir}", f"model.init_from={start_model}",
                  "train.micro_batch_size=4", f"train.grad_accum_steps={3 - nproc}", "train.max_steps=6",
                  "train.log_every_steps=1", "train.precision=fp32", "checkpoint.every_steps=100", "optim.lr=1e-2",
                  "optim.warmup_steps=1", "policy.vision.trainable=true", "policy.projector.lr=1e-2", "eval.at_end=false",
                  f"regularizer.ewc.weight={weight}", f"regularizer.ewc.path={ewc_dir}", nproc=nproc)


def test_sft_with_ewc_on_two_ranks_matches_one_rank(fisher_two_ranks, start_model, demo_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _sft(1, one, demo_dir, start_model, fisher_two_ranks, 1.0)
    proc = _sft(2, two, demo_dir, start_model, fisher_two_ranks, 1.0)
    assert "33,600 of 67,200 elements of F and theta* on this rank" in proc.stderr
    rows1, rows2 = metrics(one), metrics(two)
    assert [r["step"] for r in rows2] == list(range(1, 7))
    for r1, r2 in zip(rows1, rows2):
        assert r2["ewc_penalty"] == pytest.approx(r1["ewc_penalty"], rel=1e-9, abs=1e-12), r1["step"]
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-6)
    assert rows1[0]["ewc_penalty"] == 0 < rows1[1]["ewc_penalty"] < rows1[-1]["ewc_penalty"]
    a, b = (load_file(str(d / "hf" / "model.safetensors")) for d in (one, two))
    assert a.keys() == b.keys() and next(iter(a.values())).dtype == torch.float32
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, worst
    start = load_file(str(start_model / "model.safetensors"))
    assert all(not torch.equal(a[k], start[k].float()) for k in a)  # everything trained
