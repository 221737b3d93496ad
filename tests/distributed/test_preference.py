"""Reward model and DPO on 2 CPU ranks under ZeRO-3 with the tiny model (docs/preference.md).

- reward: completes, exports the HF dir + ``score_head.safetensors``, reports held-out pair accuracy.
- dpo: the cached-reference run (the default) and the live-reference run give bitwise equal losses
  (same starting weights, same batches, same reduction order), and step 1 is exactly log 2 (the
  policy is the reference).
- dpo under faults: SIGKILL while the reference cache fills, then SIGKILL mid-training, then a clean
  relaunch: the losses of every step after the resume point equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open

from tests.helpers import launch, losses, metrics

pytestmark = pytest.mark.distributed

STEPS = 6


def _overrides(demo_dir, out, start, *extra):
    return [f"output_dir={out}", f"data.demo_dir={demo_dir}", f"model.init_from={start}", "train.micro_batch_size=2",
            "train.grad_accum_steps=2", f"train.max_steps={STEPS}", "train.log_every_steps=1", "checkpoint.every_steps=3",
            "optim.lr=1e-2", "optim.warmup_steps=1", "policy.projector.lr=1e-2", *extra]


def _dpo(demo_dir, out, start, *extra):
    return _overrides(demo_dir, out, start, "eval.at_start=false", "eval.at_end=false", "dpo.cache_flush_steps=2", *extra)


def test_reward_model_trains_exports_and_reports_heldout_accuracy(tmp_path, demo_dir, start_model):
    out = tmp_path / "reward"
    launch("reward", *_overrides(demo_dir, out, start_model))
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["margin"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] + 0.05  # BT loss starts at ~log 2 and does not blow up
    hf = out / "hf"
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
    with safe_open(str(hf / "score_head.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"weight", "bias"}
        hidden = json.loads((hf / "config.json").read_text())["text_config"]["hidden_size"]
        assert tuple(f.get_tensor("weight").shape) == (1, hidden) and tuple(f.get_tensor("bias").shape) == (1,)
        assert f.get_tensor("bias").item() == 0  # Bradley-Terry is blind to a shift: the bias keeps its init
        assert f.get_tensor("weight").abs().sum().item() > 0
    with safe_open(str(hf / "model.safetensors"), framework="pt") as f, \
            safe_open(str(start_model / "model.safetensors"), framework="pt") as s:
        assert set(f.keys()) == set(s.keys())  # the stock InternVL layout, no "vlm." / "score." keys
        key = "language_model.model.layers.0.mlp.up_proj.weight"
        assert not f.get_tensor(key).equal(s.get_tensor(key))  # the LLM trained along with the head
    result = json.loads((out / "eval.json").read_text())
    assert result["eval/pairs/pairs"] == 6 and 0.0 <= result["eval/pairs/accuracy"] <= 1.0


@pytest.fixture(scope="module")
def dpo_reference(tmp_path_factory, demo_dir, start_model):
    out = tmp_path_factory.mktemp("dpo") / "cached"
    launch("dpo", *_dpo(demo_dir, out, start_model))
    return out


def test_dpo_cached_and_live_references_give_the_same_losses(tmp_path, dpo_reference, demo_dir, start_model):
    cached = losses(dpo_reference)
    assert sorted(cached) == list(range(1, STEPS + 1))
    assert cached[1] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    row = [r for r in metrics(dpo_reference) if r.get("step") == STEPS and "loss" in r][0]
    assert {"accuracy", "margin", "chosen_reward", "rejected_reward"} <= set(row)
    assert row["margin"] == pytest.approx(row["chosen_reward"] - row["rejected_reward"], abs=1e-5)
    assert len(list((dpo_reference / "ref_cache").glob("rank-*-of-00002.pt"))) == 2
    live = tmp_path / "live"
    launch("dpo", *_dpo(demo_dir, live, start_model, "dpo.reference=live"))
    assert losses(live) == cached
    assert not (live / "ref_cache").exists()


def test_dpo_killed_while_caching_and_while_training_resumes_to_the_same_losses(tmp_path, dpo_reference, demo_dir,
                                                                                 start_model):
    out = tmp_path / "crashed"
    args = _dpo(demo_dir, out, start_model)
    first = launch("dpo", *args, check=False, env={"VLMSCALE_FAULT": "kill@refcache=3,rank=0"})
    assert first.returncode != 0
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step-*/COMMITTED"))
    second = launch("dpo", *args, check=False, env={"VLMSCALE_FAULT": "kill@step=5,rank=1"})
    assert second.returncode != 0
    assert "computing reference log-probs for steps 3-6" in second.stderr  # resumed from the step-2 commit
    third = launch("dpo", *args, "resume=latest")
    assert "resumed from step-00000003 at step 3" in third.stderr
    assert "reference log-probs: " in third.stderr and "computing reference" not in third.stderr
    ref, got = losses(dpo_reference), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(4, STEPS + 1)] == [ref[s] for s in range(4, STEPS + 1)]
