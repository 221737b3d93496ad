"""GRPO-family objective maths, pure: group advantages, the clipped ratio loss, the k3 KL estimator and
the loss aggregations (Shao et al. 2024, DeepSeekMath; Dr. GRPO, Liu et al. 2025; DAPO, Yu et al. 2025).

Shapes: ``rewards`` ``(groups, G)``, one row per prompt and one column per sampled completion;
per-token tensors ``(rows, T)`` with ``mask`` 1 on real response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADVANTAGE_MODES = ("grpo", "dr_grpo")
LOSS_AGGREGATIONS = ("token", "sequence", "constant")


def group_advantages(rewards: torch.Tensor, *, mode: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """Advantage of each completion within its prompt's group: ``(r - mean) / (std + eps)`` (GRPO, the
    group's unbiased std), or ``r - mean`` (Dr. GRPO: no std normalisation, which otherwise weights
    prompts that are nearly always right or nearly always wrong up)."""
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"advantage mode {mode!r} is not one of {ADVANTAGE_MODES}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if mode == "dr_grpo":
        return centred
    std = rewards.std(dim=1, keepdim=True, unbiased=True) if rewards.shape[1] > 1 else torch.zeros_like(centred[:, :1])
    return centred / (std + eps)


def zero_variance(rewards: torch.Tensor, *, tol: float = 1e-8) -> torch.Tensor:
    """``(groups,)`` True where every completion of the prompt got the same reward: no learning signal."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) <= tol


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0,
    unbiased, low variance; Schulman 2020)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class TokenLoss:
    loss: torch.Tensor  # (rows, T) per-token loss, 0 off the mask
    clipped: torch.Tensor  # (rows, T) 1 where the clip was active (the gradient is cut)
    ratio: torch.Tensor  # (rows, T)


def clipped_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                       clip_low: float, clip_high: float, kl: torch.Tensor | None = None,
                       kl_coef: float = 0.0) -> TokenLoss:
    """``-min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + kl_coef * kl`` per token, where
    ``ratio = exp(logp - old_logp)`` and ``A`` is the sequence's advantage ``(rows,)`` broadcast over its
    tokens. ``clip_high > clip_low`` is DAPO's asymmetric ("clip-higher") clip."""
    adv = advantages[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if kl is not None and kl_coef:
        loss = loss + kl_coef * kl
    active = (clipped < unclipped).to(logp.dtype)
    return TokenLoss(loss=loss * mask, clipped=active * mask, ratio=ratio)


def aggregate_weights(mask: torch.Tensor, *, mode: str, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights whose sum with the per-token loss gives this batch's share of the loss, and the
    normaliser those weights are to be divided by once summed over all ranks and micro-batches:

    - ``token``: every token of the minibatch counts once, the mean over all its tokens (DAPO);
    - ``sequence``: each sequence's token mean, averaged over sequences (the original GRPO);
    - ``constant``: token sums divided by ``max_new_tokens`` per sequence (Dr. GRPO: a loss that does
      not depend on response length, so long wrong answers are not favoured).

    Returns ``(weights (rows, T), units (scalar))``: the loss is ``sum(loss * weights) / sum(units)``.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss aggregation {mode!r} is not one of {LOSS_AGGREGATIONS}")
    rows = (mask.sum(-1) > 0).to(mask.dtype)
    if mode == "token":
        return mask, mask.sum()
    if mode == "sequence":
        return mask / mask.sum(-1, keepdim=True).clamp(min=1.0), rows.sum()
    return mask / float(max_new_tokens), rows.sum()
