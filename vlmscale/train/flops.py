"""Model FLOPs per training step, achieved TFLOP/s and MFU.

FLOPs are analytic, from the InternVL config and the step's actual work: the tiles the vision
encoder sees, the image tokens the projector maps, and the real (non-pad) tokens of every sequence
the LLM reads. A matmul of ``(m, k) @ (k, n)`` is ``2 m n k``; attention adds ``QK^T`` and ``AV``,
``2 * 2 * s^2 * d`` per layer for a sequence (or packed sample) of ``s`` real tokens, the full square
as dense kernels compute it. Norms, activations, softmax, biases and the loss are not counted
(a few percent at the tiny preset, well under 1% at real sizes).

Backward follows what autograd does, layer by layer along the graph (vision embedding -> vision
layers -> projector -> token embedding -> LLM layers -> lm_head):

- weight gradients (= forward) for matmuls whose weight trains;
- input gradients (= forward for a matmul, 2x forward for attention) wherever something earlier in the
  graph trains, or the layer itself trains (it opens with a trained norm), so a frozen module between
  trained ones still back-propagates, and a frozen encoder under a trained projector does not.

Padding and the blank tile of a text-only micro-batch are real compute but not model work: they are
left out, so they show as lost MFU (as with any useful-FLOPs accounting). LoRA adapters' own matmuls
are not counted, and a layer with adapters counts input gradients for all its matmuls (the first
adapted layer's q/k/v input gradients are over-counted).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch

from vlmscale.model.forward import num_supervised
from vlmscale.precision import torch_dtype

log = logging.getLogger(__name__)

# dense peak per device (TFLOP/s) by precision, from the vendor data sheets (SXM parts): bf16/fp16 tensor
# cores; fp32 without TF32 (torch's default for matmuls). Checked in order: the first key in the device
# name wins ("H100 PCIe" before "H100").
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H800": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "A800": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}


def _trains(module: torch.nn.Module, *, weights_only: bool = False) -> bool:
    for name, p in module.named_parameters():
        if weights_only and ("lora_" in name or len(getattr(p, "ds_shape", p.shape)) < 2):
            continue
        if p.requires_grad:
            return True
    return False


@dataclass(frozen=True)
class Unit:
    """One stretch of the graph: its forward FLOPs per item, and what its backward must do."""

    name: str
    module: str  # vision | projector | llm
    weight_grads: bool  # its matmul weights train
    input_grads: bool  # something earlier in the graph, or the layer itself, trains


@dataclass(frozen=True)
class FlopModel:
    """Dimensions and the trainability of each unit, read once from the model after the policy is applied."""

    # vision encoder (per tile)
    patches: int  # patches per tile (the encoder adds one CLS token)
    patch_in: int  # 3 * patch^2
    v_hidden: int
    v_intermediate: int
    # projector (per image token, after pixel shuffle)
    proj_in: int
    # LLM
    hidden: int
    q_dim: int  # heads * head_dim
    kv_dim: int  # kv_heads * head_dim
    intermediate: int
    vocab: int
    image_seq_length: int
    units: tuple[Unit, ...]

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "FlopModel":
        cfg = model.config
        vc, tc = cfg.vision_config, cfg.text_config
        img, patch = vc.image_size, vc.patch_size
        img = img[0] if isinstance(img, (list, tuple)) else img
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        inner = model.model
        vision = inner.vision_tower
        ordered = [("vision.embed", "vision", vision.embeddings)]
        ordered += [(f"vision.layer.{i}", "vision", layer) for i, layer in enumerate(vision.encoder.layer)]
        ordered += [("projector", "projector", inner.multi_modal_projector),
                    ("llm.embed", "llm", inner.language_model.embed_tokens)]
        ordered += [(f"llm.layer.{i}", "llm", layer) for i, layer in enumerate(inner.language_model.layers)]
        ordered += [("lm_head", "llm", model.lm_head)]
        units, upstream = [], False
        for name, module, mod in ordered:
            trains = _trains(mod)
            # a layer (or the projector) opens with a norm whose weights train with it, so all its
            # matmuls pass gradients down; the patch embedding and lm_head are a single matmul each
            within = trains and name not in ("vision.embed", "llm.embed", "lm_head")
            units.append(Unit(name, module, weight_grads=_trains(mod, weights_only=True), input_grads=upstream or within))
            upstream = upstream or trains
        scale = int(round(1 / cfg.downsample_ratio)) ** 2
        return cls(
            patches=(img // patch) ** 2, patch_in=3 * patch * patch, v_hidden=vc.hidden_size,
            v_intermediate=vc.intermediate_size, proj_in=vc.hidden_size * scale,
            hidden=tc.hidden_size, q_dim=tc.num_attention_heads * head_dim, kv_dim=tc.num_key_value_heads * head_dim,
            intermediate=tc.intermediate_size, vocab=tc.vocab_size, image_seq_length=cfg.image_seq_length,
            units=tuple(units),
        )

    # ------------------------------------------------------------------ forward FLOPs per unit
    def _unit_forward(self, unit: Unit, *, tiles: int, seq_lens: list[int], head_tokens: int | None) -> tuple[float, float]:
        """``(matmul FLOPs, attention FLOPs)`` of one unit's forward for this much work."""
        if unit.name == "vision.embed":
            return 2.0 * tiles * self.patches * self.patch_in * self.v_hidden, 0.0
        if unit.name.startswith("vision.layer."):
            s, h = self.patches + 1, self.v_hidden
            linear = 2.0 * tiles * s * (4 * h * h + 2 * h * self.v_intermediate)
            return linear, 4.0 * tiles * s * s * h
        if unit.name == "projector":
            return 2.0 * tiles * self.image_seq_length * (self.proj_in * self.hidden + self.hidden * self.hidden), 0.0
        tokens = sum(seq_lens)
        if unit.name.startswith("llm.layer."):
            h = self.hidden
            linear = 2.0 * tokens * (2 * h * self.q_dim + 2 * h * self.kv_dim + 3 * h * self.intermediate)
            return linear, 4.0 * sum(s * s for s in seq_lens) * self.q_dim
        if unit.name == "lm_head":
            return 2.0 * (tokens if head_tokens is None else head_tokens) * self.hidden * self.vocab, 0.0
        return 0.0, 0.0  # token embedding: a lookup

    def count(self, *, tiles: int, seq_lens: list[int], head_tokens: int | None = None) -> dict[str, float]:
        """FLOPs of one forward + backward, by module (``vision``, ``projector``, ``llm``) and ``total``.

        ``head_tokens``: positions the LM head runs on (training computes logits only where a label is
        supervised, see ``vlmscale.model.forward.supervised_loss_sum``); None = every real token.
        """
        out = {"vision": 0.0, "projector": 0.0, "llm": 0.0}
        for unit in self.units:
            linear, attention = self._unit_forward(unit, tiles=tiles, seq_lens=seq_lens, head_tokens=head_tokens)
            flops = linear + attention
            if unit.weight_grads:
                flops += linear
            if unit.input_grads:
                flops += linear + 2 * attention
            out[unit.module] += flops
        out["total"] = sum(out.values())
        return out

    def batch_flops(self, batch: dict) -> float:
        """This micro-batch's forward + backward FLOPs (one rank)."""
        tiles = 0 if batch.get("pixel_values") is None else int(batch["pixel_values"].shape[0])
        head = None if batch.get("labels") is None else num_supervised(batch["labels"])
        return self.count(tiles=tiles, seq_lens=sequence_lengths(batch), head_tokens=head)["total"]


def sequence_lengths(batch: dict) -> list[int]:
    """Real-token length of every sequence: per row, or per packed sample (positions restart at 0)."""
    mask = batch["attention_mask"].bool()
    positions = batch.get("position_ids")
    if positions is None:
        return [int(n) for n in mask.sum(1).tolist()]
    lens: list[int] = []
    for row_pos, row_mask in zip(positions.tolist(), mask.tolist()):
        run = 0
        for pos, real in zip(row_pos, row_mask):
            if pos == 0 and run:
                lens.append(run)
                run = 0
            run += int(real)
        if run:
            lens.append(run)
    return lens


# ---------------------------------------------------------------------- peak
@functools.lru_cache(maxsize=4)
def measured_cpu_peak_tflops(dtype: torch.dtype = torch.bfloat16, *, sizes: tuple[int, ...] = (512, 1024, 2048),
                             seconds: float = 0.3) -> float:
    """Matmul TFLOP/s this process reaches in ``dtype`` with its own threads: the best of repeated
    ``F.linear`` timings (the model's own kernel) over a few square sizes, as CPU kernels peak at
    different sizes per dtype."""
    best = 0.0
    for size in sizes:
        x, w = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.nn.functional.linear(x, w)
        deadline = time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = max(best, 2.0 * size**3 / max(time.perf_counter() - t0, 1e-9))
    return best / 1e12


def device_peak_tflops(override: float | None = None, precision: str = "bf16") -> tuple[float, str]:
    """Peak TFLOP/s of this rank's device in ``precision`` (bf16 | fp16 | fp32) and where the figure comes from."""
    if override:
        return float(override), "configured"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peaks in PEAK_TFLOPS.items():
            if key in name and precision in peaks:
                return peaks[precision], f"table ({name}, {precision})"
        log.warning("no %s peak on record for %s; MFU is not reported (set train.peak_tflops)", precision, name)
        return float("nan"), f"unknown ({name}, {precision})"
    dtype = torch_dtype(precision)
    return measured_cpu_peak_tflops(dtype), f"measured (CPU {precision} matmul, {_threads(torch.get_num_threads())})"


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")
