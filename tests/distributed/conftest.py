"""One short 2-rank ZeRO-3 SFT run of the tiny model, shared by the distributed tests."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import launch


@pytest.fixture(scope="session")
def start_model(tmp_path_factory):
    """A tiny preset model saved as an HF export, so tests know every starting weight."""
    from vlmscale.config import SFTConfig, load_config
    from vlmscale.model.build import build_model, load_weights_plain

    torch.manual_seed(0)
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny"])
    model, assets = build_model(cfg.model, max_tiles=4, dtype=torch.bfloat16, load_weights=load_weights_plain)
    out = tmp_path_factory.mktemp("start") / "hf"
    model.save_pretrained(out)
    assets.save(out)
    return out


def sft_overrides(demo_dir, out, start):
    return [f"output_dir={out}", f"data.demo_dir={demo_dir}", f"model.init_from={start}", "train.micro_batch_size=4",
            "train.grad_accum_steps=2", "train.log_every_steps=1", "checkpoint.every_steps=4", "optim.lr=1e-2",
            "optim.warmup_steps=1", "policy.vision.trainable=true", "policy.vision.layers=1-1",
            "policy.projector.lr=1e-2", "eval.max_samples=10", "eval.final_max_samples=12", "eval.max_new_tokens=8"]


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, demo_dir, start_model):
    """8 steps, checkpoints at 4 and 8, evaluation (all suites) at step 4 and at the end."""
    out = tmp_path_factory.mktemp("sft") / "run"
    proc = launch("sft", *sft_overrides(demo_dir, out, start_model), "train.max_steps=8", "eval.every_steps=4",
                  runner=True)  # through the real `deepspeed` command, as the README runs it
    return out, proc
