"""Tiny in-process ZeRO-3 engines (world size 1, fp32) and demo micro-batches for unit tests."""

from __future__ import annotations

import json

import deepspeed
import torch

from vlmscale.config import SFTConfig, load_config
from vlmscale.config.deepspeed import build_ds_config
from vlmscale.data.dataset import Item, collate
from vlmscale.data.render import render_sample
from vlmscale.data.shards import ShardDataset
from vlmscale.distributed.zero import zero3_model_scope
from vlmscale.model.build import load_pretrained
from vlmscale.model.policy import apply_policy
from vlmscale.train.step import create_engine


def zero3_engine(model_dir, *, optimizer=None, policy: list[str] = (), grad_accum_steps: int = 1,
                 micro_batch_size: int = 1, max_grad_norm: float = 0.0, max_steps: int = 10, lr: float = 1e-2):
    """``(engine, assets)``: the tiny export under ZeRO-3 in fp32, with the recipes' AdamW unless
    ``optimizer`` (a function of the parameter list) is given."""
    cfg = load_config(SFTConfig, overrides=["train.precision=fp32", f"train.micro_batch_size={micro_batch_size}",
                                            f"train.grad_accum_steps={grad_accum_steps}", f"optim.max_grad_norm={max_grad_norm}",
                                            f"optim.lr={lr}", "optim.warmup_steps=1", f"train.max_steps={max_steps}", *policy])
    ds_config = build_ds_config(cfg, world_size=1)
    with zero3_model_scope(ds_config):
        model, assets = load_pretrained(str(model_dir), max_tiles=None, dtype=torch.float32)
    groups, _ = apply_policy(model, cfg.policy, base_lr=cfg.optim.lr, weight_decay=0.0)
    if optimizer is None:
        engine, _ = create_engine(model, param_groups=groups, ds_config=ds_config, optim=cfg.optim, max_steps=max_steps)
    else:
        params = [p for g in groups for p in g["params"]]
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(params), config=ds_config, dist_init_required=False)
    return engine, assets


def batches(data_dir, assets, indices: list[list[int]]) -> list[dict]:
    """One collated micro-batch per index list, from the shards in ``data_dir``."""
    data = ShardDataset(data_dir)
    out = []
    for group in indices:
        items = []
        for i in group:
            _, members = data.read(i)
            items.append(Item(render_sample(json.loads(members["json"]), members, assets, max_seq_len=512), str(i), 0, []))
        out.append(collate(items, pad_id=assets.tokenizer.pad_token_id))
    return out
