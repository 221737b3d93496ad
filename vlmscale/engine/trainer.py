"""DeepSpeed engine creation, the optimizer step with window-normalised loss, and HF export."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import deepspeed
import torch

from vlmscale.config.schema import OptimConfig
from vlmscale.engine.distributed import all_reduce_sum, barrier
from vlmscale.engine.flops import FlopModel
from vlmscale.engine.zero import gathered_state_dict, start_micro_batch
from vlmscale.model.forward import num_supervised, token_losses, vlm_logits
from vlmscale.model.heads import ScalarHeadModel, save_head, split_state
from vlmscale.model.lora import merge_lora_state_dict
from vlmscale.model.tokenizer import ProcessorAssets

log = logging.getLogger(__name__)


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def create_engine(model: torch.nn.Module, *, param_groups: list[dict], ds_config: dict[str, Any],
                  optim: OptimConfig, max_steps: int):
    optimizer = torch.optim.AdamW(param_groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, warmup_steps=optim.warmup_steps, max_steps=max_steps, min_lr_ratio=optim.min_lr_ratio)
        )

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
        model_parameters=None, dist_init_required=False,
    )
    return engine, scheduler


class Objective(Protocol):
    """A training loss other than next-token prediction (e.g. ``vlmscale.preference.objectives``)."""

    def count(self, batch: dict) -> float:
        """Units of this micro-batch the loss is averaged over (pairs, tokens, ...)."""

    def __call__(self, model: torch.nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss summed over the batch's units, and statistics summed likewise (the same keys on every rank)."""


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    tokens: int  # non-pad tokens, all ranks
    slots: int  # token slots fed to the model (rows x padded length), all ranks
    supervised: int  # supervised tokens, all ranks
    samples: int  # samples trained, all ranks
    bad: int  # samples skipped this step, all ranks
    read: int  # samples read (trained + skipped), all ranks
    skipped: dict[str, int] = field(default_factory=dict)  # this rank's skips by reason
    update_skipped: bool = False  # non-finite loss or gradient on some rank: no rank applied the update
    sample_ids: list[str] = field(default_factory=list)  # this rank's samples in this step
    penalty: float = 0.0  # value of the ``before_step`` regularizer (e.g. EWC), all ranks
    flops: float = 0.0  # model FLOPs of this step (forward + backward), all ranks; see vlmscale.engine.flops
    units: int = 0  # what the loss is averaged over: supervised tokens, or the objective's count (e.g. pairs)
    extra: dict[str, float] = field(default_factory=dict)  # the objective's statistics, summed over the window and ranks


def train_step(engine, micro_batches: list[dict], *, device: torch.device, poison: bool = False,
               before_step: Callable[[], float] | None = None, flop_model: FlopModel | None = None,
               objective: Objective | None = None) -> StepStats:
    """One optimizer step over the accumulation window.

    The loss is normalised by the supervised-token count of the whole window on all ranks, so a
    token weighs the same whatever micro-batch or rank it lands in (DeepSpeed divides by the
    accumulation steps and averages over ranks; the scale below undoes both).

    Non-finite guard: before the last backward every rank learns whether any rank saw a non-finite
    loss in this window. If one did, every rank back-propagates NaN, so DeepSpeed's global
    gradient-norm check (which also catches non-finite gradients from finite losses) discards the
    update on all ranks alike: parameters, optimizer moments and the LR schedule stay as they were.
    ``poison`` makes this rank's loss NaN (fault injection for tests). ``flop_model`` counts the step's
    model FLOPs.

    ``before_step`` runs after the last backward and before the update: a regularizer adds its
    gradient to the reduced gradient there (so clipping and the optimizer see the sum) and returns
    this rank's share of its value, reported summed over ranks as ``penalty``.

    ``objective`` replaces next-token prediction (then the loss is normalised by its ``count`` of the
    window on all ranks, and its statistics come back summed in ``extra``).
    """
    local_sup = sum(num_supervised(b["labels"]) for b in micro_batches)
    local_units = local_sup if objective is None else sum(objective.count(b) for b in micro_batches)
    local_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    local_slots = sum(b["input_ids"].numel() for b in micro_batches)
    local_bad = sum(sum(b["skipped"].values()) for b in micro_batches)
    local_read = sum(b["num_read"] for b in micro_batches)
    local_samples = sum(len(b["sample_ids"]) for b in micro_batches)
    local_flops = sum(flop_model.batch_flops(b) for b in micro_batches) if flop_model is not None else 0.0
    total_sup, tokens, slots, bad, read, samples, flops, total_units = all_reduce_sum(
        [local_sup, local_tokens, local_slots, local_bad, local_read, local_samples, local_flops, local_units])
    world = engine.world_size if hasattr(engine, "world_size") else 1
    scale = world * engine.gradient_accumulation_steps() / max(total_units, 1.0)
    extra: dict[str, float] = {}
    skipped_before = engine.skipped_steps
    loss_sum, penalty, nonfinite_local, any_nonfinite = 0.0, 0.0, False, False
    for i, b in enumerate(micro_batches):
        start_micro_batch(engine)
        if objective is None:
            packed = b["position_ids"] is not None  # only the packing collate gives position ids
            logits = vlm_logits(
                engine.module,
                input_ids=b["input_ids"].to(device),
                attention_mask=b["attention_mask"].to(device),
                pixel_values=None if b["pixel_values"] is None else b["pixel_values"].to(device),
                position_ids=b["position_ids"].to(device) if packed else None,
                tile_pool=b.get("tile_pool"),
                packed=packed,
            )
            summed = token_losses(logits, b["labels"].to(device)).sum()
        else:
            summed, stats = objective(engine.module, b, device)
            for k, v in stats.items():
                extra[k] = extra.get(k, 0.0) + float(v)
        if poison:
            summed = summed * float("nan")
        nonfinite_local |= not math.isfinite(float(summed.detach()))
        loss = summed * scale
        if i == len(micro_batches) - 1:
            (flag,) = all_reduce_sum([float(nonfinite_local)])
            any_nonfinite = flag > 0
            if any_nonfinite:
                loss = loss * float("nan")
        engine.backward(loss)
        if before_step is not None and i == len(micro_batches) - 1:
            penalty = before_step()
        engine.step()
        loss_sum += float(summed.detach())
    update_skipped = engine.skipped_steps > skipped_before
    if any_nonfinite and not update_skipped:
        raise RuntimeError("a rank saw a non-finite loss but DeepSpeed applied the update; refusing to continue")
    keys = sorted(extra)
    global_loss, global_penalty, *global_extra = all_reduce_sum([loss_sum, penalty, *(extra[k] for k in keys)])
    grad_norm = engine.get_global_grad_norm()
    skipped: dict[str, int] = {}
    for b in micro_batches:
        for k, v in b["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    return StepStats(
        loss=global_loss / max(total_units, 1.0),
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        tokens=int(tokens), slots=int(slots), supervised=int(total_sup), samples=int(samples), bad=int(bad), read=int(read),
        skipped=skipped, update_skipped=update_skipped,
        sample_ids=[sid for b in micro_batches for sid in b["sample_ids"]], penalty=global_penalty, flops=float(flops),
        units=int(total_units), extra=dict(zip(keys, global_extra)),
    )


def export_hf(engine, *, assets: ProcessorAssets, out_dir: str | Path, meta: dict[str, Any],
              lora_scaling: float | None = None) -> Path | None:
    """Write safetensors weights, config, tokenizer and processor to ``out_dir`` (collective).

    With ``lora_scaling`` the adapters are merged into the base weights first. A
    :class:`ScalarHeadModel` is written as its VLM's export plus ``score_head.safetensors``.
    """
    t0 = time.time()
    out = Path(out_dir)
    state = gathered_state_dict(engine)
    if state is not None:
        if lora_scaling is not None:
            state = merge_lora_state_dict(state, scaling=lora_scaling)
        out.mkdir(parents=True, exist_ok=True)
        model = engine.module
        if isinstance(model, ScalarHeadModel):
            state, head = split_state(state)
            save_head(head, out)
            model = model.vlm
        model.config.dtype = next(iter(state.values())).dtype
        # transformers records the key renamings it applied when this model was loaded and
        # re-applies them in reverse on save; with an explicit state_dict that doubles prefixes
        # (``language_model.model.model.*``). Saving without the record gives the standard layout.
        loaded_with = getattr(model, "_weight_conversions", None)
        model._weight_conversions = None
        try:
            model.save_pretrained(out, state_dict=state)
        finally:
            model._weight_conversions = loaded_with
        model.generation_config.save_pretrained(out)
        assets.save(out)
        (out / "vlmscale.json").write_text(json.dumps(meta, indent=2))
        log.info("exported %s in %.1fs", out, time.time() - t0)
    barrier()
    return out
