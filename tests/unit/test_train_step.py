"""The optimizer step under ZeRO-3 (in process, world size 1): the gradient it applies."""

from __future__ import annotations

import torch
from deepspeed.utils import safe_get_local_grad

from tests.unit.engines import batches, zero3_engine
from vlmscale.model.build import load_pretrained
from vlmscale.model.forward import num_supervised, token_losses, vlm_logits
from vlmscale.train.step import train_step


def test_accumulated_gradient_is_the_whole_windows_gradient(process_group, tiny_export, demo_dir):
    """Two micro-batches of one step: DeepSpeed must add their gradients, not keep the last one."""
    engine, assets = zero3_engine(tiny_export, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0), grad_accum_steps=2,
                                  policy=["policy.vision.trainable=true"])
    micro = batches(demo_dir / "train" / "vqa", assets, [[0], [1]])
    seen: dict[str, torch.Tensor] = {}
    step = engine.step

    def capture_then_step():  # the last call sees the gradient the update uses
        seen.update({n: safe_get_local_grad(p).clone() for n, p in engine.module.named_parameters() if p.requires_grad})
        step()

    engine.step = capture_then_step
    train_step(engine, micro, device=torch.device("cpu"))

    ref, _ = load_pretrained(str(tiny_export), max_tiles=None, dtype=torch.float32)
    total = sum(num_supervised(b["labels"]) for b in micro)
    for b in micro:
        logits = vlm_logits(ref, input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            pixel_values=b["pixel_values"], tile_pool=b["tile_pool"])
        (token_losses(logits, b["labels"]).sum() / total).backward()
    params = dict(ref.named_parameters())
    assert seen.keys() == params.keys()  # vision, projector and LLM all train
    for name, g in seen.items():
        want = params[name].grad.flatten()
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), name
