"""PPO's maths against hand-computed numbers (vlmscale.losses.ppo)."""

import math

import pytest
import torch

from vlmscale.losses.ppo import (
    KLController,
    entropy,
    gae,
    policy_loss,
    token_logprobs,
    token_rewards,
    value_loss,
    whiten,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_hand_computed():
    # gamma 1, lam 0.5: deltas 0.9, 0.1 - 0.2, 0.2 - 0.5; A2 = 0.9, A1 = -0.1 + 0.45, A0 = -0.3 + 0.5 * 0.35
    adv, ret = gae(t([[0, 0, 1]]), t([[0.5, 0.2, 0.1]]), t([[1, 1, 1]]), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, t([[-0.125, 0.35, 0.9]]))
    assert torch.allclose(ret, t([[0.375, 0.55, 1.0]]))


def test_gae_ends_the_episode_at_the_last_real_token():
    # the padded value 9 must not leak back: V past the end is 0
    adv, ret = gae(t([[0, 2, 5]]), t([[1, 1, 9]]), t([[1, 1, 0]]), gamma=0.9, lam=1.0)
    assert torch.allclose(adv, t([[0.8, 1.0, 0.0]]))  # A1 = 2 - 1, A0 = 0.9 * 1 - 1 + 0.9 * 1
    assert torch.allclose(ret, t([[1.8, 2.0, 0.0]]))


def test_token_rewards_put_the_score_on_the_last_real_token():
    rewards, kl = token_rewards(t([1.5, -1.0]), t([[-1, -2, 0], [-1, 0, 0]]), t([[-1.5, -1, 0], [-1, 0, 0]]),
                                t([[1, 1, 0], [1, 0, 0]]), kl_coef=0.1)
    assert torch.allclose(kl, t([[0.5, -1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, t([[-0.05, 0.1 + 1.5, 0.0], [-1.0, 0.0, 0.0]]))


def test_clipped_policy_loss_hand_computed():
    logp = torch.log(t([[1.5, 0.5, 1.0, 0.5]]))
    adv = t([[1, 1, -2, -1]])
    out = policy_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4), clip=0.2)
    # per token: max(-A r, -A clip(r)) = max(-1.5, -1.2), max(-0.5, -0.8), max(2, 2), max(0.5, 0.8)
    assert out.loss_sum.item() == pytest.approx(-1.2 - 0.5 + 2.0 + 0.8, abs=1e-6)
    assert out.clipped.item() == 2
    expected_kl = 0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.5, 1.0, 0.5))
    assert out.approx_kl_sum.item() == pytest.approx(expected_kl, rel=1e-5)


def test_clipped_policy_loss_gradient_vanishes_where_clipped():
    logp = torch.log(t([[1.5, 0.9]])).requires_grad_(True)
    policy_loss(logp, torch.zeros(1, 2), t([[1, 1]]), torch.ones(1, 2), clip=0.2).loss_sum.backward()
    assert logp.grad[0, 0].item() == 0.0  # ratio 1.5 > 1.2 with A > 0: clipped, no gradient
    assert logp.grad[0, 1].item() == pytest.approx(-0.9)  # d(-A r)/dlogp = -A r


def test_padding_does_not_count():
    out = policy_loss(t([[0.3, 5.0]]), t([[0.0, 0.0]]), t([[1.0, 100.0]]), t([[1, 0]]), clip=0.2)
    assert out.loss_sum.item() == pytest.approx(-1.2) and out.clipped.item() == 1


def test_clipped_value_loss_hand_computed():
    out = value_loss(t([[1.0, 0.0]]), t([[0.5, 0.0]]), t([[2.0, 1.0]]), t([[1, 1]]), clip=0.2)
    # token 0: V_clip = 0.7, max((1-2)^2, (0.7-2)^2) = 1.69; token 1: max(1, 1) = 1
    assert out.loss_sum.item() == pytest.approx(0.5 * 1.69 + 0.5 * 1.0)
    assert out.clipped.item() == 1


def test_whiten_uses_the_given_statistics_and_zeroes_padding():
    out = whiten(t([[1, 3, 100]]), t([[1, 1, 0]]), mean=torch.tensor(2.0), var=torch.tensor(1.0))
    assert torch.allclose(out, t([[-1, 1, 0]]), atol=1e-6)


def test_logprobs_and_entropy():
    logits = torch.log(t([[[0.25, 0.25, 0.5]]]))
    assert token_logprobs(logits, torch.tensor([[2]])).item() == pytest.approx(math.log(0.5))
    assert entropy(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))


def test_kl_controller_fixed_and_adaptive():
    fixed = KLController(coef=0.1, target=None, horizon=10)
    fixed.update(5.0, n=5)
    assert fixed.coef == 0.1
    adaptive = KLController(coef=0.1, target=1.0, horizon=10)
    adaptive.update(2.0, n=5)  # error clamped to +0.2: x (1 + 0.2 * 5 / 10)
    assert adaptive.coef == pytest.approx(0.11)
    adaptive.update(0.9, n=5)  # error -0.1: x (1 - 0.1 * 5 / 10)
    assert adaptive.coef == pytest.approx(0.11 * 0.95)
    restored = KLController(coef=0.5, target=1.0, horizon=10)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.coef == adaptive.coef


def test_entropy_ignores_banned_tokens():
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert entropy(logits).item() == pytest.approx(math.log(2))
