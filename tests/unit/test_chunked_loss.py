"""Chunked LM head + cross-entropy (train.loss_chunk_tokens): the same loss and gradients as the whole
micro-batch at once, in plain PyTorch and under ZeRO-3."""

from __future__ import annotations

import pytest
import torch
from deepspeed.utils import safe_get_local_grad

from tests.unit.engines import batches, zero3_engine
from vlmscale.constants import IGNORE
from vlmscale.model.build import load_pretrained
from vlmscale.model.forward import enable_chunked_loss, num_supervised, supervised_loss_sum, token_losses, vlm_logits
from vlmscale.train.step import train_step


class _Holder(torch.nn.Module):
    def __init__(self, hidden: int, vocab: int, bias: bool):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 44])
def test_chunked_matches_whole_loss_and_gradients(chunk, bias):
    torch.manual_seed(0)
    model = _Holder(16, 97, bias)
    hidden = torch.randn(3, 20, 16, requires_grad=True)
    labels = torch.randint(0, 97, (3, 20))
    labels[0, :5] = IGNORE
    labels[2, 12:] = IGNORE

    def run(chunk_tokens):
        model.zero_grad()
        hidden.grad = None
        loss = supervised_loss_sum(model, hidden, labels, chunk_tokens=chunk_tokens)
        (loss * 0.37).backward()
        return loss.detach(), hidden.grad.clone(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_h, ref_p = run(0)
    enable_chunked_loss(model, chunk)
    loss, h, p = run(None)
    assert int((labels[:, 1:] != IGNORE).sum()) > chunk  # the chunked path ran
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h, ref_h, rtol=1e-6, atol=1e-6)
    for got, want in zip(p, ref_p):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # and the reference token-level cross-entropy agrees
    logits = model.lm_head(hidden)
    torch.testing.assert_close(loss, token_losses(logits, labels).sum().detach(), rtol=1e-6, atol=1e-5)


def test_head_without_labels_is_the_linear_layer():
    model = _Holder(8, 11, False)
    x = torch.randn(4, 8)
    want = model.lm_head(x)
    enable_chunked_loss(model, 2)
    torch.testing.assert_close(model.lm_head(x), want)
    assert set(model.state_dict()) == {"lm_head.weight"}


def test_negative_chunk_names_the_field():
    with pytest.raises(ValueError, match="train.loss_chunk_tokens"):
        enable_chunked_loss(_Holder(4, 5, False), -1)


def test_chunked_gradient_under_zero3(process_group, tiny_export, demo_dir):
    """ZeRO-3 (lm_head partitioned, gathered inside its forward): the applied gradient equals the plain
    unchunked model's, chunks of 3 supervised positions."""
    engine, assets = zero3_engine(tiny_export, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0), grad_accum_steps=2)
    enable_chunked_loss(engine.module, 3)
    micro = batches(demo_dir / "train" / "vqa", assets, [[0, 1], [2]])
    assert all(num_supervised(b["labels"]) > 3 for b in micro)
    seen: dict[str, torch.Tensor] = {}
    step = engine.step

    def capture_then_step():
        seen.update({n: safe_get_local_grad(p).clone() for n, p in engine.module.named_parameters() if p.requires_grad})
        step()

    engine.step = capture_then_step
    stats = train_step(engine, micro, device=torch.device("cpu"))

    ref, _ = load_pretrained(str(tiny_export), max_tiles=None, dtype=torch.float32)
    total = sum(num_supervised(b["labels"]) for b in micro)
    ref_loss = 0.0
    for b in micro:
        logits = vlm_logits(ref, input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            pixel_values=b["pixel_values"], tile_pool=b["tile_pool"])
        loss = token_losses(logits, b["labels"]).sum() / total
        ref_loss += float(loss)
        loss.backward()
    assert abs(stats.loss - ref_loss) < 1e-5 * max(1.0, ref_loss)
    params = dict(ref.named_parameters())
    assert "lm_head.weight" in seen or "model.language_model.embed_tokens.weight" in seen
    for name, g in seen.items():
        want = params[name].grad.flatten()
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), name
