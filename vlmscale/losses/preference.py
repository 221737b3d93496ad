"""Preference losses as pure tensor functions (unit-tested against hand-computed numbers).

- :func:`bradley_terry_loss`: the reward model's ``-log sigmoid(r_chosen - r_rejected)``.
- :func:`sequence_logps`: an answer's log-probability under a model, optionally with RLHF-V's dense
  weighting of the tokens where the two answers differ.
- :func:`dpo_loss`: sigmoid DPO, ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmscale.constants import IGNORE
from vlmscale.model.forward import token_losses


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per pair ``-log sigmoid(chosen - rejected)`` for scalar scores ``(pairs,)``."""
    return -F.logsigmoid(chosen.float() - rejected.float())


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token ``(rows, L - 1)`` (fp32), zero where the label is ignored."""
    return -token_losses(logits, labels)


def sequence_logps(token_lp: torch.Tensor, labels: torch.Tensor, *, changed: torch.Tensor | None = None,
                   segment_weight: float = 1.0) -> torch.Tensor:
    """``(rows,)``: each row's answer log-probability from :func:`token_logps`.

    Without ``changed`` (or with ``segment_weight`` 1) the plain sum over supervised tokens, as in DPO.
    With ``changed`` (per token, where the answer differs from the other side of its pair) and
    ``segment_weight`` gamma != 1, RLHF-V's dense form: ``(sum_unchanged + gamma * sum_changed) / (n_unchanged +
    gamma * n_changed)``, which makes the changed (hallucinated / corrected) segments count gamma times.
    """
    mask = (labels[:, 1:] != IGNORE).float()
    if changed is None or segment_weight == 1.0:
        return (token_lp * mask).sum(-1)
    weights = mask * torch.where(changed[:, 1:], segment_weight, 1.0)
    return (token_lp * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO per pair; returns ``(losses, chosen_rewards, rejected_rewards)``.

    The implicit rewards are ``beta * (log pi - log ref)`` of each answer (detached); the loss is
    ``-log sigmoid(chosen_reward - rejected_reward)`` with gradients through the policy terms.
    """
    chosen = beta * (policy_chosen.float() - ref_chosen.float())
    rejected = beta * (policy_rejected.float() - ref_rejected.float())
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def sft_loss(token_lp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: mean negative log-likelihood over its supervised tokens (the optional SFT term on chosen)."""
    mask = (labels[:, 1:] != IGNORE).float()
    return -(token_lp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
