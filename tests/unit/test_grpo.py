"""GRPO maths (vlmscale.losses.grpo) and rewards (vlmscale.eval.rewards) against hand-computed values."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from vlmscale.eval.rewards import RewardSet, exact_match_reward, iou_reward, load_reward, numeric_reward
from vlmscale.losses import grpo
from vlmscale.stages.grpo import split_conversation


# ---------------------------------------------------------------- advantages


def test_grpo_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    adv = grpo.group_advantages(r, mode="grpo", eps=0.0 + 1e-12)
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    assert adv[0].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # no variance: no signal (and no division by zero)
    assert grpo.zero_variance(r).tolist() == [False, True]


def test_dr_grpo_advantages_are_not_std_normalised():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert grpo.group_advantages(r, mode="dr_grpo").tolist() == [[0.75, -0.25, -0.25, -0.25]]
    with pytest.raises(ValueError, match="advantage mode"):
        grpo.group_advantages(r, mode="ppo")


# ---------------------------------------------------------------- the clipped loss


def test_clipped_loss_symmetric_and_asymmetric_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.7, 1.1]]))  # ratios 1.5, 0.7, 1.1
    mask = torch.ones(1, 3)
    pos = grpo.clipped_token_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2)
    # A > 0: min(r, clip(r)) = 1.2 (clipped), 0.7, 1.1
    assert pos.loss[0].tolist() == pytest.approx([-1.2, -0.7, -1.1])
    assert pos.clipped[0].tolist() == [1.0, 0.0, 0.0]
    neg = grpo.clipped_token_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.2)
    # A < 0: min(-r, -clip(r)) = -1.5, -0.8 (clipped), -1.1
    assert neg.loss[0].tolist() == pytest.approx([1.5, 0.8, 1.1])
    assert neg.clipped[0].tolist() == [0.0, 1.0, 0.0]
    dapo = grpo.clipped_token_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert dapo.loss[0].tolist() == pytest.approx([-1.28, -0.7, -1.1])  # clip-higher lets 1.5 reach 1.28


def test_kl_term_and_mask():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    kl = grpo.k3_kl(logp, ref)
    d = math.log(0.25) - math.log(0.5)
    assert kl[0].tolist() == pytest.approx([math.exp(d) - d - 1, 0.0])
    mask = torch.tensor([[1.0, 0.0]])
    out = grpo.clipped_token_loss(logp, logp.detach(), torch.tensor([0.0]), mask, clip_low=0.2, clip_high=0.2,
                                  kl=kl, kl_coef=0.1)
    assert out.loss[0].tolist() == pytest.approx([0.1 * kl[0, 0].item(), 0.0])


def test_clipped_loss_gradient_is_cut_where_clipped():
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    out = grpo.clipped_token_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), clip_low=0.2,
                                  clip_high=0.2)
    out.loss.sum().backward()
    assert logp.grad[0, 0] == 0.0 and logp.grad[0, 1] == pytest.approx(-1.1)


# ---------------------------------------------------------------- aggregation


def test_loss_aggregations_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    loss = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    w, n = grpo.aggregate_weights(mask, mode="token", max_new_tokens=8)
    assert float((loss * w).sum() / n) == pytest.approx(8.0 / 5)  # every token once
    w, n = grpo.aggregate_weights(mask, mode="sequence", max_new_tokens=8)
    assert float((loss * w).sum() / n) == pytest.approx((1.0 + 4.0) / 2)  # each sequence's mean, averaged
    w, n = grpo.aggregate_weights(mask, mode="constant", max_new_tokens=8)
    assert float((loss * w).sum() / n) == pytest.approx((4.0 / 8 + 4.0 / 8) / 2)  # Dr. GRPO: sums / max length
    empty = torch.zeros(2, 4)
    for mode in grpo.LOSS_AGGREGATIONS:
        assert float(grpo.aggregate_weights(empty, mode=mode, max_new_tokens=8)[1]) == 0.0


# ---------------------------------------------------------------- rewards


def _rec(reference: str) -> dict:
    return {"reference": reference}


def test_builtin_rewards():
    assert exact_match_reward(_rec("Red."), "red") == 1.0
    assert exact_match_reward(_rec("red"), "blue") == 0.0
    assert numeric_reward(_rec("3"), "there are 3 objects") == 1.0
    assert numeric_reward(_rec("3"), "4") == 0.0
    assert numeric_reward(_rec("3"), "three") == 0.0
    assert numeric_reward(_rec("left"), "3") is None
    ref = "<box>[0, 0, 500, 500]</box>"
    assert iou_reward(_rec(ref), "<box>[0, 0, 500, 500]</box>") == pytest.approx(1.0)
    assert iou_reward(_rec(ref), "<box>[0, 0, 0.5, 0.25]</box>") == pytest.approx(0.5)  # 0-1 convention
    assert iou_reward(_rec(ref), "<box>[0, 0, 500, 250]</box>") == pytest.approx(0.5)  # 0-999 grid
    assert iou_reward(_rec(ref), "somewhere") == 0.0
    assert iou_reward(_rec("red"), "<box>[0, 0, 1, 1]</box>") is None


def test_reward_set_combines_with_weights_and_logs_each(monkeypatch):
    mod = types.ModuleType("user_rewards_for_test")
    mod.length = lambda record, completion: float(len(completion))
    monkeypatch.setitem(sys.modules, "user_rewards_for_test", mod)
    rs = RewardSet.from_config({"exact_match": 1.0, "iou": 2.0, "user_rewards_for_test:length": 0.5, "numeric": 0.0})
    assert rs.names == ["exact_match", "iou", "user_rewards_for_test:length"]  # weight 0: not loaded
    total, per = rs.score([_rec("red"), _rec("<box>[0, 0, 500, 500]</box>")], ["red", "<box>[0, 0, 500, 250]</box>"])
    assert total == pytest.approx([1.0 + 0.5 * 3, 2.0 * 0.5 + 0.5 * 27])
    assert per["iou"][0] is None and per["iou"][1] == pytest.approx(0.5)
    assert per["exact_match"] == [1.0, 0.0]


def test_format_reward_and_errors():
    fmt = load_reward("format", format_pattern=r"^<box>.*</box>$")
    assert fmt(_rec("x"), "<box>[1, 2, 3, 4]</box>") == 1.0 and fmt(_rec("x"), "a box") == 0.0
    with pytest.raises(ValueError, match="unknown reward"):
        load_reward("bleu")
    with pytest.raises(ValueError, match="cannot import"):
        load_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="every reward weight 0"):
        RewardSet.from_config({"exact_match": 0.0})
    bad = RewardSet(names=["nan"], weights=[1.0], fns=[lambda r, c: float("nan")])
    with pytest.raises(ValueError, match="must be finite"):
        bad.score([_rec("a")], ["a"])


# ---------------------------------------------------------------- prompts and sampling


def test_split_conversation_takes_the_last_assistant_turn():
    rec = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                        {"role": "user", "content": [{"type": "text", "text": "q2"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": " a2 "}]}]}
    turns, ref = split_conversation(rec)
    assert len(turns) == 3 and ref == "a2"
    from vlmscale.data.render import BadSample
    with pytest.raises(BadSample):
        split_conversation({"messages": [{"role": "user", "content": "q"}]})


def test_config_errors_name_the_field():
    from vlmscale.config import ConfigError, GRPOConfig, load_config
    with pytest.raises(ConfigError, match="grpo.group_size"):
        load_config(GRPOConfig, overrides=["grpo.group_size=1"])
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size"):
        load_config(GRPOConfig, overrides=["grpo.prompts_per_rank=3", "grpo.group_size=3"])
    with pytest.raises(ConfigError, match="format_pattern"):
        load_config(GRPOConfig, overrides=["grpo.rewards={format: 1.0}"])
