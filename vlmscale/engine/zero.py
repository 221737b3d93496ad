"""ZeRO-3 model scoping, partition-aware weight loading and consolidated state dicts."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import deepspeed
import torch
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from vlmscale.config.deepspeed import zero_stage
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


def gathered_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full 16-bit state dict on rank 0 (None elsewhere). Collective: call on every rank."""
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


def start_forward(engine) -> None:
    """Tell ZeRO-3 that a new forward + backward begins.

    DeepSpeed does this from a pre-forward hook on the top module, but the training forward
    (``vlmscale.model.forward.vlm_logits``) calls the sub-modules, never the top module: without this
    the parameter coordinator never completes its trace of the fetch order, so it never prefetches and
    its recorded order grows every step.
    """
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is not None:
        offload.get_param_coordinator().reset_step()
