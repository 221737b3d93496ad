"""2-rank ZeRO-3 generation where ranks finish at different steps (launched by test_eval.py).

Rank 0 treats its own first greedy token as end-of-sequence, so its answers stop after one token;
rank 1 keeps decoding to max_new_tokens. Every decode step is a ZeRO-3 collective, so this only
completes if the finished rank keeps stepping with the others.
"""

import json
import sys

import deepspeed
import torch

from vlmscale.config import SFTConfig, load_config
from vlmscale.config.deepspeed import build_ds_config
from vlmscale.data.render import render_prompt
from vlmscale.data.shards import ShardDataset
from vlmscale.distributed.group import init_distributed, shutdown
from vlmscale.distributed.zero import load_weights, zero3_model_scope
from vlmscale.eval.generate import _Branch, generate, plan_batches
from vlmscale.model.build import build_model

demo_dir, out_file = sys.argv[1], sys.argv[2]
dist = init_distributed()
cfg = load_config(SFTConfig, overrides=["model.preset=tiny", "train.micro_batch_size=1"])
ds_config = build_ds_config(cfg, world_size=dist.world_size)
torch.manual_seed(0)
with zero3_model_scope(ds_config):
    model, assets = build_model(cfg.model, max_tiles=2, dtype=torch.bfloat16, load_weights=load_weights)
engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False,
                                  optimizer=torch.optim.AdamW([p for p in model.parameters()], lr=1e-4))
data = ShardDataset(f"{demo_dir}/heldout/vqa")
prompts = []
for i in range(4):
    _, members = data.read(i)
    prompts.append(render_prompt(json.loads(members["json"])["messages"], members, assets))
batches = plan_batches(prompts, batch_size=16)
if dist.rank == 0:  # make this rank's first greedy token its end-of-sequence token
    group = batches[0]
    ids = torch.tensor([prompts[j].input_ids for j in group])
    tiles = torch.cat([prompts[j].pixel_values for j in group]).to(torch.bfloat16)
    first = int(_Branch(engine.module, ids, tiles).logits[0].argmax())
    assets.tokenizer.eos_token = assets.tokenizer.convert_ids_to_tokens(first)
else:
    _Branch(engine.module, torch.tensor([[0]]), None)  # mirror rank 0's extra forward
answers = generate(engine.module, assets, prompts, max_new_tokens=12, rank=dist.rank, world_size=dist.world_size,
                   return_ids=True)
lengths = {j: len(ids) for j, ids in answers.items()}
with open(f"{out_file}.rank{dist.rank}", "w") as f:
    json.dump({"rank": dist.rank, "lengths": lengths}, f)
shutdown()
