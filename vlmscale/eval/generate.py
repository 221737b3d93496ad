"""Greedy generation for rendered prompts, batched by prompt length (no padding needed)."""

from __future__ import annotations

import torch

from vlmscale.data.render import Rendered
from vlmscale.model.tokenizer import ProcessorAssets


@torch.no_grad()
def generate(model, assets: ProcessorAssets, prompts: list[Rendered], *, max_new_tokens: int,
             batch_size: int = 16, synced_gpus: bool = False) -> list[str]:
    """Answers for ``prompts`` in order. With ``synced_gpus`` every rank keeps stepping until all finish."""
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    answers: list[str] = [""] * len(prompts)
    dtype = next(model.parameters()).dtype
    i = 0
    while i < len(order):
        length = len(prompts[order[i]].input_ids)
        group = [order[i]]
        i += 1
        while i < len(order) and len(group) < batch_size and len(prompts[order[i]].input_ids) == length:
            group.append(order[i])
            i += 1
        ids = torch.tensor([prompts[j].input_ids for j in group])
        tiles = [prompts[j].pixel_values for j in group if prompts[j].pixel_values is not None]
        kwargs = {"pixel_values": torch.cat(tiles).to(dtype)} if tiles else {}
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=assets.tokenizer.pad_token_id, eos_token_id=assets.tokenizer.eos_token_id,
            synced_gpus=synced_gpus, **kwargs,
        )
        for row, j in enumerate(group):
            answers[j] = assets.tokenizer.decode(out[row, length:], skip_special_tokens=True).strip()
    return answers
