"""ZeRO-3 model scoping, partition-aware weight loading and consolidated state dicts."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import deepspeed
import torch
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from vlmscale.config.deepspeed import build_ds_config, zero_stage
from vlmscale.model.build import LazyTensor, copy_into


@contextlib.contextmanager
def zero3_model_scope(ds_config: dict[str, Any]) -> Iterator[None]:
    """While inside, transformers creates and loads models already ZeRO-3 partitioned.

    ``HfDeepSpeedConfig`` acts through a global; it is scoped here so that nothing built
    afterwards (e.g. an eval model) is partitioned by accident.
    """
    if zero_stage(ds_config) != 3:
        yield
        return
    holder = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay alive in this scope
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def zero3_config(path: str, *, world_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed JSON at ``path`` filled for one sample per rank, no clipping and ``dtype``, for models
    run outside a training stage (evaluation, the Fisher estimate); it must be ZeRO-3."""
    from vlmscale.config import RunConfig, load_config
    from vlmscale.precision import name_of

    cfg = load_config(RunConfig, overrides=[f"deepspeed.config={path}", "train.micro_batch_size=1",
                                            "train.grad_accum_steps=1", f"train.precision={name_of(dtype)}",
                                            "optim.max_grad_norm=0"])
    ds = build_ds_config(cfg, world_size=world_size)
    if zero_stage(ds) != 3:
        raise ValueError(f"--deepspeed {path}: this runs under ZeRO-3 (zero_optimization.stage 3)")
    return ds


def start_micro_batch(engine) -> None:
    """What ``engine(...)`` does before a forward, for callers that run the model's sub-modules directly.

    DeepSpeed does both from hooks on the top module, which ``vlmscale.model.forward.vlm_logits``
    never calls:

    - ZeRO optimizers count micro-batches there: ZeRO-3 copies the first micro-batch's gradient into
      its partition buffer and adds the later ones. Without the count every backward counts as the
      first, so gradient accumulation would keep only the last micro-batch.
    - ZeRO-3's parameter coordinator starts a new step there. Without it the coordinator never
      completes its trace of the fetch order, so it never prefetches and its recorded order grows
      every step.
    """
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if isinstance(engine.optimizer, ZeROOptimizer):
        engine.optimizer.clear_backward_seen_flag()
    offload = _offload_of(engine)
    if offload is not None:
        offload.get_param_coordinator().reset_step()


def _offload_of(engine):
    """The engine's ZeRO-3 parameter offload (which owns the parameter coordinator), or None."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    if isinstance(engine.optimizer, DeepSpeedZeRoOffload):  # a ZeRO-3 engine without optimizer (frozen model)
        return engine.optimizer
    return getattr(engine.optimizer, "parameter_offload", None)


def remember_coordinator(engine) -> None:
    """Let :func:`start_forward` find the engine's parameter coordinator from ``engine.module`` alone."""
    offload = _offload_of(engine)
    if offload is not None:
        engine.module.__dict__["_vlmscale_zero_offload"] = offload  # not a sub-module or parameter


def start_forward(module: torch.nn.Module) -> bool:
    """For code that runs a ZeRO-3 model's sub-modules itself outside a train step (generation): what the
    top module's forward pre-hook does, the coordinator's ``reset_step``, before each forward. Without it
    the coordinator never completes a trace of the fetch order, so per-layer gathers never prefetch.
    Collective while the trace is incomplete (DeepSpeed checks that ranks recorded the same order): call
    it on every rank for every forward, as lock-step generation does. False (nothing done) for a model that is not partitioned or
    whose engine was not built by ``create_engine``/``frozen_engine``."""
    offload = module.__dict__.get("_vlmscale_zero_offload")
    if offload is None:
        return False
    offload.get_param_coordinator().reset_step()
    return True


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def load_weights(model: torch.nn.Module, weights: dict[str, LazyTensor]) -> None:
    """Copy named tensors into a model whose parameters may be ZeRO-3 partitioned.

    Each parameter is gathered, written on rank 0 and re-partitioned (``modifier_rank=0``), so no
    rank ever holds more than one full parameter at a time.
    """
    params = dict(model.named_parameters())
    unknown = [k for k in weights if k not in params]
    if unknown:
        raise ValueError(f"weights do not fit the model: unexpected keys {unknown[:5]}")
    for name, value in weights.items():
        p = params[name]
        if is_partitioned(p):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    with torch.no_grad():
                        copy_into(p, value.load(), name=name)
        else:
            with torch.no_grad():
                copy_into(p, value.load(), name=name)


def gathered_units(units: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor] | None]:
    """Each group of tensors whole on rank 0, one group at a time (None elsewhere). Collective: every
    rank iterates to the end. ZeRO-3 gathers a group's parameters (``GatheredParameters``) on entry and
    frees them when the next group is asked for, so no rank holds more than one group beyond its
    partition; the tensors yielded are valid until then (copy what you keep)."""
    rank = torch.distributed.get_rank()
    for unit in units:
        partitioned = [t for t in unit.values() if is_partitioned(t)]
        scope = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None) if partitioned else contextlib.nullcontext()
        with scope:
            yield {k: t.detach() for k, t in unit.items()} if rank == 0 else None


def gathered_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full 16-bit state dict on rank 0 (None elsewhere), all at once: rank 0 holds the whole model
    (``benchmarks/export_memory.py`` compares it with the streaming export). Collective."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if torch.distributed.get_rank() == 0 else None
    if torch.distributed.get_rank() != 0:
        return None
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def local_param_share(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements in the model): ~1/world under ZeRO-3, all otherwise."""
    held = total = 0
    for p in model.parameters():
        if is_partitioned(p):
            held += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            held += p.numel()
            total += p.numel()
    return held, total


# ---------------------------------------------------------------- a rank's own partition of a parameter
#
# ZeRO-3 flattens every parameter and gives rank r the elements [r * n, (r + 1) * n) with
# n = ceil(numel / world); the last rank's slice is padded with zeros past ``numel``. The optimizer
# keeps an fp32 master copy and a gradient buffer of exactly that slice. These helpers read and
# write that slice without gathering anything (``deepspeed.utils.safe_*_local_*``).


def local_range(p: torch.Tensor) -> tuple[int, int, int]:
    """``(start, size, real)`` of this rank's slice of the flattened parameter: it covers elements
    ``[start, start + size)``, of which the first ``real`` exist (the rest is padding)."""
    assert is_partitioned(p), "local_range needs a ZeRO-3 partitioned parameter"
    size = p.ds_tensor.numel()
    start = p.ds_zero_partition_rank * size
    return start, size, max(0, min(size, p.ds_numel - start))


def local_fp32_param(p: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the fp32 master weights (a view: do not modify)."""
    return deepspeed.utils.safe_get_local_fp32_param(p)


def local_grad(p: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the reduced gradient as fp32: a copy under bf16, the buffer itself under
    fp32 (do not modify it in place; write with :func:`set_local_grad`)."""
    return deepspeed.utils.safe_get_local_grad(p)


def set_local_grad(p: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite this rank's slice of the reduced gradient (between the last backward and the step)."""
    deepspeed.utils.safe_set_local_grad(p, value)


@contextlib.contextmanager
def partitioned_init(ds_config: dict[str, Any]) -> Iterator[None]:
    """Modules constructed inside are ZeRO-3 partitioned as they are built (e.g. a head added to a
    model that ``zero3_model_scope`` already partitioned); a no-op below stage 3."""
    if zero_stage(ds_config) != 3:
        yield
        return
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        yield


def frozen_engine(model: torch.nn.Module, ds_config: dict[str, Any]):
    """A DeepSpeed engine without optimizer for a frozen model (e.g. DPO's live reference).

    Under ZeRO-3 its parameters stay partitioned and are gathered per module in forward, like the
    trained model's; drive it with :func:`start_micro_batch` before each forward, under ``torch.no_grad``.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False)
    engine.eval()
    remember_coordinator(engine)
    return engine
