"""Fill a DeepSpeed JSON from the run config.

The run config is the one source of truth for batch sizes, gradient clipping and precision
(``train.precision``; ``auto`` resolved by hardware, see ``vlmscale.precision``).
A DeepSpeed JSON may leave those fields out or set them to "auto"; a concrete value that
disagrees with the run config is an error, never a silent override.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from vlmscale.config.load import ConfigError
from vlmscale.config.schema import RunConfig
from vlmscale.precision import FP16_DEFAULTS, ds_sections, hardware_precision

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_ds_path(path: str) -> Path:
    """A DeepSpeed JSON path relative to the working directory or to the vlmscale checkout."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"deepspeed.config={path!r}: no such file (ship one from ds_configs/, e.g. ds_configs/zero3.json)")


def _check_field(ds: dict[str, Any], key: str, want: Any, source: str) -> None:
    have = ds.get(key, "auto")
    if have != "auto" and have != want:
        raise ConfigError(
            f"DeepSpeed JSON sets {key}={have!r} but the run config gives {want!r} ({source}); "
            f"set it to \"auto\" or remove it from the JSON and change {source} instead"
        )
    ds[key] = want


# DeepSpeed's decoupled checkpoint engine with its plain Python file writer. Its "fast" writer needs libaio
# (DeepSpeed's AsyncIOBuilder) and pinned memory on an accelerator; the Python writer needs neither.
ASYNC_WRITER = {"type": "python", "decoupled": True}


def build_ds_config(cfg: RunConfig, *, world_size: int) -> dict[str, Any]:
    path = resolve_ds_path(cfg.deepspeed.config)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config={str(path)!r} is not valid JSON: {exc}") from exc
    ds = copy.deepcopy(raw)
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise ConfigError(
                f"{path}: remove the '{owned}' section; vlmscale builds it from optim.* "
                "so per-module learning rates and resume stay consistent"
            )
    train = cfg.train
    global_batch = train.micro_batch_size * train.grad_accum_steps * world_size
    if train.global_batch_size is not None and train.global_batch_size != global_batch:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} but micro_batch_size({train.micro_batch_size}) x "
            f"grad_accum_steps({train.grad_accum_steps}) x world_size({world_size}) = {global_batch}; "
            f"{batch_fix(want=train.global_batch_size, micro_batch_size=train.micro_batch_size, world_size=world_size)}"
        )
    _check_field(ds, "train_micro_batch_size_per_gpu", train.micro_batch_size, "train.micro_batch_size")
    _check_field(ds, "gradient_accumulation_steps", train.grad_accum_steps, "train.grad_accum_steps")
    _check_field(ds, "train_batch_size", global_batch, "train.micro_batch_size x grad_accum_steps x world")
    _check_field(ds, "gradient_clipping", cfg.optim.max_grad_norm, "optim.max_grad_norm")
    precision = train.precision if train.precision != "auto" else hardware_precision().precision
    for prec, on in ds_sections(precision).items():
        section = ds.setdefault(prec, {})
        have = section.get("enabled", "auto")
        if have != "auto" and have != on["enabled"]:
            raise ConfigError(f"{path}: {prec}.enabled={have} contradicts train.precision={precision}"
                              f"{' (picked by auto for this hardware)' if train.precision == 'auto' else ''}; "
                              f"set {prec}.enabled to \"auto\" in the JSON, or change train.precision")
        section["enabled"] = on["enabled"]
        if prec == "fp16" and on["enabled"]:
            for key, value in FP16_DEFAULTS.items():  # dynamic loss scaling unless the JSON sets its own
                section.setdefault(key, value)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0-3")
    if cfg.checkpoint.async_save:
        writer = ds.setdefault("checkpoint", {}).get("writer")
        if writer is not None and writer != ASYNC_WRITER:
            raise ConfigError(f"{path}: checkpoint.writer={writer} is set in the JSON and checkpoint.async_save=true sets "
                              f"it to {ASYNC_WRITER}; remove one of them")
        ds["checkpoint"]["writer"] = dict(ASYNC_WRITER)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    # vlmscale normalises the loss over the whole accumulation window itself (see vlmscale.train.step.train_step).
    ds["zero_allow_untested_optimizer"] = True
    return ds


def batch_fix(*, want: int, micro_batch_size: int, world_size: int) -> str:
    """How to reach a global batch of ``want`` samples on ``world_size`` ranks: the ``grad_accum_steps`` that
    fits, or the per-rank product to choose when none does."""
    per = micro_batch_size * world_size
    if want % per == 0:
        return f"set train.grad_accum_steps={want // per}"
    return f"choose train.micro_batch_size x train.grad_accum_steps = {want / world_size:g} per rank"


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
