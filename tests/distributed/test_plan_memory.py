"""``vlmscale plan`` against a real 2-rank ZeRO-3 CPU run of the tiny and demo presets (three policies).

The measured figure is each rank's peak tensor memory from just before the model is built to the end
of training (``vlmscale.plan.measure``: the CPU counterpart of ``torch.cuda.max_memory_allocated``).
The plan is evaluated at the micro-batch shapes the run actually saw (supervised tokens included), with
``model.attn_implementation=auto`` resolved as the run resolves it on a CPU: eager. Beyond the total, the ZeRO-3
state the rank holds is compared buffer by buffer, and the forward/backward and optimizer-step phases
separately, so a total that happened to agree by compensating errors would still fail.

The run uses 2e5-element buckets: with ds_configs/zero3.json's 5e7 the reduce bucket alone is 100 MB,
a constant that would dominate both figures for models this small (the plan counts it either way).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers import REPO, deepspeed_cmd, port
from vlmscale.config import SFTConfig, load_config
from vlmscale.plan.build import facts_for
from vlmscale.plan.memory import Shape, ZeroSettings, plan

DS = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                          "reduce_bucket_size": 2e5, "stage3_prefetch_bucket_size": 2e5,
                          "stage3_param_persistence_threshold": 1e4, "stage3_max_live_parameters": 1e9,
                          "stage3_max_reuse_distance": 1e9},
}
FLOOR = 0.5e6  # bytes: the phase comparison's absolute allowance (see below)
CENSUS = {  # plan term -> the measured buffer
    "bf16 parameter partitions": "param_partitions",
    "persistent small parameters (whole)": "persistent_params",
    "gathered parameters (working set)": "gathered_params_peak",
    "bf16 gradient partitions": "grad_partitions",
    "reduce bucket": "reduce_bucket",
    "fp32 master weights": "fp32_master",
    "Adam moments (fp32 m, v)": "adam_moments",
}


def _measure(tmp_path, demo_dir, overrides: list[str]) -> list[dict]:
    ds = tmp_path / "zero3_small_buckets.json"
    ds.write_text(json.dumps(DS))
    out = tmp_path / "measured"
    cmd = deepspeed_cmd(2, port(29600, 300), str(REPO / "tests" / "distributed" / "plan_measure_script.py"), "--out", str(out),
           f"data.demo_dir={demo_dir}", f"deepspeed.config={ds}", f"output_dir={tmp_path / 'run'}", *overrides)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("preset, extra, states_matter", [
    ("tiny", [], False),  # the SFT policy: encoder frozen
    ("demo", ["policy.vision.trainable=true"], True),  # everything trained
    # the align policy: only the projector (0.2M parameters) trains, through the frozen LLM. Its optimizer
    # step is a few MB, smaller than the untraced offset, so that phase is not compared
    ("demo", ["policy.llm.trainable=false"], False),
])
def test_plan_agrees_with_the_measured_peak(preset, extra, states_matter, tmp_path, demo_dir):
    # the plan models 16-bit training: pinned, so a CPU without native bf16 (auto: fp32) measures the same run
    overrides = [f"model.preset={preset}", "train.max_steps=3", "train.micro_batch_size=8", "train.precision=bf16", *extra]
    ranks = _measure(tmp_path, demo_dir, overrides)
    facts = facts_for(load_config(SFTConfig, overrides=overrides), device="cpu")  # attention "auto": eager on CPU
    assert facts.attn_implementation == "eager"
    zero = ZeroSettings.from_ds_config(DS)
    for rank, m in enumerate(ranks):
        plans = [plan(facts, zero, world=2, shape=Shape(s["rows"], s["length"], s["tiles"], s["supervised"]),
                      device="cpu")
                 for s in m["shapes"]]
        predicted, measured = max(b.peak() for b in plans), m["peak_bytes"]
        terms = {t.name: t.nbytes for t in plans[0].terms}
        kinds = max(plans, key=lambda b: b.peak()).by_kind()
        print(f"\n{preset} rank {rank}: plan {predicted / 1e6:.2f} MB, measured {measured / 1e6:.2f} MB "
              f"({predicted / measured - 1:+.1%}); plan by kind (MB) "
              + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in kinds.items())
              + f"; RSS grew {m['rss_growth_bytes'] / 1e6:.0f} MB")
        assert abs(predicted - measured) / measured <= 0.25  # the acceptance criterion

        # the standing ZeRO-3 state, buffer by buffer
        for name, key in CENSUS.items():
            assert terms[name] == pytest.approx(m["census"][key], rel=0.01, abs=64), name

        # each phase's peak in the steps after the first (ZeRO-3 records its fetch order in the first step and
        # releases every parameter after use, so fewer stay gathered then). The forward/backward peak, which
        # sets the total, is held to 15%, tighter than the total: the plan's terms explain it to within 3%
        # plus a run-to-run offset of up to ~10 MB on the demo that appears while the engine is built and
        # that we have not traced (docs/plan.md); the step's, where that offset weighs more, to 25%.
        for k in (2, 3):
            b = plans[k - 1]
            standing = sum(t.nbytes for t in b.terms if t.phase == "standing")
            # the align policy's forward/backward phase is ~70 MB, so the untraced offset (up to ~10 MB between
            # identical runs, docs/plan.md) alone can reach 15% of it: that phase gets the acceptance bound, 25%
            phases = [("fwd_bwd", m["phase_peaks"][f"backward.{k}"], 0.15 if preset == "tiny" or states_matter else 0.25)]
            if preset == "tiny" or states_matter:
                phases.append(("step", m["phase_peaks"][f"step.{k}"], 0.25))
            for phase, seen, bound in phases:
                level = standing + sum(t.nbytes for t in b.terms if t.phase == phase)
                # tiny's step phase is ~1.3 MB, so a relative bound there is a few hundred KB: one CI run measured
                # 0.33 MB below the plan at step 3 (less of the model still gathered), so also allow FLOOR bytes
                assert abs(level - seen) <= max(bound * seen, FLOOR), (k, phase, level, seen)

        # neither side is a constant in disguise: dropping activations would miss by far more than 25%,
        # and where everything trains so would dropping the model states
        assert kinds["activations"] > 0.25 * measured
        if states_matter:
            assert kinds["params"] + kinds["grads"] + kinds["optimizer"] > 0.25 * measured
