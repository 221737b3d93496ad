"""``vlmscale plan``: what one training configuration needs per GPU, and which settings fit.

The run config (stage defaults, ``--config`` YAML, ``key=value`` overrides) supplies the model, the
parameter policy, LoRA, ``data.max_seq_len``, ``data.max_tiles``, ``train.micro_batch_size``,
activation checkpointing and the DeepSpeed JSON; the command line adds the cluster. Nothing is
downloaded and no memory is allocated: the model lives on the meta device.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from itertools import product

from vlmscale.config.deepspeed import resolve_ds_path
from vlmscale.config.schema import RunConfig
from vlmscale.plan.build import facts_for
from vlmscale.plan.memory import GiB, Breakdown, ModelFacts, Shape, ZeroSettings, deepspeed_estimate, plan


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    reserve_gib: float  # CUDA context, NCCL buffers, allocator fragmentation: kept free
    device: str = "cuda"

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable(self) -> float:
        return (self.gpu_mem_gib - self.reserve_gib) * GiB


@dataclass(frozen=True)
class Setting:
    zero: ZeroSettings
    ckpt_llm: bool
    ckpt_vision: bool

    def label(self) -> str:
        ac = "+".join(n for n, on in (("llm", self.ckpt_llm), ("vision", self.ckpt_vision)) if on) or "none"
        return f"{self.zero.label()}; checkpointing {ac}"


def tiles_per_sample(cfg: RunConfig, facts: ModelFacts) -> int:
    """Image tiles of the largest sample: all ``data.max_tiles`` plus the thumbnail, as long as their
    image tokens fit in ``data.max_seq_len``."""
    return max(0, min(cfg.data.max_tiles + 1, cfg.data.max_seq_len // facts.vision.image_seq_length))


def shape_for(cfg: RunConfig, facts: ModelFacts, micro_batch: int, *, tiles: int | None = None) -> Shape:
    per_sample = tiles_per_sample(cfg, facts) if tiles is None else tiles
    return Shape(rows=micro_batch, length=cfg.data.max_seq_len, tiles=micro_batch * per_sample)


def breakdown(cfg: RunConfig, facts: ModelFacts, cluster: Cluster, setting: Setting, micro_batch: int,
              *, tiles: int | None = None) -> Breakdown:
    return plan(facts, setting.zero, world=cluster.world, shape=shape_for(cfg, facts, micro_batch, tiles=tiles),
                ckpt_llm=setting.ckpt_llm, ckpt_vision=setting.ckpt_vision, device=cluster.device,
                loss_chunk_tokens=cfg.train.loss_chunk_tokens)


def max_micro_batch(cfg: RunConfig, facts: ModelFacts, cluster: Cluster, setting: Setting, *, limit: int,
                    tiles: int | None = None) -> int:
    """The largest micro-batch (<= limit) whose per-GPU peak fits; 0 if not even one sample fits."""
    lo, hi = 0, limit
    while lo < hi:  # the peak grows with the micro-batch
        mid = (lo + hi + 1) // 2
        if breakdown(cfg, facts, cluster, setting, mid, tiles=tiles).peak("gpu") <= cluster.usable:
            lo = mid
        else:
            hi = mid - 1
    return lo


def configured_setting(cfg: RunConfig, *, zero: int | None, offload: str | None) -> Setting:
    ds = json.loads(resolve_ds_path(cfg.deepspeed.config).read_text())
    z = ZeroSettings.from_ds_config(ds)
    if zero is not None:
        z = dataclasses.replace(z, stage=zero)
    if offload is not None:
        z = dataclasses.replace(z, offload_optimizer=offload in ("optimizer", "all"), offload_param=offload == "all")
    ac = cfg.train.activation_checkpointing
    return Setting(z, ckpt_llm=ac.llm, ckpt_vision=ac.vision)


def alternatives(base: ZeroSettings) -> list[Setting]:
    """ZeRO-2/3 x offload x activation checkpointing, keeping the configured buckets and thresholds."""
    out = []
    for stage, offload, (llm, vision) in product((2, 3), ("none", "optimizer", "all"),
                                                 ((False, False), (True, False), (True, True))):
        if stage == 2 and offload == "all":
            continue
        z = dataclasses.replace(base, stage=stage, offload_optimizer=offload != "none", offload_param=offload == "all")
        out.append(Setting(z, llm, vision))
    return out


def _gib(x: float) -> str:
    return f"{x / GiB:7.2f}"


def planned_precision(cfg: RunConfig, *, device: str) -> tuple[str, str]:
    """The precision the planned run trains in: ``train.precision``, with ``auto`` resolved as a run on this
    machine's CPU would (``--device cpu``) or as on an A100/H100-class GPU (``--device cuda``: bf16). The
    terms of the plan are 16-bit; a run that resolves to fp32 is refused here rather than planned wrong."""
    from vlmscale.precision import hardware_precision

    requested = cfg.train.precision
    if requested != "auto":
        precision, why = requested, "train.precision"
    elif device == "cpu":
        decision = hardware_precision()
        precision, why = decision.precision, f"auto on this machine: {decision.reason}"
    else:
        precision, why = "bf16", "auto on a GPU of compute capability >= 8.0 (fp16 below: the same bytes)"
    if precision == "fp32":
        raise ValueError(f"the plan models 16-bit weights and activations, but this run would train in fp32 ({why}); "
                         "plan it with train.precision=bf16, or expect about twice the weight, gradient and "
                         "activation bytes in fp32")
    return precision, why


def render(cfg: RunConfig, cluster: Cluster, *, model_name: str, zero: int | None = None, offload: str | None = None,
           limit: int = 64, tiles: int | None = None) -> tuple[str, dict]:
    """The report text and the same figures as JSON-ready data."""
    facts = facts_for(cfg, device=cluster.device)
    setting = configured_setting(cfg, zero=zero, offload=offload)
    mb = cfg.train.micro_batch_size
    per_sample = tiles_per_sample(cfg, facts) if tiles is None else tiles
    precision, why = planned_precision(cfg, device=cluster.device)
    lines = [
        f"precision: {precision} ({why})",
        f"model {model_name}: {facts.num_params / 1e9:.3f}B parameters, {facts.num_trainable / 1e9:.3f}B trained "
        f"(stage {cfg.stage} policy{', LoRA' if cfg.lora.enabled else ''})",
        f"cluster {cluster.nodes} x {cluster.gpus_per_node} GPUs of {cluster.gpu_mem_gib:g} GiB "
        f"({cluster.reserve_gib:g} GiB kept free per GPU) = {cluster.world} ranks",
        f"micro-batch: {mb} x {cfg.data.max_seq_len} tokens, {per_sample} image tiles per sample "
        f"({facts.vision.tokens_per_tile} vision tokens each)",
        "",
        f"configured: {setting.label()}, micro-batch {mb}",
        f"  {'term':<58} {'phase':<8} {'GiB/GPU':>8} {'GiB/CPU':>8}",
    ]
    b = breakdown(cfg, facts, cluster, setting, mb, tiles=tiles)
    for t in b.terms:
        gpu, cpu = (t.nbytes, 0.0) if t.device == "gpu" else (0.0, t.nbytes)
        lines.append(f"  {t.name:<58} {t.phase:<8} {_gib(gpu):>8} {_gib(cpu):>8}")
    kinds = b.by_kind("gpu")
    lines.append(f"  peak per GPU {_gib(b.peak('gpu')).strip()} GiB (params {_gib(kinds['params']).strip()}, grads "
                 f"{_gib(kinds['grads']).strip()}, optimizer {_gib(kinds['optimizer']).strip()}, activations "
                 f"{_gib(kinds['activations']).strip()}); CPU per node {_gib(b.peak('cpu') * cluster.gpus_per_node).strip()} GiB"
                 f" -> {'fits' if b.peak('gpu') <= cluster.usable else 'does NOT fit'}")
    ds_gpu, ds_cpu = deepspeed_estimate(facts, setting.zero, nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node)
    ours = sum(b.by_kind("gpu")[k] for k in ("params", "grads", "optimizer"))
    lines += [f"  DeepSpeed's estimator for {setting.zero.label()} (fp16 params, fp32 Adam, every parameter trained, "
              f"no activations): {_gib(ds_gpu).strip()} GiB/GPU, {_gib(ds_cpu).strip()} GiB CPU per node; "
              f"this plan's model states: {_gib(ours).strip()} GiB/GPU", ""]
    lines.append(f"what fits ({cluster.gpu_mem_gib:g} GiB GPUs; micro-batch searched up to {limit}):")
    lines.append(f"  {'setting':<58} {'peak@1':>8} {'act/sample':>10} {'max mb':>6} {'peak@max':>8} {'CPU/node':>8}")
    rows = []
    for alt in alternatives(setting.zero):
        one = breakdown(cfg, facts, cluster, alt, 1, tiles=tiles)
        best = max_micro_batch(cfg, facts, cluster, alt, limit=limit, tiles=tiles)
        at_best = breakdown(cfg, facts, cluster, alt, best, tiles=tiles) if best else one
        act = sum(t.nbytes for t in one.terms if t.kind == "activations" and t.phase == "fwd_bwd")
        cpu = at_best.peak("cpu") * cluster.gpus_per_node
        lines.append(f"  {alt.label():<58} {_gib(one.peak('gpu')):>8} {_gib(act):>10} {best if best else '-':>6} "
                     f"{_gib(at_best.peak('gpu')) if best else '      -':>8} {_gib(cpu):>8}")
        rows.append({"setting": alt.label(), "peak_at_1_gib": one.peak("gpu") / GiB, "max_micro_batch": best,
                     "peak_at_max_gib": at_best.peak("gpu") / GiB if best else None, "cpu_per_node_gib": cpu / GiB})
    data = {
        "model": model_name, "params": facts.num_params, "trainable": facts.num_trainable,
        "world": cluster.world, "gpu_mem_gib": cluster.gpu_mem_gib, "micro_batch": mb,
        "configured": {"setting": setting.label(), "peak_gpu_gib": b.peak("gpu") / GiB,
                       "terms": [dataclasses.asdict(t) for t in b.terms]},
        "deepspeed_estimate_gpu_gib": ds_gpu / GiB, "alternatives": rows,
    }
    return "\n".join(lines), data
