"""2-rank ZeRO-3 generation where ranks finish at different steps (launched by test_eval.py), with the policy
gathered whole (argv[3] > 0: the byte bound) or gathered layer by layer (argv[3] = 0).

Rank 0 treats its own first greedy token as end-of-sequence, so its answers stop after one token;
rank 1 keeps decoding to max_new_tokens. Every decode step is a ZeRO-3 collective, so this only
completes if the finished rank keeps stepping with the others.
"""

import faulthandler
import json
import signal
import sys

import deepspeed
import torch

from vlmscale.config import SFTConfig, load_config
from vlmscale.config.deepspeed import build_ds_config
from vlmscale.data.render import render_prompt
from vlmscale.data.shards import ShardDataset
from vlmscale.distributed.group import init_distributed, shutdown
from vlmscale.distributed.zero import load_weights, remember_coordinator, zero3_model_scope
from vlmscale.eval.generate import _Branch, left_pad, plan_batches, rollout
from vlmscale.model.build import build_model

faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid> prints where a rank waits
demo_dir, out_file = sys.argv[1], sys.argv[2]
gather_max_bytes = int(sys.argv[3]) if len(sys.argv) > 3 else 0  # 0: per-layer gathers, in lock step
dist = init_distributed()
cfg = load_config(SFTConfig, overrides=["model.preset=tiny", "train.micro_batch_size=1"])
ds_config = build_ds_config(cfg, world_size=dist.world_size)
torch.manual_seed(0)
with zero3_model_scope(ds_config):
    model, assets = build_model(cfg.model, max_tiles=2, dtype=torch.bfloat16, load_weights=load_weights)
engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False,
                                  optimizer=torch.optim.AdamW([p for p in model.parameters()], lr=1e-4))
remember_coordinator(engine)  # as create_engine does: per-layer rollouts reset the fetch trace (a collective) per forward
data = ShardDataset(f"{demo_dir}/heldout/vqa")
prompts = []
for i in range(4):
    _, members = data.read(i)
    prompts.append(render_prompt(json.loads(members["json"])["messages"], members, assets))
batches = plan_batches(prompts, batch_size=2)  # one batch per rank
if dist.rank == 0:  # make this rank's first greedy token its end-of-sequence token
    group = batches[0]
    ids, mask = left_pad([prompts[j].input_ids for j in group], assets.tokenizer.pad_token_id)
    tiles = torch.cat([prompts[j].pixel_values for j in group]).to(torch.bfloat16)
    first = int(_Branch(engine.module, ids, tiles, None, mask).logits[0].argmax())
    assets.tokenizer.eos_token = assets.tokenizer.convert_ids_to_tokens(first)
else:
    _Branch(engine.module, torch.tensor([[0]]), None)  # mirror rank 0's extra forward
res = rollout(engine.module, assets, prompts, max_new_tokens=12, batch_size=2, rank=dist.rank, world_size=dist.world_size,
              gather_max_bytes=gather_max_bytes, eos_token_id=assets.tokenizer.eos_token_id)
lengths = {j: len(ids) for j, ids in res.tokens.items()}
# sampled local rollouts: a different number of prompts per rank (3 and 1), each rank its own
local = prompts[:3] if dist.rank == 0 else prompts[3:]
sampled = rollout(engine.module, assets, local, max_new_tokens=6, rank=dist.rank, world_size=dist.world_size,
                  local=True, temperature=1.0, seeds=list(range(len(local))), return_logprobs=True,
                  gather_max_bytes=gather_max_bytes)
with open(f"{out_file}.rank{dist.rank}", "w") as f:
    json.dump({"rank": dist.rank, "lengths": lengths, "gathered": res.gathered, "forwards": res.forwards,
               "sampled": {j: len(t) for j, t in sampled.tokens.items()}}, f)
shutdown()
