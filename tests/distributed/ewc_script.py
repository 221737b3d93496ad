"""Two ZeRO-3 ranks load EWC files and take 3 steps with the penalty (launched by test_ewc.py).

argv: model_dir, ewc_dir, demo_dir, out_file. Each rank writes out_file.rank<N>: the sizes of the F
and theta* slices it holds, whether its theta* slice is exactly its slice of the fp32 master weights
(the model is the anchor model), and, per step, how far the gradient the penalty added is from
weight * F * (theta - theta*) on its slice.
"""

import json
import sys

import torch

from vlmscale.config import SFTConfig, load_config
from vlmscale.config.deepspeed import build_ds_config
from vlmscale.data.dataset import Item, collate
from vlmscale.data.render import render_sample
from vlmscale.data.shards import ShardDataset
from vlmscale.distributed.group import device, init_distributed, shutdown
from vlmscale.distributed.zero import local_fp32_param, local_grad, local_range, zero3_model_scope
from vlmscale.model.build import load_pretrained
from vlmscale.model.policy import apply_policy
from vlmscale.regularize.ewc import EWC
from vlmscale.train.step import create_engine, train_step

WEIGHT = 2.0
model_dir, ewc_dir, demo_dir, out_file = sys.argv[1:5]
dist = init_distributed()
cfg = load_config(SFTConfig, overrides=["train.precision=fp32", "train.micro_batch_size=2", "policy.vision.trainable=true",
                                        "optim.lr=1e-2", "optim.warmup_steps=1", "train.max_steps=3"])
ds_config = build_ds_config(cfg, world_size=dist.world_size)
with zero3_model_scope(ds_config):
    model, assets = load_pretrained(model_dir, max_tiles=None, dtype=torch.float32)
groups, _ = apply_policy(model, cfg.policy, base_lr=cfg.optim.lr, weight_decay=0.0)
engine, _ = create_engine(model, param_groups=groups, ds_config=ds_config, optim=cfg.optim, max_steps=3)
ewc = EWC.load(ewc_dir, engine.module, weight=WEIGHT)

report = {"rank": dist.rank, "world_size": dist.world_size, "local_numel": ewc.local_numel(),
          "total_numel": ewc.total_numel(), "sizes": {}, "anchor_is_local_master": True, "padding_is_zero": True}
for e in ewc.entries:
    start, size, real = local_range(e.param)
    report["sizes"][e.name] = [e.fisher.numel(), e.anchor.numel()]
    report["anchor_is_local_master"] &= torch.equal(e.anchor[:real], local_fp32_param(e.param)[:real].detach())
    report["padding_is_zero"] &= bool((e.fisher[real:] == 0).all() and (e.anchor[real:] == 0).all())

errors, values = [], []


def apply_and_check() -> float:
    before = {e.name: local_grad(e.param).clone() for e in ewc.entries}
    value = ewc.apply()
    err = 0.0
    for e in ewc.entries:
        want = WEIGHT * e.fisher * (local_fp32_param(e.param).detach() - e.anchor)
        err = max(err, float((local_grad(e.param) - before[e.name] - want).abs().max()))
    errors.append(err)
    values.append(value)
    return value


data = ShardDataset(f"{demo_dir}/train/vqa")
penalties = []
for step in range(3):
    items = []
    for i in range(4 * step + 2 * dist.rank, 4 * step + 2 * dist.rank + 2):
        _, members = data.read(i)
        items.append(Item(render_sample(json.loads(members["json"]), members, assets, max_seq_len=512), str(i), 0, []))
    batch = collate(items, pad_id=assets.tokenizer.pad_token_id)
    penalties.append(train_step(engine, [batch], device=device(), before_step=apply_and_check).penalty)
report.update(grad_errors=errors, local_values=values, penalties=penalties)
with open(f"{out_file}.rank{dist.rank}", "w") as f:
    json.dump(report, f)
shutdown()
