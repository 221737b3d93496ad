"""The previous decoder (equal-length batches only), kept as the reference the batched decoder of
:mod:`vlmscale.eval.generate` is tested and benchmarked against (`tests/unit/test_rollout.py`,
`benchmarks/rollout_throughput.py`). Not used by any stage.

Decoding that is safe inside a ZeRO-3 run: greedy (evaluation) or sampled (PPO rollouts), with optional
visual contrastive decoding.

ZeRO-3 gathers each module's parameters collectively, so every rank must run the same forwards
in the same order. Here:

- batches are formed globally (prompts sorted by length, equal-length groups, fixed size) and then
  dealt to ranks; a rank with fewer batches runs placeholder batches, so all ranks run the same
  number of prefill and decode forwards, and each batch is computed identically on any world size;
- the prefill forward always runs the vision encoder (a blank tile for image-less batches, whose
  features are multiplied by zero), decode forwards never do;
- decoding stops when every rank's sequences have finished (one all-reduce per token).

With ``local=True`` each rank passes its own prompts instead (PPO: every rank generates for its share of
the rollout batch); the number of batch rounds is then agreed over ranks (one all-reduce), and a rank
out of batches runs placeholders as above.

Sampling (``temperature > 0``) draws from ``softmax(logits / temperature)`` with the caller's
``torch.Generator``, so a rollout is a pure function of the generator's seed.

Visual contrastive decoding (VCD, seed 001 "VCD") contrasts the logits given the image with the
logits given a noised copy: ``(1 + alpha) * l(v) - alpha * l(v')``, restricted to tokens whose
probability under ``l(v)`` is at least ``beta`` times the most likely one's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from vlmscale.data.render import Rendered
from vlmscale.distributed.group import all_reduce_max, any_rank, model_device
from vlmscale.model.forward import merge_image_features
from vlmscale.model.tokenizer import ProcessorAssets


@dataclass(frozen=True)
class VCDConfig:
    alpha: float = 1.0  # contrast strength
    beta: float = 0.1  # adaptive plausibility cut-off
    noise: float = 0.5  # share of Gaussian noise mixed into the distorted image (0..1)
    seed: int = 0


def plan_batches(prompts: list[Rendered], *, batch_size: int) -> list[list[int]]:
    """Equal-length groups of prompt indices, in a world-size-independent order."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i].input_ids), i))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and len(prompts[batches[-1][0]].input_ids) == len(prompts[i].input_ids):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _distort(pixels: torch.Tensor, vcd: VCDConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(vcd.seed)  # on the CPU: the same noise on every device
    noise = torch.randn(pixels.shape, generator=gen).to(device=pixels.device, dtype=pixels.dtype)
    return (1 - vcd.noise) ** 0.5 * pixels + vcd.noise ** 0.5 * noise


class _Branch:
    """One prompt batch's decoding state: KV cache and next-token logits."""

    def __init__(self, model, ids: torch.Tensor, pixels: torch.Tensor | None, tile_pool: torch.Tensor | None = None):
        self.model = model
        self.cache = DynamicCache()
        self.logits = self._run(merge_image_features(model, ids, pixels, tile_pool))

    def _run(self, embeds: torch.Tensor) -> torch.Tensor:
        out = self.model.model.language_model(inputs_embeds=embeds, past_key_values=self.cache, use_cache=True)
        return self.model.lm_head(out.last_hidden_state[:, -1]).float()

    def step(self, tokens: torch.Tensor) -> None:
        embeds = self.model.model.get_input_embeddings()(tokens[:, None])
        self.logits = self._run(embeds)


def _next_tokens(main: _Branch, contrast: _Branch | None, vcd: VCDConfig | None, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None, banned: torch.Tensor | None = None) -> torch.Tensor:
    logits = main.logits
    if banned is not None:
        logits = logits.index_fill(-1, banned, float("-inf"))
    if contrast is not None:
        probs = logits.softmax(-1)
        keep = probs >= vcd.beta * probs.max(dim=-1, keepdim=True).values
        logits = ((1 + vcd.alpha) * logits - vcd.alpha * contrast.logits).masked_fill(~keep, float("-inf"))
    if temperature > 0:  # drawn on the CPU with the caller's generator: the same rollout on every device
        probs = (logits / temperature).softmax(-1).cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return logits.argmax(-1).cpu()


def _rounds(num_mine: int, *, local: bool, num_batches: int, world_size: int) -> int:
    if not local:
        return -(-num_batches // world_size)
    return int(all_reduce_max([float(num_mine)])[0])


@torch.no_grad()
def generate(model, assets: ProcessorAssets, prompts: list[Rendered], *, max_new_tokens: int, batch_size: int = 16,
             rank: int = 0, world_size: int = 1, vcd: VCDConfig | None = None, return_ids: bool = False,
             local: bool = False, temperature: float = 0.0, generator: torch.Generator | None = None,
             banned: list[int] | None = None) -> dict[int, str] | dict[int, list[int]]:
    """Answers ``{prompt index: text}`` (or generated token ids, end-of-sequence included when it was
    generated) for the batches dealt to ``rank`` (``local``: for all of this rank's ``prompts``);
    collective when world_size > 1. Greedy unless ``temperature > 0``; ``banned`` token ids are never
    generated (sampling can otherwise draw an image placeholder, which no forward could take back in)."""
    was_training = model.training
    model.eval()
    batches = plan_batches(prompts, batch_size=batch_size)
    mine = batches if local else batches[rank::world_size]
    rounds = _rounds(len(mine), local=local, num_batches=len(batches), world_size=world_size)
    eos, pad = assets.tokenizer.eos_token_id, assets.tokenizer.pad_token_id
    dtype = next(model.model.multi_modal_projector.parameters()).dtype
    dev = model_device(model)
    answers: dict[int, str] = {}
    ban = torch.tensor(banned, dtype=torch.long, device=dev) if banned else None
    for r in range(rounds):
        group = mine[r] if r < len(mine) else None
        if group is None:  # placeholder batch: keep this rank's collectives in step with the others
            ids, pixels, pool = torch.tensor([[eos]], device=dev), None, None
        else:
            ids = torch.tensor([prompts[j].input_ids for j in group], device=dev)
            tiles = [prompts[j].pixel_values for j in group if prompts[j].pixel_values is not None]
            pixels = torch.cat(tiles).to(device=dev, dtype=dtype) if tiles else None
            pool = torch.tensor([f for j in group for f in prompts[j].tile_pool], dtype=torch.long)
        main = _Branch(model, ids, pixels, pool)
        contrast = None
        if vcd is not None:
            contrast = _Branch(model, ids, None if pixels is None else _distort(pixels, vcd), pool)
        done = torch.zeros(ids.shape[0], dtype=torch.bool) if group is not None else torch.ones(1, dtype=torch.bool)
        out = torch.full((ids.shape[0], max_new_tokens), pad, dtype=torch.long)
        for t in range(max_new_tokens):
            nxt = _next_tokens(main, contrast, vcd, temperature=temperature, generator=generator, banned=ban)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out[:, t] = nxt
            done |= nxt == eos
            if not any_rank(not bool(done.all())) or t == max_new_tokens - 1:
                break
            main.step(nxt.to(dev))
            if contrast is not None:
                contrast.step(nxt.to(dev))
        if group is not None:
            for row, j in enumerate(group):
                ids_row = out[row].tolist()
                if return_ids:
                    answers[j] = ids_row[: ids_row.index(eos) + 1] if eos in ids_row else ids_row
                else:
                    ids_row = ids_row[: ids_row.index(eos)] if eos in ids_row else ids_row
                    answers[j] = assets.tokenizer.decode(ids_row, skip_special_tokens=True).strip()
    model.train(was_training)
    return answers
