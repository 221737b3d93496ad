"""2-rank ZeRO-3 steps where ranks disagree on modality (launched by test_reliability.py).

argv: demo_dir, mode, out_file. mode "mixed": rank 0's micro-batches have images, rank 1's are
text-only; "text": both text-only. With "--no-guard" the text-only forward skips the vision
encoder (the negative control): the ranks' ZeRO-3 all-gathers then no longer match.
"""

import json
import sys

import deepspeed
import torch

import vlmscale.model.forward as forward
from vlmscale.config import SFTConfig, load_config
from vlmscale.config.deepspeed import build_ds_config
from vlmscale.data.dataset import Item, collate
from vlmscale.data.render import render_sample
from vlmscale.data.shards import ShardDataset
from vlmscale.distributed.group import device, init_distributed, shutdown
from vlmscale.distributed.zero import load_weights, zero3_model_scope
from vlmscale.model.build import build_model
from vlmscale.train.step import train_step
from vlmscale.train.watchdog import Watchdog

demo_dir, mode, out_file = sys.argv[1], sys.argv[2], sys.argv[3]
if "--no-guard" in sys.argv:
    guarded = forward.merge_image_features

    def unguarded(model, input_ids, pixel_values, tile_pool=None):
        if pixel_values is None:
            return model.model.get_input_embeddings()(input_ids)
        return guarded(model, input_ids, pixel_values, tile_pool)

    forward.merge_image_features = unguarded

dist = init_distributed()
cfg = load_config(SFTConfig, overrides=["model.preset=tiny", "train.micro_batch_size=2", "policy.vision.trainable=true"])
ds_config = build_ds_config(cfg, world_size=dist.world_size)
torch.manual_seed(0)
with zero3_model_scope(ds_config):
    model, assets = build_model(cfg.model, max_tiles=2, dtype=torch.bfloat16, load_weights=load_weights)
engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False,
                                  optimizer=torch.optim.AdamW([p for p in model.parameters()], lr=1e-3))
source = "vqa" if (mode == "mixed" and dist.rank == 0) else "text"
data = ShardDataset(f"{demo_dir}/train/{source}")
watchdog = Watchdog(f"{out_file}.dir", rank=dist.rank, timeout_s=20)
losses = []
for step in range(3):
    items = []
    for i in range(2):
        _, members = data.read(2 * step + i)
        items.append(Item(render_sample(json.loads(members["json"]), members, assets, max_seq_len=512), f"{source}{i}", 0, []))
    batch = collate(items, pad_id=assets.tokenizer.pad_token_id)
    assert (batch["pixel_values"] is None) == (source == "text")
    watchdog.beat()
    losses.append(train_step(engine, [batch], device=device()).loss)
watchdog.close()
with open(f"{out_file}.rank{dist.rank}", "w") as f:
    json.dump({"rank": dist.rank, "losses": losses}, f)
shutdown()
