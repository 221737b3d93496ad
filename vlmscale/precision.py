"""Training precision: which one a run uses (``train.precision``), and why.

``auto`` picks by hardware:

- CUDA: bf16 where the GPU has native bf16 (compute capability >= 8.0: A100, H100, L4, ...), else fp16
  with DeepSpeed's dynamic loss scaling (V100, T4); fp32 master weights either way;
- CPU: bf16 only where the CPU computes it natively (AVX512-BF16 or AMX on x86, the BF16 extension on
  Arm), read from the CPU's feature flags; where the flags cannot be read, a short bf16-vs-fp32 matmul
  decides. Elsewhere fp32: emulated bf16 runs 10-80x slower than fp32 there.

On resume the checkpoint's precision is what its optimizer state was saved in. ``auto`` keeps it where
the hardware can run it (a warning says when that is slow); an explicit ``train.precision`` that
contradicts it, or hardware that cannot run it, is a configuration error (exit 2) raised in the
pre-launch checks, before any model is built, since DeepSpeed names its ZeRO optimizer files by precision and cannot load one
precision's files into another's engine.

Every place that picks a dtype (training, eval, generation, the Fisher estimate, the DPO reference
cache, PPO's engines, ``vlmscale plan``) calls :func:`torch_dtype` on the resolved precision.
"""

from __future__ import annotations

import functools
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# bf16 on a CPU counts as native when it is at least this fast as fp32 (measured fallback only)
NATIVE_SPEEDUP = 1.0


@dataclass(frozen=True)
class Decision:
    precision: str  # bf16 | fp16 | fp32
    reason: str  # one line for the log
    slow: bool = False  # the hardware runs this precision, but emulated (a warning on resume)


def torch_dtype(precision: str) -> torch.dtype:
    """The parameter/activation dtype of a resolved precision (``auto`` resolves by hardware first)."""
    if precision == "auto":
        precision = hardware_precision().precision
    return _DTYPES[precision]


def name_of(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


# ------------------------------------------------------------------ what the hardware offers
def _cpu_flags() -> set[str] | None:
    """Feature flags of the first CPU in /proc/cpuinfo (``flags`` on x86, ``Features`` on Arm), or None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _matmul_rate(dtype: torch.dtype, *, size: int = 256, seconds: float = 0.15) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2.0 * size**3 / max(time.perf_counter() - t0, 1e-9))
    return best


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and how that was found out."""
    flags = _cpu_flags()
    if flags is not None:
        native = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512-BF16 / AMX; Arm BF16
        if native:
            return True, f"CPU '{cpu_model()}' has native bf16 ({', '.join(native)})"
        if flags & {"avx2", "avx512f", "asimd", "sse4_2"}:  # flags were read and name the vector units
            return False, f"CPU '{cpu_model()}' has no native bf16 (no avx512_bf16/amx_bf16 flag)"
    bf16, fp32 = _matmul_rate(torch.bfloat16), _matmul_rate(torch.float32)
    native = bf16 >= NATIVE_SPEEDUP * fp32
    return native, (f"CPU '{cpu_model()}': bf16 matmul measured at {bf16 / fp32:.2f}x fp32 "
                    f"({'native' if native else 'emulated'})")


def cuda_capability() -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def hardware_precision() -> Decision:
    """What ``auto`` picks on this process's device, ignoring any checkpoint."""
    cap = cuda_capability()
    if cap is not None:
        name = torch.cuda.get_device_name()
        if cap >= (8, 0):
            return Decision("bf16", f"GPU {name} (compute capability {cap[0]}.{cap[1]}) has native bf16")
        return Decision("fp16", f"GPU {name} (compute capability {cap[0]}.{cap[1]}) has no native bf16: fp16 "
                                "with dynamic loss scaling, fp32 master weights")
    native, why = cpu_bf16()
    return Decision("bf16" if native else "fp32", why)


def can_run(precision: str) -> tuple[bool, bool]:
    """``(runs at all, runs fast)`` for ``precision`` on this process's device."""
    cap = cuda_capability()
    if cap is not None:
        if precision == "bf16":
            return cap >= (8, 0), cap >= (8, 0)
        return True, True
    if precision == "fp16":
        return False, False  # DeepSpeed's fp16 loss scaling is a GPU path
    if precision == "bf16":
        return True, cpu_bf16()[0]
    return True, True


# ------------------------------------------------------------------ the decision
class PrecisionError(ValueError):
    """A precision the hardware or the checkpoint rules out (a configuration error: exit 2)."""


def resolve(requested: str, *, checkpoint: str | None = None, checkpoint_path: str | Path | None = None) -> Decision:
    """The precision a run uses. ``checkpoint``: the precision of the checkpoint it resumes, if any."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"train.precision={requested!r}: expected one of {', '.join(PRECISIONS)}")
    where = f" ({checkpoint_path})" if checkpoint_path else ""
    if requested != "auto":
        runs, _ = can_run(requested)
        if not runs:
            hint = hardware_precision().precision
            raise PrecisionError(f"train.precision={requested} cannot run on this device "
                                 f"({'fp16 needs a CUDA GPU' if requested == 'fp16' else 'no native bf16 on this GPU'}); "
                                 f"set train.precision=auto (picks {hint} here)")
        if checkpoint is not None and checkpoint != requested:
            raise PrecisionError(
                f"train.precision={requested} but the checkpoint to resume{where} was trained in {checkpoint}, and "
                f"DeepSpeed cannot load its optimizer state into a {requested} engine. Set train.precision="
                f"{checkpoint} (or auto) to resume it, or start a new run in {requested} with a new output_dir or "
                f"resume=never")
        return Decision(requested, "set by train.precision" + (f"; the checkpoint agrees" if checkpoint else ""))
    hw = hardware_precision()
    if checkpoint is None or checkpoint == hw.precision:
        return Decision(hw.precision, hw.reason + ("; the checkpoint agrees" if checkpoint else ""))
    runs, fast = can_run(checkpoint)
    if not runs:
        raise PrecisionError(
            f"the checkpoint to resume{where} was trained in {checkpoint}, which this device cannot run "
            f"({hw.reason}). Resume it on hardware that runs {checkpoint}, or start a new run here with a new "
            f"output_dir (or resume=never)")
    return Decision(checkpoint, f"kept the checkpoint's {checkpoint} (train.precision=auto; this hardware alone "
                                f"would pick {hw.precision}: {hw.reason})", slow=not fast)


def checkpoint_precision(tag_dir: str | Path, meta: dict | None = None) -> str | None:
    """The precision a committed checkpoint was trained in: recorded in COMMITTED, or for checkpoints
    written before it was recorded, read off DeepSpeed's ZeRO file names (``bf16_zero_pp_rank_*`` for
    bf16; ``zero_pp_rank_*`` for fp32 and fp16, told apart by the saved loss scaler)."""
    if meta and meta.get("precision"):
        return meta["precision"]
    tag_dir = Path(tag_dir)
    if any(tag_dir.glob("bf16_zero_pp_rank_*_optim_states.pt")):
        return "bf16"
    if any(tag_dir.glob("zero_pp_rank_*_optim_states.pt")):
        return "fp32"  # an fp16 checkpoint written before precision was recorded reads as fp32 here
    return None


def ds_sections(precision: str) -> dict[str, dict]:
    """The DeepSpeed JSON precision sections for a resolved precision."""
    return {"bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"}}


FP16_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1}
