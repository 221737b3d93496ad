"""The training forward: token embeddings with image features scattered in, then the LLM.

Under ZeRO-3 every rank must run the same modules in the same order, or the parameter
all-gathers of one rank wait forever for the other. A micro-batch without images therefore
runs the vision encoder on one blank tile whose features enter the graph multiplied by zero:
the collectives match on every rank, and the result is exactly the text-only forward.

Video frames may have their token grid average-pooled (``tile_pool`` > 1 for that tile), which is
how a clip of many frames fits its token budget.

A model whose config sets ``image_pos_scale`` > 0 (the demo preset) adds a fixed 2-D sin-cos position
embedding to each tile's image tokens after the projector (:func:`image_pos_table`); transformers'
InternVL has no such term, so it is off (0) for stock checkpoints and for the forward-equality tests.

Packed rows (``data.packing``) hold several samples each; their position ids restart at every sample,
and attention is kept within each sample by a block-diagonal causal mask (flash-attention: its varlen
kernel on one flattened row).
"""

from __future__ import annotations

import functools
import math

import torch

from vlmscale.constants import IGNORE


def _dummy_tile(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    size = model.config.vision_config.image_size
    return torch.zeros((1, 3, size[0], size[1]), dtype=dtype, device=device)


def _pool_tiles(features: torch.Tensor, tile_pool: torch.Tensor) -> torch.Tensor:
    """``(tiles, seq, hidden)`` -> flat features, each tile's square grid pooled by its factor."""
    grid = math.isqrt(features.shape[1])
    out = []
    for tile, factor in zip(features, tile_pool.tolist()):
        if factor == 1:
            out.append(tile)
            continue
        x = tile.reshape(grid, grid, -1).permute(2, 0, 1)
        x = torch.nn.functional.avg_pool2d(x, factor, ceil_mode=True)
        out.append(x.flatten(1).transpose(0, 1))
    return torch.cat(out)


@functools.lru_cache(maxsize=8)
def _sincos_table(grid: int, dim: int) -> torch.Tensor:
    from vlmscale.model.build import sincos_2d

    table = sincos_2d(grid, dim).double()
    table = table - table.mean(0)  # no constant part: only what differs between positions
    return (table / table.pow(2).mean().sqrt()).float()


def image_pos_table(grid: int, dim: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(grid * grid, dim)``: 2-D sin-cos positions of a tile's token grid in raster order, centred over the
    grid (no constant part, only what tells cells apart; the centre cell of a 3x3 grid is then the shortest
code) and scaled to unit RMS, so ``image_pos_scale`` is the cue's RMS per channel."""
    return _sincos_table(grid, dim).to(dtype=dtype, device=device)


def add_image_positions(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``(tiles, seq, hidden)`` projected features plus ``config.image_pos_scale`` x the tile's position table."""
    scale = float(getattr(model.config, "image_pos_scale", 0.0) or 0.0)
    if scale == 0.0:
        return features
    grid = math.isqrt(features.shape[1])
    return features + scale * image_pos_table(grid, features.shape[-1], dtype=features.dtype, device=features.device)


def image_features(model: torch.nn.Module, pixel_values: torch.Tensor | None,
                   tile_pool: torch.Tensor | None = None) -> torch.Tensor:
    """Projected features ``(image tokens, hidden)``; a blank tile when there are no images."""
    inner = model.model
    param = next(inner.multi_modal_projector.parameters())
    pixels = pixel_values.to(param.dtype) if pixel_values is not None else _dummy_tile(model, param.dtype, param.device)
    features = add_image_positions(model, inner.get_image_features(pixel_values=pixels, return_dict=True).pooler_output)
    if pixel_values is not None and tile_pool is not None and bool((tile_pool > 1).any()):
        return _pool_tiles(features, tile_pool)
    return features.reshape(-1, features.shape[-1])


def merge_image_features(model: torch.nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                         tile_pool: torch.Tensor | None = None) -> torch.Tensor:
    """Token embeddings with the image features in the ``<IMG_CONTEXT>`` slots.

    Without images the encoder still runs (on a blank tile) and contributes exactly zero.
    """
    embeds = model.model.get_input_embeddings()(input_ids)
    features = image_features(model, pixel_values, tile_pool).to(embeds.dtype)
    if pixel_values is None:
        return embeds + 0.0 * features.sum()
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    if int(mask.sum()) != features.shape[0]:
        raise ValueError(f"{int(mask.sum())} image tokens but {features.shape[0]} image features in the batch")
    return embeds.masked_scatter(mask, features)


def packed_attention_mask(position_ids: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """Block-diagonal causal mask ``(rows, 1, L, L)`` for packed rows, additive (0 = attend).

    A sample starts wherever its position is 0; a token attends to itself and the earlier tokens of its
    own sample only. Additive rather than boolean because eager attention adds the mask as it is (sdpa
    takes either).
    """
    segment = (position_ids == 0).cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones((length, length), dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def _varlen(language_model: torch.nn.Module) -> bool:
    """Flash-attention takes no 4-D mask: packed rows go in as one flattened row, and its varlen kernel
    reads the sample boundaries from ``position_ids``."""
    return language_model.config._attn_implementation.startswith("flash_attention")


def vlm_logits(model: torch.nn.Module, **kwargs) -> torch.Tensor:
    """Logits ``(rows, L, vocab)``; arguments as :func:`vlm_hidden`."""
    return model.lm_head(vlm_hidden(model, **kwargs))


def vlm_hidden(model: torch.nn.Module, *, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               pixel_values: torch.Tensor | None, position_ids: torch.Tensor | None = None,
               tile_pool: torch.Tensor | None = None, packed: bool = False) -> torch.Tensor:
    """The LLM's last hidden states ``(rows, L, hidden)`` (scalar heads read these; see ``vlmscale.model.heads``).

    ``packed``: each row holds several samples whose ``position_ids`` restart at 0 (padding is one more
    segment, see ``vlmscale.data.packing``); attention stays within each sample, and ``attention_mask``
    is not used.
    """
    if packed and position_ids is None:
        raise ValueError("packed rows need position_ids restarting at 0 for each sample (pack_collate gives them)")
    lm = model.model.language_model
    embeds = merge_image_features(model, input_ids, pixel_values, tile_pool)
    if not packed:
        hidden = lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
    elif _varlen(lm):
        rows, length = input_ids.shape
        hidden = lm(inputs_embeds=embeds.reshape(1, rows * length, -1), attention_mask=None,
                    position_ids=position_ids.reshape(1, -1), use_cache=False).last_hidden_state.reshape(rows, length, -1)
    else:
        mask = packed_attention_mask(position_ids, dtype=embeds.dtype)
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False).last_hidden_state
    return hidden


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy (fp32), zero where the label is ignored."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return loss.view(shift_labels.shape)


def supervised_loss_sum(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                        chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) over the supervised positions, from the last hidden states.

    The LM head runs on those positions alone: in SFT most positions are prompt and image tokens whose
    logits no loss reads, so computing them (as ``vlm_logits`` + ``token_losses`` do) is wasted work. Each
    kept row's logits are the same computation either way, so the sum matches ``token_losses(...).sum()``.

    ``chunk_tokens`` > 0 (default: the head's ``loss_chunk_tokens``, set by :func:`enable_chunked_loss` from
    ``train.loss_chunk_tokens``): when more positions than that are supervised, the head and the
    cross-entropy run ``chunk_tokens`` positions at a time and the backward recomputes each chunk's logits,
    so at most one chunk's logits exist at any moment (see :class:`ChunkedHeadLoss`).
    """
    target = labels[:, 1:]
    keep = target != IGNORE
    head = model.lm_head
    chunk = getattr(head, "loss_chunk_tokens", 0) if chunk_tokens is None else chunk_tokens
    rows, tokens = hidden[:, :-1][keep], target[keep]
    if chunk and rows.shape[0] > chunk:
        if not isinstance(head, ChunkedLMHead):
            raise ValueError("chunked loss needs the LM head made chunk-capable first: call "
                             "vlmscale.model.forward.enable_chunked_loss(model, chunk_tokens)")
        return head(rows, labels=tokens, chunk_tokens=chunk)
    logits = head(rows)
    return torch.nn.functional.cross_entropy(logits.float(), tokens, reduction="sum")


class ChunkedHeadLoss(torch.autograd.Function):
    """``sum_i CE(hidden_i @ weight.T, target_i)`` computed ``chunk`` rows at a time (logits in fp32).

    Forward keeps only the inputs and each row's log-sum-exp; backward recomputes one chunk's logits at a
    time, turns them into ``softmax - onehot`` and accumulates the hidden-state and weight gradients, so
    the peak is one chunk's ``(chunk, vocab)`` logits instead of all of them. The weight is used once in
    the autograd graph (one gradient accumulation), which is what ZeRO-3's gradient hooks expect; it must
    be the gathered weight, i.e. this runs inside the head module's forward (:class:`ChunkedLMHead`), whose
    ZeRO-3 backward hook gathers the weight again before :meth:`backward` runs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk):
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = torch.nn.functional.linear(hidden[s:s + chunk], weight, bias).float()
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[s:s + chunk, None]).squeeze(1)
            total += (lse[s:s + chunk] - picked).sum()
            del logits
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        chunk = ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # accumulate the weight gradient in fp32 when the weight is fp32 (exact match with the unchunked
        # path); in bf16 in the weight's dtype, as the unchunked backward's one matmul would return it
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            logits = torch.nn.functional.linear(h, weight, bias).float()
            grad = torch.exp_(logits.sub_(lse[s:s + chunk, None]))  # softmax, in place
            grad[torch.arange(h.shape[0], device=h.device), target[s:s + chunk]] -= 1.0
            grad.mul_(grad_out)
            if need_b:
                grad_b += grad.sum(0)
            grad = grad.to(hidden.dtype)
            if need_h:
                grad_h[s:s + chunk] = grad @ weight.to(hidden.dtype)
            if need_w:
                grad_w.addmm_(grad.t().to(weight.dtype), h.to(weight.dtype))
            del logits, grad
        return grad_h, grad_w, grad_b.to(bias.dtype) if need_b else None, None, None


class ChunkedLMHead(torch.nn.Linear):
    """``nn.Linear`` whose forward also takes ``labels`` (then returns the summed cross-entropy, chunked).

    The loss runs inside this module's forward so that under ZeRO-3 its weight is gathered there (and
    gathered again for its backward) like any other module's.
    """

    loss_chunk_tokens: int = 0

    def forward(self, input: torch.Tensor, labels: torch.Tensor | None = None, chunk_tokens: int = 0) -> torch.Tensor:
        if labels is None:
            return super().forward(input)
        return ChunkedHeadLoss.apply(input, self.weight, self.bias, labels, chunk_tokens or self.loss_chunk_tokens)


def enable_chunked_loss(model: torch.nn.Module, chunk_tokens: int) -> None:
    """Make ``model.lm_head`` (an ``nn.Linear``) compute the supervised loss in chunks of ``chunk_tokens``
    positions (0 = off). Its parameters, hooks and state dict stay as they are: only its class changes."""
    head = model.lm_head
    if chunk_tokens < 0:
        raise ValueError(f"train.loss_chunk_tokens={chunk_tokens}: must be >= 0 (0 = the whole loss at once)")
    if type(head) not in (torch.nn.Linear, ChunkedLMHead):
        raise ValueError(f"train.loss_chunk_tokens needs the LM head to be a torch.nn.Linear, not "
                         f"{type(head).__name__}; set train.loss_chunk_tokens=0")
    head.__class__ = ChunkedLMHead
    head.loss_chunk_tokens = int(chunk_tokens)


def num_supervised(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())
