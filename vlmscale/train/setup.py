"""Shared recipe plumbing: from a validated config to a ready engine, data loader and resume point."""

from __future__ import annotations

import functools
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from vlmscale.config.deepspeed import build_ds_config
from vlmscale.config.load import to_dict
from vlmscale.config.schema import ModelConfig, RunConfig
from vlmscale.data.dataset import (
    BalancedStepBatchSampler,
    NormalisingLoader,
    StepBatchSampler,
    TrainDataset,
    collate,
    image_options,
    open_sources,
    pack_collate,
    probe_sizes,
)
from vlmscale.data.fingerprint import FINGERPRINT, data_fingerprint
from vlmscale.data.preference import PairDataset, pair_collate
from vlmscale.distributed.group import DistInfo, barrier, cpu_group, init_distributed
from vlmscale.distributed.zero import load_weights, local_param_share, zero3_model_scope
from vlmscale.model.build import build_architecture, build_model, save_architecture
from vlmscale.model.checkpointing import enable_activation_checkpointing
from vlmscale.model.forward import enable_chunked_loss
from vlmscale.model.lora import add_lora
from vlmscale.model.policy import apply_policy
from vlmscale.model.tokenizer import ProcessorAssets
from vlmscale.precision import resolve, torch_dtype
from vlmscale.train import safe_load
from vlmscale.train.flops import FlopModel
from vlmscale.train.checkpoint import CheckpointManager, ResumeError
from vlmscale.train.metrics import MetricsLogger, SampleLog, setup_logging
from vlmscale.train.preemption import ignore_stop_signals
from vlmscale.train.step import create_engine

log = logging.getLogger(__name__)


# DataLoader workers come from a fork server above this much rewritten host state per rank (worker_context)
FORKSERVER_ABOVE_BYTES = 1 << 30


def host_state_bytes(model, ds_config: dict[str, Any], *, cuda: bool | None = None) -> int:
    """Bytes of model state this rank keeps in host memory: its 16-bit parameter partitions, and for
    trained parameters the fp32 master weights and Adam moments that every optimizer step rewrites.
    On a GPU only what ZeRO offloads to the CPU counts."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    zero = ds_config.get("zero_optimization", {})
    params_on_host = not cuda or (zero.get("offload_param") or {}).get("device") == "cpu"
    optimizer_on_host = not cuda or (zero.get("offload_optimizer") or {}).get("device") == "cpu"
    total = 0
    for p in model.parameters():
        n = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        total += 2 * n * params_on_host + 12 * n * (optimizer_on_host and p.requires_grad)
    return total


def worker_context(host_bytes: int):
    """Where DataLoader workers come from: forked from the rank, or, above ``FORKSERVER_ABOVE_BYTES`` of
    host-resident model state, from a small server process.

    A worker forked from the rank shares the rank's pages copy-on-write and keeps the old copy of every
    page the rank writes afterwards. Where the model states live in host memory (a CPU run, or ZeRO
    offload) every optimizer step rewrites them, so each worker ends up holding a second copy (2.01 GB
    per 2 GB of rewritten state in ``benchmarks/worker_memory.py``). The server imports the recipe and
    the data pipeline once, then forks each worker from itself; starting it costs about 3 s, which small
    models are spared."""
    if host_bytes <= FORKSERVER_ABOVE_BYTES:
        return None
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "vlmscale.data.dataset", "vlmscale.train.preemption"])
    log.info("DataLoader workers start from a fork server: %.1f GB of model state in this rank's host memory "
             "would be copied into each forked worker as the optimizer rewrites it", host_bytes / 1e9)
    return ctx


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Run:
    cfg: RunConfig
    dist: DistInfo
    ds_config: dict[str, Any]
    engine: Any
    assets: ProcessorAssets
    checkpoints: CheckpointManager
    metrics: MetricsLogger
    start_step: int
    client_state: dict[str, Any]


def start_run(cfg: RunConfig) -> tuple[DistInfo, dict[str, Any]]:
    """Process group, logging, the filled DeepSpeed config, ``config.yaml`` and the seeds."""
    dist = init_distributed()
    setup_logging(dist.rank)
    if not torch.cuda.is_available():
        log.info("CPU intra-op threads per rank: %d (OMP_NUM_THREADS=%s; a rank's share of this node's cores "
                 "unless set)", torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS", "unset"))
    log_precision(cfg)
    ds_config = build_ds_config(cfg, world_size=dist.world_size)
    out = Path(cfg.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    seed_everything(cfg.train.seed)
    return dist, ds_config


def log_precision(cfg: RunConfig) -> None:
    """Say which precision the run uses and why (``recipe_main`` resolved it before any process group)."""
    from vlmscale.train.launch import precision_decision

    decision = precision_decision()
    if decision is None:  # not started through recipe_main (tests, scripts): resolve by hardware now
        decision = resolve(cfg.train.precision)
        cfg.train.precision = decision.precision
    log.info("precision: %s (%s)", decision.precision, decision.reason)
    if decision.slow:
        log.warning("this device emulates %s, which runs many times slower than fp32 here; a new run with "
                    "train.precision=auto would use fp32", decision.precision)


def build_partitioned(model_cfg: ModelConfig, *, ds_config: dict[str, Any], max_tiles: int | None, dtype: torch.dtype,
                      name: str = "model", architecture: Path | None = None):
    """``build_model`` inside the ZeRO-3 scope: no rank ever holds the whole model. ``architecture``: a
    checkpoint's ``<tag>/model`` (resuming it): the model is built from it with no weights read and no random
    initialisation, since the checkpoint replaces every tensor (``model.init_from`` is not read at all)."""
    with zero3_model_scope(ds_config):
        if architecture is not None:
            model, assets = build_architecture(architecture, max_tiles=max_tiles, dtype=dtype,
                                               attn_implementation=model_cfg.attn_implementation)
        else:
            model, assets = build_model(model_cfg, max_tiles=max_tiles, dtype=dtype, load_weights=load_weights)
    held, total = local_param_share(model)
    log.info("%s parameters on this rank after build: %s of %s (%.0f%%)", name, f"{held:,}", f"{total:,}",
             100 * held / max(total, 1))
    return model, assets


def open_checkpoints(cfg: RunConfig, dist: DistInfo) -> CheckpointManager:
    """The run's checkpoint manager, torn saves removed (collective). A fresh run (``resume=never``) over
    an earlier one's history moves it aside with ``checkpoint.overwrite=true`` (without it, the launch
    stopped before: ``vlmscale.train.launch.check_paths``)."""
    checkpoints = CheckpointManager(Path(cfg.output_dir), dist=dist, keep_last=cfg.checkpoint.keep_last)
    checkpoints.extra_files[FINGERPRINT] = json.dumps(data_fingerprint(cfg.data, seed=cfg.train.seed), indent=1)
    if dist.is_main:
        if cfg.resume == "never" and cfg.checkpoint.overwrite and checkpoints.has_history():
            checkpoints.move_history_aside()
        checkpoints.clean_partial()
    barrier()
    return checkpoints


def find_resume(cfg: RunConfig, checkpoints: CheckpointManager,
                ds_config: dict[str, Any]) -> tuple[str | None, bool, dict[str, Any]]:
    """The checkpoint ``cfg.resume`` names (or None), whether another number of ranks saved it, and the
    DeepSpeed config to create the engine with (collective). A checkpoint from another world size is
    converted once to DeepSpeed's universal format, which the engine must be created to load."""
    tag = checkpoints.find(cfg.resume)
    universal = tag is not None and checkpoints.meta(tag)["world_size"] != checkpoints.dist.world_size
    if universal:
        if checkpoints.dist.is_main:
            checkpoints.prepare_universal(tag)
        barrier()
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    return tag, universal, ds_config


def load_resume(cfg: RunConfig, checkpoints: CheckpointManager, engine, tag: str | None, *, universal: bool = False,
                extra_engines: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """``(start step, client state)`` after loading ``tag`` (none: a fresh start)."""
    dist = checkpoints.dist
    if tag is None:
        if cfg.resume == "auto":
            log.info("no checkpoint in %s: starting from scratch", checkpoints.root)
        return 0, {}
    client = checkpoints.load(engine, tag, universal=universal, extra_engines=extra_engines)
    start_step = int(client["step"])
    log.info("resumed from %s at step %d (%d samples seen)%s", tag, start_step, client.get("samples_seen", 0),
             f"; saved by {checkpoints.meta(tag)['world_size']} ranks, now {dist.world_size}" if universal else "")
    if universal and dist.is_main:
        SampleLog.drop_absent_ranks(Path(cfg.output_dir), world_size=dist.world_size, resume_step=start_step)
    return start_step, client


def resume(cfg: RunConfig, checkpoints: CheckpointManager, engine,
           extra_engines: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """Resume engines created already (e.g. PPO's): only from a checkpoint saved by this many ranks."""
    tag = checkpoints.find(cfg.resume)
    if tag is not None and checkpoints.meta(tag)["world_size"] != checkpoints.dist.world_size:
        raise ResumeError(f"{checkpoints.root / tag} was saved by {checkpoints.meta(tag)['world_size']} ranks; this "
                          f"run has {checkpoints.dist.world_size}. Resume it with the world size that saved it")
    return load_resume(cfg, checkpoints, engine, tag, extra_engines=extra_engines)


def _model_source(cfg: RunConfig) -> str:
    m = cfg.model
    return (f"model.init_from={m.init_from}" if m.init_from else
            f"model.vision={m.vision} + model.llm={m.llm}" if m.vision else f"model.preset={m.preset}")


def setup_run(cfg: RunConfig, *, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Run:
    """Process group, model (partitioned under ZeRO-3), policy, engine, and resume.

    ``wrap`` turns the built VLM into the trained module (e.g. ``vlmscale.model.heads.ScalarHeadModel``)
    after activation checkpointing and LoRA are applied to the VLM, before the policy and the engine.
    """
    dist, ds_config = start_run(cfg)
    dtype = torch_dtype(cfg.train.precision)
    checkpoints = open_checkpoints(cfg, dist)
    tag, universal, ds_config = find_resume(cfg, checkpoints, ds_config)
    architecture = checkpoints.architecture_dir(tag) if tag is not None else None
    if tag is not None:
        log.info("building the model from %s (no weights read from %s)" if architecture is not None else
                 "%s predates checkpoints that hold their architecture: building from %s, then loading the checkpoint",
                 architecture or checkpoints.root / tag, _model_source(cfg))
    model, assets = build_partitioned(cfg.model, ds_config=ds_config, max_tiles=cfg.tile_limit(), dtype=dtype,
                                      architecture=architecture)
    vlm = model
    checkpoints.architecture = functools.partial(save_architecture, vlm, assets)
    ac = cfg.train.activation_checkpointing
    enable_activation_checkpointing(model, llm=ac.llm, vision=ac.vision)
    enable_chunked_loss(model, cfg.train.loss_chunk_tokens)
    if cfg.lora.enabled:
        add_lora(model, cfg.lora)
    if wrap is not None:
        model = wrap(model)
    groups, summary = apply_policy(model, cfg.policy, base_lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                   lora=cfg.lora.enabled)
    log.info("parameter policy (%s):\n%s", cfg.stage, summary.table())
    if universal and architecture is not None:  # a universal load restores the optimizer's parameters only
        load_weights(model, checkpoints.frozen_weights(tag))
    engine, _ = create_engine(model, param_groups=groups, ds_config=ds_config, optim=cfg.optim, max_steps=cfg.train.max_steps)
    safe_load.install(engine)
    start_step, client = load_resume(cfg, checkpoints, engine, tag, universal=universal)
    metrics = MetricsLogger(Path(cfg.output_dir), enabled=dist.is_main, resume_step=start_step)
    return Run(cfg, dist, ds_config, engine, assets, checkpoints, metrics, start_step, client)


def make_loader(run: Run, *, pairs: bool = False, start_step: int | None = None) -> NormalisingLoader:
    """Each rank's micro-batches from ``start_step`` (default: the resume step) to ``train.max_steps``;
    ``pairs``: preference pairs (``vlmscale.data.preference``) instead of single samples."""
    cfg = run.cfg
    sources = open_sources(cfg.data)
    weights = cfg.data.mixture_weights()
    if run.dist.is_main:
        total = sum(weights)
        log.info("data mixture: %s", ", ".join(f"{s.name or s.path} {w / total:.1%}" for s, w in zip(cfg.data.sources, weights)))
    dataset = (PairDataset if pairs else TrainDataset)(
        sources=sources,
        names=[s.name or s.path for s in cfg.data.sources],
        weights=weights,
        assets=run.assets,
        max_seq_len=cfg.data.max_seq_len,
        seed=cfg.train.seed,
        video=cfg.data.video,
        image_options=image_options(cfg.data, tile_limit=cfg.tile_limit(), raw=True),  # uint8 across the worker boundary
    )
    steps = dict(rank=run.dist.rank, world_size=run.dist.world_size, micro_batch_size=cfg.train.micro_batch_size,
                 grad_accum_steps=cfg.train.grad_accum_steps,
                 start_step=run.start_step if start_step is None else start_step, max_steps=cfg.train.max_steps)
    if cfg.data.balance == "none" or pairs:
        sampler = StepBatchSampler(**steps)
    else:
        flops = FlopModel.from_model(run.engine.module) if cfg.data.balance == "flops" else None
        sampler = BalancedStepBatchSampler(probe=probe_sizes(dataset), mode=cfg.data.balance, packed=cfg.data.packing,
                                           flop_model=flops, group=cpu_group(), **steps)
    pad = run.assets.tokenizer.pad_token_id
    if pairs:
        collate_fn = functools.partial(pair_collate, pad_id=pad)
    elif cfg.data.packing:
        collate_fn = functools.partial(pack_collate, pad_id=pad, max_len=cfg.data.max_seq_len)
    else:
        collate_fn = functools.partial(collate, pad_id=pad)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
        collate_fn=collate_fn, prefetch_factor=4 if cfg.data.num_workers else None,
        persistent_workers=False, worker_init_fn=ignore_stop_signals,
        multiprocessing_context=worker_context(host_state_bytes(run.engine.module, run.ds_config))
        if cfg.data.num_workers else None,
    )
    return NormalisingLoader(loader, run.assets.image_processor)
