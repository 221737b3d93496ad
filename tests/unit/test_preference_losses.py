"""Preference losses against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vlmscale.constants import IGNORE
from vlmscale.losses.preference import bradley_terry_loss, dpo_loss, sequence_logps, sft_loss, token_logps


def test_bradley_terry_matches_hand_computation():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + e^-d) for d = 1, 0, -2
    want = [math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.exp(2))]
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx([0.3132617, 0.6931472, 2.1269280], rel=1e-6)


def test_bradley_terry_gradient_pushes_the_scores_apart():
    chosen, rejected = torch.tensor([0.5], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    bradley_terry_loss(chosen, rejected).sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)  # -(1 - sigmoid(0))


def test_dpo_matches_hand_computation():
    # pi_c - ref_c = -10 - (-12) = 2, pi_r - ref_r = -20 - (-19) = -1; beta 0.1 -> rewards 0.2, -0.1, margin 0.3
    losses, chosen, rejected = dpo_loss(torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]),
                                        torch.tensor([-19.0]), beta=0.1)
    assert chosen.item() == pytest.approx(0.2) and rejected.item() == pytest.approx(-0.1)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.3)), rel=1e-6)  # 0.5543552
    assert losses.item() == pytest.approx(0.5543552, rel=1e-6)


def test_dpo_at_the_reference_is_log_two_and_its_gradient_is_beta_over_two():
    pc, pr = torch.tensor([-3.0], requires_grad=True), torch.tensor([-4.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-4.0]), beta=0.5)
    losses.sum().backward()
    assert losses.item() == pytest.approx(math.log(2))
    assert pc.grad.item() == pytest.approx(-0.25) and pr.grad.item() == pytest.approx(0.25)  # -beta * (1 - sigmoid(0))


def _logits_for(probs: list[list[float]]) -> torch.Tensor:
    """Logits (1, L, V) whose softmax rows are ``probs`` (then shifted: row t predicts token t + 1)."""
    return torch.tensor(probs).log().unsqueeze(0)


def test_token_and_sequence_logps_with_dense_weighting():
    # vocabulary of 2; tokens [x, 1, 0, 1]; positions 1..3 supervised except position 2 (the prompt)
    logits = _logits_for([[0.5, 0.5], [0.8, 0.2], [0.25, 0.75], [0.5, 0.5]])
    labels = torch.tensor([[IGNORE, 1, IGNORE, 1]])
    tlp = token_logps(logits, labels)
    assert tlp[0].tolist() == pytest.approx([math.log(0.5), 0.0, math.log(0.75)], rel=1e-6)
    plain = sequence_logps(tlp, labels)
    assert plain.item() == pytest.approx(math.log(0.5) + math.log(0.75), rel=1e-6)
    changed = torch.tensor([[False, False, False, True]])  # the last answer token differs from the other answer
    dense = sequence_logps(tlp, labels, changed=changed, segment_weight=5.0)
    # RLHF-V: (sum_unchanged + 5 * sum_changed) / (n_unchanged + 5 * n_changed) = (log .5 + 5 log .75) / 6
    assert dense.item() == pytest.approx((math.log(0.5) + 5 * math.log(0.75)) / 6, rel=1e-6)
    assert sequence_logps(tlp, labels, changed=changed, segment_weight=1.0).item() == pytest.approx(plain.item())
    assert sft_loss(tlp, labels).item() == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2, rel=1e-6)


def test_preference_configs_validate_and_reject_what_they_cannot_do():
    from vlmscale.config import ConfigError, DPOConfig, RewardConfig, load_config

    dpo = load_config(DPOConfig, overrides=["dpo.beta=0.2", "dpo.reference=live", "dpo.segment_weight=5"])
    assert dpo.stage == "dpo" and dpo.dpo.reference == "live" and dpo.data.sources[0].path == "demo:train/pref"
    assert load_config(RewardConfig).model.init_from == "runs/sft-demo/hf"
    for cls, override, field in [(DPOConfig, "dpo.beta=0", "dpo.beta"), (DPOConfig, "dpo.reference=online", "dpo.reference"),
                                 (DPOConfig, "data.packing=true", "data.packing"), (RewardConfig, "eval.suites=[pope]", "eval.suites"),
                                 (RewardConfig, "lora.enabled=true", "lora.enabled")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(cls, overrides=[override])
