"""FLOP accounting: a hand count for the tiny preset, and torch's own FLOP counter on a real step."""

import math
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmscale.config import SFTConfig, load_config
from vlmscale.distributed.group import DistInfo
from vlmscale.model.build import build_model, load_weights_plain
from vlmscale.model.forward import token_losses, vlm_logits
from vlmscale.train.flops import FlopModel, device_peak_tflops, sequence_lengths
from vlmscale.train.progress import Progress
from vlmscale.train.step import StepStats


def _model(attn="eager"):
    torch.manual_seed(0)
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny", f"model.attn_implementation={attn}"])
    model, _ = build_model(cfg.model, max_tiles=4, dtype=torch.float32, load_weights=load_weights_plain)
    return model


def _freeze(model, *, vision: bool, projector: bool = True, llm: bool = True):
    for name, p in model.named_parameters():
        if name.startswith("model.vision_tower."):
            p.requires_grad_(vision)
        elif name.startswith("model.multi_modal_projector."):
            p.requires_grad_(projector)
        else:
            p.requires_grad_(llm)


def _batch(model, *, rows=2, length=40, tiles_per_row=1):
    torch.manual_seed(1)
    img, seq = model.config.image_token_id, model.config.image_seq_length
    ids = torch.randint(5, 500, (rows, length))
    ids[ids == img] = 7
    ids[:, 2:2 + seq * tiles_per_row] = img
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(rows * tiles_per_row, 3, 32, 32)}


def _counted(model, b) -> int:
    with FlopCounterMode(display=False) as counter:
        logits = vlm_logits(model, input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
        token_losses(logits, b["input_ids"]).sum().backward()
    return counter.get_total_flops()


def test_hand_count_tiny_preset():
    # tiny: 32-px tiles of 8-px patches -> 16 patches (+ CLS = 17 tokens), vision hidden 32, MLP 128, 2 layers;
    # projector 128 -> 32 -> 32 on 4 tokens per tile; LLM hidden 32, q 32, kv 16, MLP 64, 2 layers, vocab 512.
    fm = FlopModel.from_model(_model())
    assert fm.vocab == 512
    tiles, lens = 2, [40, 40]
    vision_fwd = 2 * tiles * 16 * 192 * 32 + 2 * (2 * tiles * 17 * (4 * 32 * 32 + 2 * 32 * 128) + 4 * tiles * 17**2 * 32)
    projector_fwd = 2 * tiles * 4 * (128 * 32 + 32 * 32)
    layer_linear = 2 * 80 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)
    layer_attn = 4 * (40**2 + 40**2) * 32
    llm_fwd_linear = 2 * layer_linear + 2 * 80 * 32 * 512
    llm_fwd_attn = 2 * layer_attn

    _freeze(fm_model := _model(), vision=False)
    frozen = FlopModel.from_model(fm_model).count(tiles=tiles, seq_lens=lens)
    assert frozen["vision"] == vision_fwd  # frozen, nothing trained below it: forward only
    assert frozen["projector"] == 3 * projector_fwd  # trained, opens with a trained norm: weight + input grads
    assert frozen["llm"] == 3 * llm_fwd_linear + 3 * llm_fwd_attn

    _freeze(fm_model, vision=True)
    full = FlopModel.from_model(fm_model).count(tiles=tiles, seq_lens=lens)
    patch_fwd = 2 * tiles * 16 * 192 * 32
    # the patch embedding has pixels below it: weight gradients only
    assert full["vision"] == 2 * patch_fwd + 3 * (vision_fwd - patch_fwd)

    _freeze(fm_model, vision=False, projector=False, llm=True)
    llm_only = FlopModel.from_model(fm_model).count(tiles=tiles, seq_lens=lens)
    assert llm_only["projector"] == projector_fwd


@pytest.mark.parametrize("vision", [True, False])
def test_matches_torch_flop_counter(vision):
    """Eager attention so that torch counts the score/value matmuls too; the counter skips norms and
    activations as we do, so the two agree exactly here (tolerance 1% for future kernels)."""
    model = _model()
    _freeze(model, vision=vision)
    b = _batch(model)
    ours = FlopModel.from_model(model).batch_flops(b)
    assert ours == pytest.approx(_counted(model, b), rel=0.01)


def test_partially_unfrozen_encoder_matches_torch():
    model = _model()
    _freeze(model, vision=False)
    for p in model.model.vision_tower.encoder.layer[1].parameters():
        p.requires_grad_(True)
    b = _batch(model)
    ours = FlopModel.from_model(model).batch_flops(b)
    assert ours == pytest.approx(_counted(model, b), rel=0.01)


def test_sequence_lengths_padded_and_packed():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert sequence_lengths({"attention_mask": mask}) == [3, 2]
    packed = {"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}
    assert sequence_lengths(packed) == [3, 2]


def _row(peak: float, flops: float) -> dict:
    progress = Progress({}, dist=DistInfo(rank=0, world_size=1, local_rank=0), peak_tflops=peak)
    stats = StepStats(loss=1.0, grad_norm=1.0, tokens=10, slots=10, supervised=5, samples=1, bad=0, read=1, flops=flops)
    progress.update(stats, step=1, data=load_config(SFTConfig, overrides=[]).data, max_consecutive_nonfinite=5)
    time.sleep(0.01)
    return progress.record(1, stats, lr=1e-3)


def test_metrics_row_has_tflops_and_mfu():
    row = _row(peak=2.0, flops=1e9)  # well under 2 TFLOP/s over >= 10 ms
    assert row["tflops"] > 0 and row["mfu"] == pytest.approx(row["tflops"] / 2.0)


def test_mfu_never_exceeds_one(caplog):
    """A window faster than the (too low) peak reports MFU 1 and says the peak is off, once."""
    row = _row(peak=1e-6, flops=1e12)
    assert row["mfu"] == pytest.approx(1.0)
    assert "underestimates" in caplog.text


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_peak_is_measured_in_the_run_precision(precision):
    peak, source = device_peak_tflops(None, precision)
    assert math.isfinite(peak) and peak > 0 and f"CPU {precision} matmul" in source


def test_peak_is_measured_on_cpu_or_configured():
    assert device_peak_tflops(123.0) == (123.0, "configured")
    peak, source = device_peak_tflops()
    assert math.isfinite(peak) and peak > 0 and source.startswith("measured")
