"""A resume builds the model from the checkpoint's own architecture and reads no ``model.init_from`` weights.

In-process ZeRO-3 engines of world size 1 (fp32), the SFT default policy (the vision encoder frozen). The
frozen parameters are changed before the save, so a value restored from ``init_from`` instead of the
checkpoint would show; ``init_from`` is moved away while the resumed model is built and loaded, and a spy
counts every call to the init_from loader and every tensor read from its files.
"""

from __future__ import annotations

import functools
import shutil

import deepspeed
import pytest
import torch

from tests.unit.engines import batches, zero3_engine
from vlmscale.distributed.group import DistInfo
from vlmscale.model.build import save_architecture
from vlmscale.model.shards import LazyTensor, index_weights
from vlmscale.train.checkpoint import ARCH, FROZEN, CheckpointManager

CPU = torch.device("cpu")


def _full(engine) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


@pytest.fixture()
def saved(process_group, tiny_export, demo_dir, tmp_path):
    """A 2-step run from a copy of the tiny export, its frozen vision encoder changed, saved at step 2."""
    from vlmscale.train.step import train_step

    start = tmp_path / "start"
    shutil.copytree(tiny_export, start)
    engine, assets = zero3_engine(start)
    for b in batches(demo_dir / "train" / "vqa", assets, [[0, 1], [2, 3]]):
        train_step(engine, [b], device=CPU)
    frozen = [(n, p) for n, p in engine.module.named_parameters() if not p.requires_grad]
    assert any("vision_tower" in n for n, _ in frozen), "the SFT default policy should freeze the vision encoder"
    for _, p in frozen:  # not what init_from holds any more: only the checkpoint has these values
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            p.add_(0.25)
    manager = CheckpointManager(tmp_path / "run", dist=DistInfo(0, 1, 0), keep_last=0)
    manager.architecture = functools.partial(save_architecture, engine.module, assets)
    manager.save(engine, step=2, client_state={"step": 2})
    return start, manager, _full(engine), {n for n, _ in frozen}, assets


def test_resume_reads_no_init_from_tensor_and_restores_every_one(saved, tmp_path, monkeypatch):
    from vlmscale.config import SFTConfig, load_config
    from vlmscale.config.deepspeed import build_ds_config
    from vlmscale.model.policy import apply_policy
    from vlmscale.train import safe_load, setup
    from vlmscale.train.step import create_engine

    start, manager, expected, frozen, assets = saved
    tag = "step-00000002"
    arch = manager.architecture_dir(tag)
    assert arch == manager.root / tag / ARCH and (arch / "tokenizer.json").is_file()

    calls = {"build_model": 0, "init_from tensors": 0}

    def no_build_model(*args, **kwargs):
        calls["build_model"] += 1
        raise AssertionError("the init_from loader ran on a resume")

    real_load = LazyTensor.load

    def counting_load(self):
        if str(self.file).startswith(str(start)):
            calls["init_from tensors"] += 1
        return real_load(self)

    monkeypatch.setattr(setup, "build_model", no_build_model)
    monkeypatch.setattr(LazyTensor, "load", counting_load)
    moved = tmp_path / "moved"
    start.rename(moved)  # init_from is gone while the resume builds and loads
    cfg = load_config(SFTConfig, overrides=["train.precision=fp32", "optim.lr=1e-2", "optim.warmup_steps=1",
                                            "train.max_steps=10", "optim.max_grad_norm=0.0", f"model.init_from={start}"])
    ds_config = build_ds_config(cfg, world_size=1)
    model, got_assets = setup.build_partitioned(cfg.model, ds_config=ds_config, max_tiles=None, dtype=torch.float32,
                                                architecture=arch)
    groups, _ = apply_policy(model, cfg.policy, base_lr=cfg.optim.lr, weight_decay=0.0)
    engine, _ = create_engine(model, param_groups=groups, ds_config=ds_config, optim=cfg.optim, max_steps=10)
    safe_load.install(engine)
    client = manager.load(engine, tag)
    moved.rename(start)

    assert calls == {"build_model": 0, "init_from tensors": 0}
    assert client["step"] == 2
    got = _full(engine)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    init = {k: v.load() for k, v in index_weights(start).items()}
    on_disk = {n: n.removeprefix("model.") for n in frozen}  # transformers' stored names: vision_tower.*, ...
    assert all(d in init for d in on_disk.values()), sorted(set(on_disk.values()) - set(init))[:3]
    changed = [n for n, d in on_disk.items() if not torch.equal(init[d].float(), got[n])]
    assert changed, "the frozen parameters equal init_from's: the test could not tell where they came from"
    assert got_assets.tokenizer.get_vocab() == assets.tokenizer.get_vocab()
    assert got_assets.image_processor.to_dict() == assets.image_processor.to_dict()
    assert got_assets.image_seq_length == assets.image_seq_length


def test_universal_conversion_keeps_the_frozen_parameters(saved):
    """DeepSpeed's universal conversion drops parameters the optimizer does not own; ours keeps them."""
    _, manager, expected, frozen, _ = saved
    tag = "step-00000002"
    manager.prepare_universal(tag)
    weights = manager.frozen_weights(tag)
    assert set(weights) == frozen
    for name, lazy in weights.items():
        assert torch.equal(lazy.load(), expected[name]), name
    (manager.root / tag / "universal" / FROZEN).unlink()  # a conversion made before: completed on the next use
    manager.prepare_universal(tag)
    assert set(manager.frozen_weights(tag)) == frozen
