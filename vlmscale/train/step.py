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
from vlmscale.distributed.group import all_reduce_max, all_reduce_sum, barrier
from vlmscale.distributed.zero import gathered_units, remember_coordinator, start_micro_batch
from vlmscale.train.async_save import writer_processes
from vlmscale.model.forward import num_supervised, supervised_loss_sum, vlm_hidden
from vlmscale.model.heads import ScalarHeadModel, save_head, split_state
from vlmscale.model.lora import export_units, merge_lora_state_dict
from vlmscale.model.shards import ShardWriter, disk_name
from vlmscale.config.load import parse_size
from vlmscale.model.tokenizer import ProcessorAssets
from vlmscale.train.flops import FlopModel

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

    with writer_processes(ds_config):  # checkpoint.async_save: DeepSpeed's writer process per rank
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
            model_parameters=None, dist_init_required=False,
        )
    if engine.checkpoint_engine is not None and engine.checkpoint_engine.is_decoupled():
        # its writer process waits for an exit message that only cleanup() sends, and multiprocessing's own exit
        # handler joins it: without this the rank never exits. atexit runs handlers last-in first-out, so this
        # one runs before multiprocessing's.
        import atexit

        atexit.register(engine.checkpoint_engine.cleanup)
    remember_coordinator(engine)  # generation from engine.module resets the fetch trace per forward
    return engine, scheduler


class Objective(Protocol):
    """A training loss other than next-token prediction (e.g. ``vlmscale.stages.objectives``)."""

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
    flops: float = 0.0  # model FLOPs of this step (forward + backward), all ranks; see vlmscale.train.flops
    units: int = 0  # what the loss is averaged over: supervised tokens, or the objective's count (e.g. pairs)
    extra: dict[str, float] = field(default_factory=dict)  # the objective's statistics, summed over the window and ranks
    # balance (data.balance): the largest rank's FLOPs this step, and each rank's compute time, as process CPU
    # seconds (waiting at a collective costs none; on a GPU the host time says nothing, so NaN): sum and max
    rank_flops_max: float = 0.0
    busy_sum: float = float("nan")
    busy_max: float = float("nan")


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
    busy_start = time.process_time()
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
            hidden = vlm_hidden(
                engine.module,
                input_ids=b["input_ids"].to(device),
                attention_mask=b["attention_mask"].to(device),
                pixel_values=None if b["pixel_values"] is None else b["pixel_values"].to(device),
                position_ids=b["position_ids"].to(device) if packed else None,
                tile_pool=b.get("tile_pool"),
                packed=packed,
            )
            summed = supervised_loss_sum(engine.module, hidden, b["labels"].to(device))
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
    busy = time.process_time() - busy_start if device.type == "cpu" else float("nan")
    global_loss, global_penalty, busy_sum, *global_extra = all_reduce_sum([loss_sum, penalty, busy, *(extra[k] for k in keys)])
    flops_max, busy_max = all_reduce_max([local_flops, busy])
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
        rank_flops_max=float(flops_max), busy_sum=busy_sum, busy_max=busy_max,
    )


def export_hf(engine, *, assets: ProcessorAssets, out_dir: str | Path, meta: dict[str, Any],
              lora_scaling: float | None = None, shard_size: str = "5GB") -> Path:
    """Write safetensors shards of at most ``shard_size`` (+ ``model.safetensors.index.json``), config,
    tokenizer and processor to ``out_dir`` (collective).

    Parameters are gathered module by module (a LoRA-adapted layer with its adapters, which
    ``lora_scaling`` merges into the base weight) and written by rank 0 as each shard fills, so rank 0
    holds at most about one shard of gathered weights beyond its partition. A :class:`ScalarHeadModel`
    is written as its VLM's export plus ``score_head.safetensors``. A failure while writing is raised on
    every rank after the last collective, never leaving the others waiting in a gather.
    """
    t0 = time.time()
    out = Path(out_dir)
    model = engine.module
    vlm = model.vlm if isinstance(model, ScalarHeadModel) else model
    is_main = torch.distributed.get_rank() == 0
    writer = ShardWriter(out, max_bytes=parse_size(shard_size)) if is_main else None
    head: dict[str, torch.Tensor] = {}
    dtype, failure = None, None
    for unit in gathered_units(export_units(model)):
        if unit is None or failure is not None:
            continue
        try:
            if lora_scaling is not None:
                unit = merge_lora_state_dict(unit, scaling=lora_scaling)
            if isinstance(model, ScalarHeadModel):
                vlm_part, head_part = split_state(unit)
                head |= {k: t.to("cpu", copy=True) for k, t in head_part.items()}
                unit = vlm_part
            for name, tensor in unit.items():
                dtype = dtype or tensor.dtype
                writer.add(disk_name(name), tensor)
        except Exception as exc:  # re-raised below on every rank
            failure = exc
    if is_main and failure is None:
        try:
            writer.close()
            if head:
                save_head(head, out)
            vlm.config.dtype = dtype
            vlm.config.architectures = [type(vlm).__name__]
            vlm.config.save_pretrained(out)
            vlm.generation_config.save_pretrained(out)
            assets.save(out)
            (out / "vlmscale.json").write_text(json.dumps(meta, indent=2))
            log.info("exported %s (%d shard(s), %.2f GB) in %.1fs", out, len(writer.files), writer.total / 1e9,
                     time.time() - t0)
        except Exception as exc:
            failure = exc
    (failed,) = all_reduce_sum([float(failure is not None)])
    if failed:
        if failure is not None:
            raise failure
        raise RuntimeError(f"export to {out} failed on rank 0 (see its log)")
    barrier()
    return out
