"""The streaming sharded export under ZeRO-3 (in-process, world size 1): shards, index, stock loading, LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmscale.config import SFTConfig, load_config
from vlmscale.config.deepspeed import build_ds_config
from vlmscale.config.schema import ModelConfig
from vlmscale.constants import IMG_CONTEXT
from vlmscale.distributed.zero import gathered_state_dict, zero3_model_scope
from vlmscale.model.build import load_pretrained
from vlmscale.model.forward import vlm_logits
from vlmscale.model.lora import add_lora
from vlmscale.model.policy import apply_policy
from vlmscale.model.shards import INDEX_NAME, ShardWriter, index_weights
from vlmscale.config.load import parse_size
from vlmscale.train.step import create_engine, export_hf

SHARD = "40KB"  # the tiny preset in fp32 is ~290 KB: 7+ shards


def _engine(model_dir, *, lora: bool):
    overrides = ["train.precision=fp32", "train.micro_batch_size=1", "optim.warmup_steps=1", "train.max_steps=2"]
    if lora:
        overrides += ["lora.enabled=true", "lora.r=4", "lora.alpha=8"]
    cfg = load_config(SFTConfig, overrides=overrides)
    ds_config = build_ds_config(cfg, world_size=1)
    with zero3_model_scope(ds_config):
        model, assets = load_pretrained(str(model_dir), max_tiles=None, dtype=torch.float32,
                                        cfg=ModelConfig(attn_implementation="eager"))
    if lora:
        add_lora(model, cfg.lora)
        torch.manual_seed(1)
        with torch.no_grad():  # peft starts B at zero; make the adapters change the output
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.05)
    groups, _ = apply_policy(model, cfg.policy, base_lr=1e-3, weight_decay=0.0, lora=lora)
    engine, _ = create_engine(model, param_groups=groups, ds_config=ds_config, optim=cfg.optim, max_steps=2)
    return engine, assets, cfg


def _logits(model, assets):
    ids = torch.tensor([[20, 21, 22] + [assets.token_id(IMG_CONTEXT)] * assets.image_seq_length + [23, 24]])
    pixels = torch.randn(1, 3, assets.image_size, assets.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return vlm_logits(model.eval(), input_ids=ids, attention_mask=None, pixel_values=pixels.to(next(model.parameters()).dtype))


def test_sharded_export_loads_in_stock_transformers(tiny_export, tmp_path, process_group):
    engine, assets, _ = _engine(tiny_export, lora=False)
    full = gathered_state_dict(engine)
    export_hf(engine, assets=assets, out_dir=tmp_path / "hf", meta={}, shard_size=SHARD)
    index = json.loads((tmp_path / "hf" / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    per_file = {f: sum(1 for v in index["weight_map"].values() if v == f) for f in files}
    assert set(index["weight_map"]) == set(index_weights(tiny_export))  # transformers' own on-disk names
    assert len(files) >= 4  # a tensor larger than a shard (the fp32 embedding) gets one of its own
    assert all(per_file[f] == 1 or (tmp_path / "hf" / f).stat().st_size <= parse_size(SHARD) + 4096 for f in files)
    stock = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    for name, value in stock.state_dict().items():
        assert torch.equal(value, full[name].float()), name
    # weights are bitwise equal (above); stock picks sdpa attention, the engine eager
    torch.testing.assert_close(_logits(stock, assets), _logits(engine.module, assets), rtol=1e-5, atol=1e-5)


def test_lora_merge_in_streaming_export(tiny_export, tmp_path, process_group):
    engine, assets, cfg = _engine(tiny_export, lora=True)
    adapted = _logits(engine.module, assets)
    export_hf(engine, assets=assets, out_dir=tmp_path / "hf", meta={}, lora_scaling=cfg.lora.alpha / cfg.lora.r,
              shard_size=SHARD)
    keys = json.loads((tmp_path / "hf" / INDEX_NAME).read_text())["weight_map"]
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    stock = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    torch.testing.assert_close(_logits(stock, assets), adapted, rtol=1e-5, atol=1e-5)


def test_shard_writer_caps_and_sizes(tmp_path):
    writer = ShardWriter(tmp_path, max_bytes=100)
    for i in range(5):
        writer.add(f"t{i}", torch.zeros(10))  # 40 bytes each: two per shard
    writer.add("big", torch.zeros(50))  # larger than a shard: a shard of its own
    paths = writer.close()
    assert len(paths) == 4
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 5 * 40 + 200 and len(index["weight_map"]) == 6
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(ValueError, match="not a size"):
        parse_size("five")


def test_scalar_head_model_exports_vlm_and_head(tiny_export, tmp_path, process_group):
    from vlmscale.distributed.zero import frozen_engine, partitioned_init
    from vlmscale.model.heads import load_scalar_head_model, ScalarHeadModel

    cfg = load_config(SFTConfig, overrides=["train.precision=fp32", "train.micro_batch_size=1"])
    ds_config = build_ds_config(cfg, world_size=1)
    with zero3_model_scope(ds_config):
        vlm, assets = load_pretrained(str(tiny_export), max_tiles=None, dtype=torch.float32)
    with partitioned_init(ds_config):
        model = ScalarHeadModel(vlm)
    engine = frozen_engine(model, ds_config)
    full = gathered_state_dict(engine)
    export_hf(engine, assets=assets, out_dir=tmp_path / "hf", meta={}, shard_size=SHARD)
    loaded, _ = load_scalar_head_model(tmp_path / "hf", dtype=torch.float32)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, full[name].float()), name
