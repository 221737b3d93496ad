"""GRPO on CPU ranks under ZeRO-3 with the tiny model: it completes with its built-in demo prompts and
rewards and logs every figure; 1 rank samples what 2 ranks sample, and without KL builds no reference
and exports; kill -9 + resume continues exactly like the uninterrupted run."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import REPO, launch, metrics

pytestmark = pytest.mark.distributed

STEPS = 4
LOGGED = ("reward", "reward_std", "zero_variance_fraction", "entropy", "response_length", "clip_fraction", "approx_kl",
          "policy_loss", "rollout_tokens_per_s", "update_tokens_per_s", "reward/exact_match/mean",
          "reward/iou/applied", "reward/tests.distributed.grpo_rewards:short/std", "grad_norm", "lr")


def _overrides(demo_dir, out, start, *extra):
    return [f"output_dir={out}", f"data.demo_dir={demo_dir}", f"model.init_from={start}", f"train.max_steps={STEPS}",
            "train.micro_batch_size=4", "grpo.prompts_per_rank=2", "grpo.group_size=4", "grpo.max_new_tokens=6",
            "grpo.inner_epochs=2", "optim.lr=1e-3", "checkpoint.every_steps=2", "checkpoint.keep_last=0",
            "checkpoint.export=false", "eval.at_end=false",
            'grpo.rewards={exact_match: 1.0, iou: 1.0, "tests.distributed.grpo_rewards:short": 0.1}', *extra]


ENV = {"PYTHONPATH": str(REPO)}  # the user reward module


def _rollouts(out, step: int) -> dict[int, dict]:
    """Global prompt position -> its logged group at ``step``, over every rank's file."""
    groups = {}
    for path in sorted((out / "rollouts").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["step"] == step:
                groups.update({g["position"]: g for g in row["groups"]})
    return groups


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_dir, start_model):
    out = tmp_path_factory.mktemp("grpo") / "reference"
    proc = launch("grpo", *_overrides(demo_dir, out, start_model, "grpo.kl_coef=0.05", "grpo.clip_high=0.28"), env=ENV)
    return out, proc


def test_grpo_completes_and_logs_every_figure(reference):
    out, proc = reference
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for key in LOGGED:
            assert math.isfinite(r[key]), (key, r)
        assert r["rollouts"] == 16  # 2 prompts x 4 completions x 2 ranks
        assert 0.0 <= r["zero_variance_fraction"] <= 1.0
        assert 1 <= r["response_length"] <= 6
    # a reference is built only for kl_coef > 0, and the policy drifts from it after the first update
    assert "reference parameters on this rank after build" in proc.stderr
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and any(r["kl"] > 0 for r in rows[1:])
    assert any(r["zero_variance_fraction"] < 1 for r in rows) and any(r["updates"] > 0 for r in rows)
    assert any(r["approx_kl"] != 0 for r in rows)  # the second inner epoch sees a moved policy
    groups = _rollouts(out, 1)
    assert sorted(groups) == [0, 1, 2, 3] and all(len(g["completions"]) == 4 for g in groups.values())


def test_one_rank_samples_what_two_ranks_sample(tmp_path, demo_dir, start_model):
    two, one = tmp_path / "two", tmp_path / "one"
    launch("grpo", *_overrides(demo_dir, two, start_model, "train.max_steps=1"), env=ENV)
    proc = launch("grpo", *_overrides(demo_dir, one, start_model, "train.max_steps=1", "grpo.prompts_per_rank=4",
                                      "checkpoint.export=true"), nproc=1, env=ENV)
    # grpo.kl_coef defaults to 0: no reference is built, KL is not logged; the policy is exported
    assert "reference parameters on this rank after build" not in proc.stderr
    assert math.isnan(metrics(one)[0]["kl"]) and (one / "hf" / "config.json").is_file()
    a, b = _rollouts(two, 1), _rollouts(one, 1)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    assert {p: (g["completions"], g["rewards"]) for p, g in a.items()} == \
           {p: (g["completions"], g["rewards"]) for p, g in b.items()}
    assert len({c for g in a.values() for c in g["completions"]}) > 1  # sampled, not greedy


def test_kill_then_resume_continues_exactly(tmp_path, demo_dir, start_model, reference):
    ref_out, _ = reference
    out = tmp_path / "crashed"
    args = _overrides(demo_dir, out, start_model, "grpo.kl_coef=0.05", "grpo.clip_high=0.28")
    first = launch("grpo", *args, check=False, env={**ENV, "VLMSCALE_FAULT": "kill@step=4,rank=1"})
    assert first.returncode != 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")) == ["step-00000002"]
    second = launch("grpo", *args, "resume=latest", env=ENV)
    assert "resumed from step-00000002 at step 2" in second.stderr
    ref, got = metrics(ref_out), metrics(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    timing = ("step_seconds", "rollout_tokens_per_s", "update_tokens_per_s")
    keys = [k for k in ref[0] if k not in timing]
    for a, b in zip(ref, got):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["step"]
    assert _rollouts(out, 4) == _rollouts(ref_out, 4)
