"""In-process DeepSpeed engines of world size 1 (ZeRO-3 on CPU) for unit tests of the training step."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def process_group():
    """A one-process gloo group for the whole session, left in order at the end.

    The rendezvous variables ``init_distributed`` sets for it are removed again, so commands that
    tests launch as subprocesses start their own group instead of joining this one (DeepSpeed's
    engine still reads LOCAL_RANK).
    """
    from vlmscale.distributed.group import init_distributed, shutdown

    saved = dict(os.environ)
    info = init_distributed()
    for key in set(os.environ) - set(saved) - {"LOCAL_RANK"}:
        del os.environ[key]
    yield info
    shutdown()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """The tiny preset saved as an HF export (bf16), like tests/distributed's ``start_model``."""
    from vlmscale.config import SFTConfig, load_config
    from vlmscale.model.build import build_model, load_weights_plain

    torch.manual_seed(0)
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny"])
    model, assets = build_model(cfg.model, max_tiles=2, dtype=torch.bfloat16, load_weights=load_weights_plain)
    out = tmp_path_factory.mktemp("tiny") / "hf"
    model.save_pretrained(out)
    assets.save(out)
    return out
