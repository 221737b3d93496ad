"""PPO for language models as pure tensor functions (unit-tested against hand-computed numbers).

Shapes: ``(rows, T)`` over the response tokens of each rollout, with ``mask`` 1 on real response
tokens and 0 on padding (responses are right-padded; a row's real tokens come first).

The per-token reward is the KL penalty to the frozen reference, ``-kl_coef * (logp - ref_logp)``,
plus the reward model's score on the row's last real token (Ziegler et al. 2019; Stiennon et al.
2020). Advantages come from GAE (Schulman et al. 2016), the policy loss is PPO's clipped surrogate
and the value loss is clipped around the rollout's values (the OpenAI baselines / TRL form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """``(rows,)``: position of each row's last real token (0 for an empty row)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def token_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards, kl)``, both ``(rows, T)``: ``kl = logp - ref_logp`` on real tokens, and
    ``rewards = -kl_coef * kl`` with the sequence ``score`` added on each row's last real token."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(score.shape[0])
    rewards[rows, last_index(mask)] += score * (mask.sum(-1) > 0)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: ``(advantages, returns)``, zero on padding.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` zero past a row's last real token (the
    episode ends there), ``A_t = delta_t + gamma * lam * A_{t+1}``, ``returns = A + V``.
    """
    values = values * mask
    rewards = rewards * mask
    adv = torch.zeros_like(values)
    running = torch.zeros(values.shape[0], dtype=values.dtype)
    T = values.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, *, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` on real tokens, zero on padding (statistics passed in so a
    caller can take them over every rank's tokens)."""
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


@dataclass
class PolicyLoss:
    loss_sum: torch.Tensor  # summed over real tokens (the caller normalises)
    clipped: torch.Tensor  # number of tokens where the clipped branch was taken
    approx_kl_sum: torch.Tensor  # sum of 0.5 * (logp - old_logp)^2


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip: float) -> PolicyLoss:
    """PPO's clipped surrogate per token: ``max(-A * r, -A * clamp(r, 1 - clip, 1 + clip))``, ``r = exp(logp - old)``."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped)
    return PolicyLoss(
        loss_sum=masked_sum(loss, mask),
        clipped=masked_sum((clipped > unclipped).float(), mask).detach(),
        approx_kl_sum=masked_sum(0.5 * (logp - old_logp).detach() ** 2, mask),
    )


@dataclass
class ValueLoss:
    loss_sum: torch.Tensor  # summed over real tokens
    clipped: torch.Tensor  # tokens where the clipped value's error was the larger one


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               clip: float) -> ValueLoss:
    """``0.5 * max((V - R)^2, (V_clip - R)^2)`` with ``V_clip = old + clamp(V - old, -clip, clip)``."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    plain = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(plain, clipped)
    return ValueLoss(loss_sum=masked_sum(loss, mask), clipped=masked_sum((clipped > plain).float(), mask).detach())


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the softmax of ``logits`` ``(..., vocab)`` (fp32); ``-inf`` logits (banned
    tokens) contribute 0."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token]`` per position (fp32); ``logits`` ``(rows, T, vocab)``, ``tokens`` ``(rows, T)``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019, section 2.2).

    Adaptive: ``coef *= 1 + clamp(kl / target - 1, -0.2, 0.2) * n / horizon`` after each step that
    saw ``n`` rollouts with mean sequence KL ``kl``; the coefficient rises while KL is above target.
    """

    def __init__(self, *, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, *, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])
