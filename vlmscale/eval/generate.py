"""Batched decoding that is safe inside a ZeRO-3 run: greedy (evaluation) or sampled (PPO and GRPO rollouts),
with optional visual contrastive decoding. One implementation for eval and RL: :func:`rollout` (token ids and,
on request, the log-probability of every generated token) and :func:`generate` (its eval-shaped wrapper).

Batches, padding, cache:

- prompts are sorted by length and cut into batches of ``batch_size`` (world-size independent), of
  unequal lengths: rows are LEFT-padded, with an attention mask and position ids counted over the real
  tokens only (``cumsum(mask) - 1``), so a padded row computes what it would alone;
- the prefill forward runs the vision encoder once per batch and fills the LLM's KV cache
  (``transformers.DynamicCache``); each decode forward feeds one token per row and extends the mask;
- a row stops at its end-of-sequence token (padding after it), the batch at ``max_new_tokens`` or when
  every row has stopped.

ZeRO-3. The parameters of a partitioned model are either gathered once for the whole call
(``gather_max_bytes``: when the gathered model is at most that many bytes, like DeepSpeed-Chat's hybrid
engine; every module's forward then runs on resident weights and no forward is a collective) or gathered
layer by layer by ZeRO-3's hooks (larger models). The choice is made from the global parameter sizes, so
it is the same on every rank. In the layer-by-layer mode every forward is a collective, so:

- a rank with fewer batches runs placeholder batches, so all ranks run the same number of prefill and
  decode forwards;
- the prefill forward always runs the vision encoder (a blank tile for image-less batches, whose
  features are multiplied by zero), decode forwards never do;
- decoding of a batch round stops when every rank's rows have finished (one all-reduce per token).

With the policy gathered none of this is needed and each rank decodes its own batches to their own end.

With ``local=True`` each rank passes its own prompts (PPO/GRPO: every rank generates for its share of the
rollout batch); otherwise the global prompt list is passed and batches are dealt to ranks round-robin.

Sampling (``temperature > 0``) draws from ``softmax(logits / temperature)``, cut to the smallest set of
tokens whose probability reaches ``top_p``, with one ``torch.Generator`` per prompt seeded from
``seeds[i]`` (or, without seeds, from a seed per prompt drawn from ``generator`` in prompt order). A row's
tokens therefore depend on its prompt and seed only, not on the batch it is in or the world size.
Returned log-probabilities are of the tempered distribution with banned tokens removed (before the
top-p cut), which is what PPO's and GRPO's losses score (``stages.ppo.response_logits``).

Visual contrastive decoding (VCD, seed 001 "VCD") contrasts the logits given the image with the
logits given a noised copy: ``(1 + alpha) * l(v) - alpha * l(v')``, restricted to tokens whose
probability under ``l(v)`` is at least ``beta`` times the most likely one's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import DynamicCache

from vlmscale.data.render import Rendered
from vlmscale.distributed.group import all_reduce_max, any_rank, model_device
from vlmscale.distributed.zero import start_forward
from vlmscale.model.forward import merge_image_features
from vlmscale.model.tokenizer import ProcessorAssets

# the policy is gathered whole for a generation call when it is at most this many bytes (eval and PPO default)
DEFAULT_GATHER_MAX_BYTES = 2 * 10**9  # eval.gather_policy_max_bytes / ppo.gather_policy_max_bytes: "2GB"
_SENTINEL = -0x5EED  # an id no module has: keeps gathered parameters resident through ZeRO-3's release hooks


@dataclass(frozen=True)
class VCDConfig:
    alpha: float = 1.0  # contrast strength
    beta: float = 0.1  # adaptive plausibility cut-off
    noise: float = 0.5  # share of Gaussian noise mixed into the distorted image (0..1)
    seed: int = 0


@dataclass
class Generation:
    """What :func:`rollout` returns for this rank's prompts (keys: indices into ``prompts``)."""

    tokens: dict[int, list[int]]  # generated ids, the end-of-sequence token included when it was generated
    logprobs: dict[int, list[float]] | None = None  # per generated token, when asked for
    forwards: int = 0  # forward calls this rank ran (prefill + decode, placeholders included)
    gathered: bool = False  # the policy was gathered whole for the call
    stats: dict = field(default_factory=dict)


def plan_batches(prompts: list[Rendered], *, batch_size: int) -> list[list[int]]:
    """Batches of prompt indices, sorted by length (least padding), in a world-size-independent order."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i].input_ids), i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def _distort(pixels: torch.Tensor, vcd: VCDConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(vcd.seed)  # on the CPU: the same noise on every device
    noise = torch.randn(pixels.shape, generator=gen).to(device=pixels.device, dtype=pixels.dtype)
    return (1 - vcd.noise) ** 0.5 * pixels + vcd.noise ** 0.5 * noise


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, rows right-aligned."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, length - len(r):] = torch.tensor(r)
            mask[i, length - len(r):] = 1
    return ids, mask


class _Branch:
    """One prompt batch's decoding state: KV cache, attention mask, next positions and next-token logits."""

    def __init__(self, model, ids: torch.Tensor, pixels: torch.Tensor | None, tile_pool: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, *, new_pass: bool = False):
        self.model = model
        self.new_pass = new_pass  # per-layer ZeRO-3 gathers: each forward starts a new coordinator pass
        self.cache = DynamicCache()
        self.mask = torch.ones_like(ids) if mask is None else mask
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.next_pos = positions[:, -1:] + 1
        if new_pass:
            start_forward(model)  # the prefill's vision encoder and projector run before the language model
        self.logits = self._run(merge_image_features(model, ids, pixels, tile_pool), positions, restart=False)

    def _run(self, embeds: torch.Tensor, positions: torch.Tensor, *, restart: bool = True) -> torch.Tensor:
        # no mask at all when no row is padded: the same kernels as an unpadded forward
        mask = None if bool(self.mask.all()) else self.mask
        if self.new_pass and restart:
            start_forward(self.model)
        out = self.model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                              past_key_values=self.cache, use_cache=True)
        return self.model.lm_head(out.last_hidden_state[:, -1]).float()

    def step(self, tokens: torch.Tensor) -> None:
        embeds = self.model.model.get_input_embeddings()(tokens[:, None])
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        positions = self.next_pos
        self.next_pos = positions + 1
        self.logits = self._run(embeds, positions)


def scored_logits(main: _Branch, contrast: _Branch | None, vcd: VCDConfig | None,
                  banned: torch.Tensor | None = None) -> torch.Tensor:
    """The logits tokens are picked from: banned tokens at -inf, VCD's contrast applied."""
    logits = main.logits
    if banned is not None:
        logits = logits.index_fill(-1, banned, float("-inf"))
    if contrast is not None:
        probs = logits.softmax(-1)
        keep = probs >= vcd.beta * probs.max(dim=-1, keepdim=True).values
        logits = ((1 + vcd.alpha) * logits - vcd.alpha * contrast.logits).masked_fill(~keep, float("-inf"))
    return logits


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` (rows, vocab) cut to the smallest most-likely set whose mass reaches ``top_p`` (unnormalised)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def pick_tokens(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
                generators: list[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens ``(rows,)`` on the CPU and their log-probabilities under ``softmax(logits / temperature)``
    (greedy: under ``softmax(logits)``). Sampling draws row ``i`` with ``generators[i]``, on the CPU, so a
    rollout is the same on every device and in any batch."""
    logits = logits.float().cpu()
    if temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    logp = (logits / temperature).log_softmax(-1)
    probs = top_p_filter(logp.exp(), top_p)
    tokens = torch.stack([torch.multinomial(probs[i], 1, generator=g).squeeze(-1) for i, g in enumerate(generators)])
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _next_tokens(main, contrast, vcd, *, temperature: float = 0.0, generator: torch.Generator | None = None,
                 banned: torch.Tensor | None = None) -> torch.Tensor:
    """One step's tokens with one generator for all rows (kept for the hand-computed unit tests)."""
    logits = scored_logits(main, contrast, vcd, banned)
    if temperature > 0:
        return torch.multinomial((logits / temperature).softmax(-1).cpu(), 1, generator=generator).squeeze(-1)
    return logits.argmax(-1).cpu()


# ---------------------------------------------------------------- ZeRO-3: the whole policy gathered, or per layer


def gathered_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters take when whole (a partitioned parameter counts its full size)."""
    return sum((p.ds_numel if hasattr(p, "ds_id") else p.numel()) * p.element_size() for p in model.parameters())


@contextlib.contextmanager
def gathered_policy(model: torch.nn.Module, max_bytes: int | None) -> Iterator[bool]:
    """Gather every ZeRO-3 parameter of ``model`` for the duration (yields True) when the whole model is at
    most ``max_bytes``; otherwise (or ``max_bytes`` None/0, or nothing partitioned) leave ZeRO-3 to gather
    layer by layer (yields False). Collective when it gathers; the decision is the same on every rank.

    ZeRO-3's post-forward hooks release a module's parameters once no active module needs them; a sentinel
    entry in each parameter's active-module set keeps them resident until the whole call is done."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params or not max_bytes or gathered_bytes(model) > max_bytes:
        yield False
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            p.ds_active_sub_modules.add(_SENTINEL)
        try:
            yield True
        finally:
            for p in params:
                p.ds_active_sub_modules.discard(_SENTINEL)


def _rounds(num_mine: int, *, local: bool, num_batches: int, world_size: int, lock_step: bool) -> int:
    if not lock_step:
        return num_mine
    if not local:
        return -(-num_batches // world_size)
    return int(all_reduce_max([float(num_mine)])[0])


def prompt_seeds(num_prompts: int, generator: torch.Generator) -> list[int]:
    """A seed per prompt, drawn from ``generator`` in prompt order."""
    return torch.randint(0, 2 ** 62, (num_prompts,), generator=generator).tolist()


@torch.no_grad()
def rollout(model, assets: ProcessorAssets, prompts: list[Rendered], *, max_new_tokens: int, batch_size: int = 16,
            rank: int = 0, world_size: int = 1, local: bool = False, temperature: float = 0.0, top_p: float = 1.0,
            seeds: list[int] | None = None, generator: torch.Generator | None = None,
            banned: list[int] | None = None, vcd: VCDConfig | None = None, return_logprobs: bool = False,
            gather_max_bytes: int | None = DEFAULT_GATHER_MAX_BYTES, eos_token_id: int | None = None) -> Generation:
    """Generate for the batches dealt to ``rank`` (``local``: for all of this rank's ``prompts``); collective
    when world_size > 1. Greedy unless ``temperature > 0`` (then ``seeds``, one per prompt, or ``generator``
    is needed). ``banned`` token ids are never generated (sampling could otherwise draw an image placeholder,
    which no forward could take back in). ``eos_token_id`` defaults to the tokenizer's."""
    if temperature > 0 and seeds is None and generator is None:
        raise ValueError("rollout: sampling (temperature > 0) needs seeds (one per prompt) or a torch.Generator")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"rollout: {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"rollout: top_p={top_p} must be in (0, 1]")
    if temperature > 0 and seeds is None:
        seeds = prompt_seeds(len(prompts), generator)
    was_training = model.training
    model.eval()
    batches = plan_batches(prompts, batch_size=batch_size)
    mine = batches if local else batches[rank::world_size]
    eos = assets.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = assets.tokenizer.pad_token_id
    dtype = next(model.model.multi_modal_projector.parameters()).dtype
    dev = model_device(model)
    ban = torch.tensor(banned, dtype=torch.long, device=dev) if banned else None
    result = Generation(tokens={}, logprobs={} if return_logprobs else None)
    with gathered_policy(model, gather_max_bytes) as whole:
        result.gathered = whole
        lock_step = world_size > 1 and not whole  # per-layer gathers: every forward is a collective
        rounds = _rounds(len(mine), local=local, num_batches=len(batches), world_size=world_size, lock_step=lock_step)
        for r in range(rounds):
            group = mine[r] if r < len(mine) else None
            if group is None:  # placeholder batch: keep this rank's collectives in step with the others
                ids, mask, pixels, pool = torch.tensor([[eos]]), None, None, None
            else:
                ids, mask = left_pad([prompts[j].input_ids for j in group], pad)
                tiles = [prompts[j].pixel_values for j in group if prompts[j].pixel_values is not None]
                pixels = torch.cat(tiles).to(device=dev, dtype=dtype) if tiles else None
                pool = torch.tensor([f for j in group for f in prompts[j].tile_pool], dtype=torch.long)
                mask = mask.to(dev)
            ids = ids.to(dev)
            main = _Branch(model, ids, pixels, pool, mask, new_pass=not whole)
            contrast = None
            if vcd is not None:
                contrast = _Branch(model, ids, None if pixels is None else _distort(pixels, vcd), pool, mask,
                                   new_pass=not whole)
            result.forwards += 1
            rows = ids.shape[0]
            gens = None
            if temperature > 0 and group is not None:
                gens = [torch.Generator().manual_seed(int(seeds[j])) for j in group]
            elif temperature > 0:
                gens = [torch.Generator().manual_seed(0)]
            done = torch.zeros(rows, dtype=torch.bool) if group is not None else torch.ones(1, dtype=torch.bool)
            out = torch.full((rows, max_new_tokens), pad, dtype=torch.long)
            logp = torch.zeros((rows, max_new_tokens))
            steps = 0
            for t in range(max_new_tokens):
                nxt, lp = pick_tokens(scored_logits(main, contrast, vcd, ban), temperature=temperature, top_p=top_p,
                                      generators=gens)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                out[:, t], logp[:, t] = nxt, lp
                done |= nxt == eos
                steps = t + 1
                running = not bool(done.all())
                if t == max_new_tokens - 1 or not (any_rank(running) if lock_step else running):
                    break
                main.step(nxt.to(dev))
                if contrast is not None:
                    contrast.step(nxt.to(dev))
                result.forwards += 1
            if group is not None:
                for row, j in enumerate(group):
                    ids_row = out[row, :steps].tolist()
                    n = ids_row.index(eos) + 1 if eos in ids_row else len(ids_row)
                    result.tokens[j] = ids_row[:n]
                    if return_logprobs:
                        result.logprobs[j] = logp[row, :n].tolist()
    model.train(was_training)
    return result


def generate(model, assets: ProcessorAssets, prompts: list[Rendered], *, max_new_tokens: int, batch_size: int = 16,
             rank: int = 0, world_size: int = 1, vcd: VCDConfig | None = None, return_ids: bool = False,
             local: bool = False, temperature: float = 0.0, generator: torch.Generator | None = None,
             banned: list[int] | None = None, top_p: float = 1.0, seeds: list[int] | None = None,
             gather_max_bytes: int | None = DEFAULT_GATHER_MAX_BYTES) -> dict[int, str] | dict[int, list[int]]:
    """Answers ``{prompt index: text}`` (or generated token ids, end-of-sequence included when it was
    generated); see :func:`rollout`."""
    res = rollout(model, assets, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, rank=rank,
                  world_size=world_size, local=local, temperature=temperature, top_p=top_p, seeds=seeds,
                  generator=generator, banned=banned, vcd=vcd, gather_max_bytes=gather_max_bytes)
    if return_ids:
        return res.tokens
    eos = assets.tokenizer.eos_token_id
    return {j: assets.tokenizer.decode(ids[:-1] if ids and ids[-1] == eos else ids, skip_special_tokens=True).strip()
            for j, ids in res.tokens.items()}
