"""Typed configuration, one dataclass per concern, composed per stage.

Every field carries a one-line comment; ``validate()`` raises :class:`ConfigError` naming the
field and the fix. Stage recipes subclass :class:`RunConfig` only to change defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from vlmscale.config.load import ConfigError

# one-line deprecation notices raised while validating (the recipes print them once, on rank 0)
DEPRECATIONS: set[str] = set()

PRESETS = ("tiny", "demo")


@dataclass
class ModelConfig:
    preset: str | None = "demo"  # built-in model: tiny (tests) | demo (learns the demo in minutes)
    init_from: str | None = None  # path to an HF-format InternVL export to start from (overrides preset)
    vision: str | None = None  # composition: vision encoder path (InternVL / InternViT HF dir)
    llm: str | None = None  # composition: causal LM path; with `vision`, a fresh projector joins them
    # auto = flash_attention_2 on GPU when installed, else sdpa; eager on CPU (docs/performance.md) | eager | sdpa | flash_attention_2
    attn_implementation: str = "auto"
    trust_remote_code: bool = False  # never run code shipped with a checkpoint unless set
    # strength of a fixed 2-D sin-cos position embedding added to each tile's image tokens after the
    # projector (vlmscale.model.forward.image_pos_table; issue #20); null = the preset's (0 in both, opt-in)
    # or the checkpoint's own (config.json `image_pos_scale`, absent = 0); 0 = off, stock InternVL. Not part of
    # transformers' InternVL: an export with it on gives different logits there than in vlmscale
    image_pos_scale: float | None = None

    def validate(self) -> None:
        if self.init_from is None and (self.vision is None) != (self.llm is None):
            raise ConfigError("model.vision and model.llm compose a model together: set both or neither")
        if self.init_from is None and self.vision is None and self.preset not in PRESETS:
            raise ConfigError(f"model.preset={self.preset!r}: choose one of {PRESETS}, or set model.init_from")
        if self.attn_implementation not in ("auto", "eager", "sdpa", "flash_attention_2"):
            raise ConfigError("model.attn_implementation must be auto, eager, sdpa or flash_attention_2")
        if self.image_pos_scale is not None and self.image_pos_scale < 0:
            raise ConfigError("model.image_pos_scale must be >= 0 (0 = off, null = the preset's or checkpoint's)")


@dataclass
class ModulePolicy:
    trainable: bool = True  # False freezes every parameter of the module
    lr: float | None = None  # learning rate for this module; null = optim.lr; 0 means frozen
    layers: str | None = None  # vision only: encoder layers to train, e.g. "12-23"; the rest freeze

    def validate(self, name: str) -> None:
        if self.lr is not None and self.lr < 0:
            raise ConfigError(f"policy.{name}.lr must be >= 0 (0 freezes the module)")
        if self.layers is not None:
            if name != "vision":
                raise ConfigError(f"policy.{name}.layers: only the vision encoder takes a layer range")
            if not re.fullmatch(r"\d+-\d+", self.layers):
                raise ConfigError(f"policy.vision.layers={self.layers!r}: write a range like '12-23'")
            lo, hi = map(int, self.layers.split("-"))
            if lo > hi:
                raise ConfigError(f"policy.vision.layers={self.layers!r}: start must be <= end")

    def layer_range(self) -> tuple[int, int] | None:
        if self.layers is None:
            return None
        lo, hi = map(int, self.layers.split("-"))
        return lo, hi


@dataclass
class PolicyConfig:
    """Which modules train and at what learning rate; applied before the engine exists."""

    # SFT defaults (the LLaVA / InternVL recipe; it also limits forgetting): the vision encoder stays frozen. The built-in demo trains
    # from a random preset; a frozen random encoder keeps colour and shape apart in its features, and
    # a slow projector keeps them apart in the image tokens (fast, they collapse into "object here").
    vision: ModulePolicy = field(default_factory=lambda: ModulePolicy(trainable=False))
    projector: ModulePolicy = field(default_factory=lambda: ModulePolicy(lr=3e-5))
    llm: ModulePolicy = field(default_factory=ModulePolicy)  # includes embeddings and LM head

    def validate(self) -> None:
        for name in ("vision", "projector", "llm"):
            getattr(self, name).validate(name)
        if not any(getattr(self, n).trainable and getattr(self, n).lr != 0 for n in ("vision", "projector", "llm")):
            raise ConfigError("policy: every module is frozen; set policy.<module>.trainable=true for at least one")


@dataclass
class SourceConfig:
    name: str = ""  # label used in logs and metrics
    path: str = ""  # directory (or single .tar) of webdataset shards; "demo:<split>/<task>" = built-in demo
    weight: float = 1.0  # relative sampling weight within the mixture
    text_only: bool = False  # a text-only source: its share is set by data.text_fraction when given
    max_tiles: int | None = None  # tile limit per image for this source (InternVL's max_dynamic_patch); null = data.max_tiles

    def validate(self, where: str) -> None:
        if not self.path:
            raise ConfigError(f"{where}.path is empty: point it at a directory of .tar shards")
        if self.weight <= 0:
            raise ConfigError(f"{where}.weight must be > 0 (remove the source to drop it)")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ConfigError(f"{where}.max_tiles must be >= 1 (or null for data.max_tiles)")


def _demo_sft_sources() -> list[SourceConfig]:
    return [
        SourceConfig(name="vqa", path="demo:train/vqa", weight=5.0),
        SourceConfig(name="grounding", path="demo:train/grounding", weight=1.5),
        SourceConfig(name="multi", path="demo:train/multi", weight=1.0),
        SourceConfig(name="captions", path="demo:train/captions", weight=2.0),
        SourceConfig(name="text", path="demo:train/text", weight=1.5, text_only=True),  # re-blend 1.5 / 11 = 14%
    ]


@dataclass
class VideoConfig:
    """How a video sample becomes tokens (docs/data.md, "Video token budget")."""

    max_frames: int = 8  # frames sampled from a clip (uniformly, or keyframes)
    pool: int = 2  # average-pool each frame's token grid pool x pool (1 = keep every token)
    token_budget: int = 256  # all tokens of one clip (time tags, image blocks) stay within this
    sampling: Literal["uniform", "keyframe"] = "uniform"

    def validate(self) -> None:
        if self.max_frames < 1:
            raise ConfigError("data.video.max_frames must be >= 1")
        if self.pool < 1:
            raise ConfigError("data.video.pool must be >= 1 (1 keeps every token of a frame)")
        if self.token_budget < 1:
            raise ConfigError("data.video.token_budget must be >= 1")


BALANCE_MODES = ("none", "tokens", "flops")  # data.balance (vlmscale.data.balance)


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=_demo_sft_sources)  # the training mixture
    heldout: str = "demo:heldout"  # held-out split scored by `vlmscale eval` and end-of-run eval
    demo_dir: str = "data/demo"  # where the built-in demo dataset lives (generated on first use)
    max_seq_len: int = 512  # samples longer than this are skipped (counted as too_long); packed rows hold at most this
    packing: bool = False  # pack each rank's micro-batch into rows of <= max_seq_len, attention kept per sample
    # spread each step's samples over ranks and micro-batches by estimated cost (vlmscale.data.balance):
    # none = consecutive positions; tokens = LLM length; flops = the FLOP model (LLM tokens + vision tiles).
    # Opt-in (default none in every stage): 1.09-1.19x faster steps on long-tailed mixes, 3-4% at the demo; the
    # one README run with flops scored POPE F1 ~0.67 against 0.97 with none (docs/performance.md, "Balanced
    # global batches"). Preference and RL stages refuse it (pairs and rollouts are not balanced)
    balance: str = "none"
    # dynamic tiling: at most this many tiles per image (+1 thumbnail); with model.init_from the checkpoint's
    # max_patches applies unless this is set explicitly (YAML or override)
    max_tiles: int = 6
    split_tiles: bool = True  # a sample with n images gives each max(1, max_tiles // n) tiles (InternVL); false = max_tiles each
    num_workers: int = 1  # dataloader worker processes per rank
    max_bad_fraction: float = 0.1  # stop the run if more than this fraction of samples is unusable
    bad_check_after: int = 64  # samples read before the bad-fraction limit is enforced
    video: VideoConfig = field(default_factory=VideoConfig)
    # share of samples drawn from text_only sources (VILA's text re-blend); null = use the weights as given
    text_fraction: float | None = None

    def mixture_weights(self) -> list[float]:
        """Per-source sampling weights after applying ``text_fraction`` (relative weights kept within each group)."""
        weights = [s.weight for s in self.sources]
        if self.text_fraction is None:
            return weights
        text = sum(w for w, s in zip(weights, self.sources) if s.text_only)
        other = sum(w for w, s in zip(weights, self.sources) if not s.text_only)
        return [w / text * self.text_fraction if s.text_only else w / other * (1 - self.text_fraction)
                for w, s in zip(weights, self.sources)]

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: list at least one {name, path, weight}")
        for i, src in enumerate(self.sources):
            src.validate(f"data.sources[{i}]")
        names = [s.name or s.path for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: names must be unique, got {names}")
        if self.max_seq_len < 16:
            raise ConfigError("data.max_seq_len must be >= 16")
        if self.max_tiles < 1:
            raise ConfigError("data.max_tiles must be >= 1")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        if self.balance not in BALANCE_MODES:
            raise ConfigError(f"data.balance={self.balance!r}: expected one of {', '.join(BALANCE_MODES)}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError("data.max_bad_fraction must be within [0, 1]")
        self.video.validate()
        if self.text_fraction is not None:
            if not 0.0 <= self.text_fraction < 1.0:
                raise ConfigError("data.text_fraction must be within [0, 1)")
            if not any(s.text_only for s in self.sources):
                raise ConfigError("data.text_fraction is set but no source has text_only: true")
            if all(s.text_only for s in self.sources):
                raise ConfigError("data.text_fraction needs at least one source that is not text_only")


@dataclass
class OptimConfig:
    lr: float = 6e-4  # peak learning rate (modules may override in policy.<module>.lr)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (not applied to norms and biases)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 50  # linear warmup from 0 to the peak rate
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio at train.max_steps
    max_grad_norm: float = 1.0  # global gradient-norm clip; 0 disables

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("optim.lr must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("optim.min_lr_ratio must be within [0, 1]")
        if self.max_grad_norm < 0:
            raise ConfigError("optim.max_grad_norm must be >= 0 (0 disables clipping)")


@dataclass
class ActivationCheckpointing:
    """Recompute a module's layer activations in backward instead of keeping them (docs/performance.md)."""

    llm: bool = False  # the language model's decoder layers
    vision: bool = False  # the vision encoder's layers


@dataclass
class TrainConfig:
    max_steps: int = 1300  # optimizer steps
    micro_batch_size: int = 16  # samples per rank per forward
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    global_batch_size: int | None = None  # optional check: must equal micro * accum * world size
    log_every_steps: int = 10  # metrics.jsonl / tensorboard cadence
    seed: int = 1234  # model init, data order and mixture all derive from this
    # auto | bf16 | fp16 | fp32: auto = bf16 on GPUs of compute capability >= 8.0, fp16 (dynamic loss
    # scaling) on older GPUs, bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32; on resume, auto
    # keeps the checkpoint's precision where the hardware runs it (vlmscale/precision.py). fp32 master
    # weights in every case
    precision: str = "auto"
    bf16: bool | None = None  # deprecated alias: true = precision bf16, false = fp32
    # per module {llm, vision}; a plain true/false (the older form) sets both
    activation_checkpointing: ActivationCheckpointing | bool = field(default_factory=ActivationCheckpointing)
    max_consecutive_nonfinite: int = 5  # stop (exit 4) after this many consecutive skipped non-finite steps
    hang_timeout_s: float = 900.0  # a step taking longer dumps stacks and exits (1); saves: checkpoint.save_timeout_s; 0 = off
    log_sample_ids: bool = False  # write each step's sample ids to output_dir/samples/rank-N.jsonl (audit)
    peak_tflops: float | None = None  # peak per device for MFU in the run's precision; null = GPU table or measured on CPU
    # the LM head + cross-entropy run this many supervised positions at a time when a micro-batch has more
    # (backward recomputes each chunk's logits): peak logits memory is one chunk's (chunk x vocab x 4 bytes,
    # 1.2 GB at Qwen2's 151k vocab) instead of all of them; 0 = the whole micro-batch at once. docs/performance.md
    loss_chunk_tokens: int = 2048

    def __post_init__(self) -> None:
        if isinstance(self.activation_checkpointing, bool):
            on = self.activation_checkpointing
            self.activation_checkpointing = ActivationCheckpointing(llm=on, vision=on)

    def validate(self) -> None:
        from vlmscale.precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.bf16 is not None:
            alias = "bf16" if self.bf16 else "fp32"
            if self.precision not in ("auto", alias):
                raise ConfigError(f"train.bf16={str(self.bf16).lower()} contradicts train.precision={self.precision}; "
                                  "remove train.bf16 (deprecated)")
            DEPRECATIONS.add(f"train.bf16 is deprecated: use train.precision={alias} (or auto)")
            self.precision, self.bf16 = alias, None
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every_steps", "max_consecutive_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1")
        if self.hang_timeout_s < 0:
            raise ConfigError("train.hang_timeout_s must be >= 0 (0 disables the watchdog)")
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"train.loss_chunk_tokens={self.loss_chunk_tokens}: must be >= 0 "
                              "(0 = no chunking, e.g. 2048 = at most 2048 positions' logits at a time)")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError("train.peak_tflops must be > 0 (or null to measure / look it up)")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError("train.global_batch_size must be >= 1 (or null)")


@dataclass
class CheckpointConfig:
    every_steps: int = 200  # save a resumable checkpoint every N steps (and at the end)
    keep_last: int = 2  # keep only the newest K complete checkpoints (0 keeps all)
    export: bool = True  # write output_dir/hf (safetensors + processor) at the end
    overwrite: bool = False  # with resume=never: move an earlier run's checkpoints aside (checkpoints.old-<time>)
    save_timeout_s: float = 3600.0  # the hang watchdog's limit while a checkpoint is saved (train.hang_timeout_s > 0)
    # resuming on another world size converts the checkpoint inside the job only up to this size; larger ones
    # first: vlmscale ckpt convert OUTPUT_DIR --to universal --workers N (docs/cluster.md)
    auto_universal_max_gb: float = 4.0
    export_shard_size: str = "5GB"  # largest safetensors shard of the export (e.g. 5GB, 500MB, 2GiB)
    # periodic saves through DeepSpeed's DecoupledCheckpointEngine: a writer process per rank writes the files
    # while the next step's forward/backward runs; committed after that step (docs/reliability.md, "Async saves")
    async_save: bool = False

    def validate(self) -> None:
        from vlmscale.config.load import parse_size

        try:
            if parse_size(self.export_shard_size) < 1:
                raise ValueError
        except ValueError:
            raise ConfigError(f"checkpoint.export_shard_size={self.export_shard_size!r}: write a size such as 5GB or 500MB") from None
        if self.every_steps < 1:
            raise ConfigError("checkpoint.every_steps must be >= 1")
        if self.keep_last < 0:
            raise ConfigError("checkpoint.keep_last must be >= 0")
        if self.save_timeout_s <= 0:
            raise ConfigError("checkpoint.save_timeout_s must be > 0 (the watchdog's limit for one save)")
        if self.auto_universal_max_gb < 0:
            raise ConfigError("checkpoint.auto_universal_max_gb must be >= 0 (0: always convert offline)")


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero3.json"  # DeepSpeed JSON; batch/lr/clip fields are filled from this config

    def validate(self) -> None:
        if not self.config.endswith(".json"):
            raise ConfigError(f"deepspeed.config={self.config!r}: expected a .json file (e.g. ds_configs/zero3.json)")


# generative (vqa, spatial, video, grounding, pope), held-out loss (text, caption), encoder drift; see docs/evaluation.md
EVAL_SUITES = ("vqa", "spatial", "video", "grounding", "pope", "text", "caption", "drift")


def _check_gather_bytes(key: str, value: str) -> None:
    """A ``*.gather_policy_max_bytes`` size: what generation may gather whole under ZeRO-3."""
    from vlmscale.config.load import parse_size

    try:
        parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc} (e.g. '2GB', '512MB', or 0 for per-layer gathers)")


@dataclass
class EvalConfig:
    every_steps: int = 0  # run the suites every N steps during training (0 = only at the end)
    at_end: bool = True  # run the suites on the final model
    at_start: bool = False  # also score the starting model (step 0) over the same samples as at_end
    suites: list[str] = field(default_factory=lambda: ["vqa", "spatial", "grounding", "pope", "text", "drift"])
    max_samples: int = 64  # samples per suite in periodic evaluations (0 = all)
    final_max_samples: int = 0  # samples per suite in the final evaluation (0 = all)
    max_new_tokens: int = 24  # generation length limit
    vcd: bool = False  # visual contrastive decoding for the generative suites
    vcd_alpha: float = 1.0  # VCD contrast strength
    vcd_beta: float = 0.1  # VCD plausibility cut-off
    vcd_noise: float = 0.5  # share of noise in VCD's distorted image
    # generation under ZeRO-3 gathers the whole model once per call when it is at most this size ("2GB", "512MB";
    # 0 = never: ZeRO-3 gathers layer by layer for every forward, in lock step over ranks); see docs/evaluation.md
    gather_policy_max_bytes: str = "2GB"

    def validate(self) -> None:
        _check_gather_bytes("eval.gather_policy_max_bytes", self.gather_policy_max_bytes)
        for s in self.suites:
            if s not in EVAL_SUITES:
                raise ConfigError(f"eval.suites: unknown suite {s!r}; known: {list(EVAL_SUITES)}")
        if self.every_steps < 0 or self.max_samples < 0 or self.final_max_samples < 0:
            raise ConfigError("eval.every_steps, eval.max_samples and eval.final_max_samples must be >= 0")
        if self.max_new_tokens < 1:
            raise ConfigError("eval.max_new_tokens must be >= 1")
        if not 0.0 <= self.vcd_noise <= 1.0 or not 0.0 <= self.vcd_beta <= 1.0:
            raise ConfigError("eval.vcd_noise and eval.vcd_beta must be within [0, 1]")


@dataclass
class LoraSection:
    enabled: bool = False  # train LoRA adapters on the LLM instead of its full weights
    r: int = 16  # adapter rank
    alpha: float = 32.0  # scaling numerator (scale = alpha / r)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError("lora.r must be >= 1")
        if not self.targets:
            raise ConfigError("lora.targets is empty: name the LLM linear layers to adapt (e.g. q_proj)")


@dataclass
class EWCConfig:
    """Elastic weight consolidation: adds weight / 2 * sum F * (theta - theta*)^2 (docs/forgetting.md)."""

    weight: float = 0.0  # lambda; 0 disables the penalty
    path: str | None = None  # directory written by `vlmscale ewc fisher` (F and the anchor weights theta*)

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError("regularizer.ewc.weight must be >= 0 (0 disables EWC)")
        if self.weight > 0 and not self.path:
            raise ConfigError("regularizer.ewc.weight > 0 needs regularizer.ewc.path: the directory written by "
                              "`vlmscale ewc fisher --out DIR`")


@dataclass
class RegularizerConfig:
    ewc: EWCConfig = field(default_factory=EWCConfig)

    def validate(self) -> None:
        self.ewc.validate()


@dataclass
class RunConfig:
    stage: str = "sft"  # recipe name, recorded in outputs
    output_dir: str = "runs/sft-demo"  # everything the run writes goes here
    # auto: newest complete checkpoint if any, else start fresh | latest: newest complete checkpoint, error if
    # none | never | a checkpoint directory
    resume: str = "auto"
    resume_allow_data_change: bool = False  # resume although the data mixture differs from the checkpoint's (docs/data.md)
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    # dotted keys the YAML file and the overrides set (recorded by load_config); not a config field
    explicit_keys: ClassVar[frozenset[str]] = frozenset()

    def tile_limit(self) -> int | None:
        """Tiles per image the run asks for: ``data.max_tiles``, or None (the checkpoint's ``max_patches``)
        when starting from ``model.init_from`` without setting ``data.max_tiles`` explicitly."""
        if self.model.init_from is not None and "data.max_tiles" not in self.explicit_keys:
            return None
        return self.data.max_tiles

    def validate(self) -> None:
        if self.lora.enabled and self.regularizer.ewc.weight > 0:
            raise ConfigError("regularizer.ewc with lora.enabled: LoRA keeps the protected base weights frozen and "
                              "renames them; train without LoRA or set regularizer.ewc.weight=0")
        if self.lora.enabled and not self.policy.llm.trainable:
            raise ConfigError("lora.enabled trains adapters on the LLM, but policy.llm.trainable is false; enable one or the other")
        if not self.output_dir:
            raise ConfigError("output_dir is empty")
        if not self.resume:
            raise ConfigError("resume must be auto, latest, never or a checkpoint path")
        for section in ("model", "policy", "data", "optim", "train", "checkpoint", "deepspeed", "eval", "lora", "regularizer"):
            getattr(self, section).validate()


def _sft_data() -> DataConfig:
    return DataConfig()


@dataclass
class SFTConfig(RunConfig):
    """Joint SFT: projector + LLM (+ the demo's from-scratch encoder) on conversations, text re-blended."""

    stage: Literal["sft"] = "sft"
    data: DataConfig = field(default_factory=_sft_data)


def _align_policy() -> PolicyConfig:
    return PolicyConfig(vision=ModulePolicy(trainable=False), projector=ModulePolicy(trainable=True),
                        llm=ModulePolicy(trainable=False))


def _align_data() -> DataConfig:
    return DataConfig(sources=[SourceConfig(name="captions", path="demo:train/captions", weight=1.0)])


@dataclass
class AlignConfig(RunConfig):
    """Projector alignment (stage 1): vision encoder and LLM frozen, only the projector learns, on captions."""

    stage: Literal["align"] = "align"
    output_dir: str = "runs/align-demo"
    policy: PolicyConfig = field(default_factory=_align_policy)
    data: DataConfig = field(default_factory=_align_data)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=300))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(suites=["caption", "text"], at_start=True))

    def validate(self) -> None:
        if not self.policy.projector.trainable or self.policy.projector.lr == 0:
            raise ConfigError("align trains the projector: policy.projector must be trainable (it is the whole point of the stage)")
        super().validate()


def _pretrain_policy() -> PolicyConfig:
    return PolicyConfig(vision=ModulePolicy(trainable=False), projector=ModulePolicy(trainable=True),
                        llm=ModulePolicy(trainable=True))


def _pretrain_data() -> DataConfig:
    # VILA: interleaved documents and image-text pairs, 1:1
    return DataConfig(sources=[SourceConfig(name="docs", path="demo:train/docs", weight=1.0),
                               SourceConfig(name="captions", path="demo:train/captions", weight=1.0)])


@dataclass
class PretrainConfig(RunConfig):
    """Interleaved image-text pretraining (stage 2): projector + LLM trained, vision encoder frozen."""

    stage: Literal["pretrain"] = "pretrain"
    output_dir: str = "runs/pretrain-demo"
    policy: PolicyConfig = field(default_factory=_pretrain_policy)
    data: DataConfig = field(default_factory=_pretrain_data)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_steps=30))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=400))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(suites=["caption", "text", "drift"]))


# ---------------------------------------------------------------- preference stages (docs/preference.md)


def _pref_data() -> DataConfig:
    return DataConfig(sources=[SourceConfig(name="pref", path="demo:train/pref", weight=1.0)])


def _check_pairs(cfg: RunConfig) -> None:
    if cfg.data.packing:
        raise ConfigError("data.packing: preference stages score each answer in its own row; set data.packing=false")
    if cfg.data.balance != "none":
        raise ConfigError(f"data.balance={cfg.data.balance}: preference pairs are not balanced yet; set data.balance=none")
    if any(s.text_only for s in cfg.data.sources) or cfg.data.text_fraction is not None:
        raise ConfigError("data.sources: a preference stage trains on pairs only; drop text_only / data.text_fraction")


@dataclass
class RewardSection:
    heldout_pairs: str = "demo:heldout/pref"  # pairs scored for held-out accuracy at the end ("" = skip)


@dataclass
class RewardConfig(RunConfig):
    """Bradley-Terry reward model: the VLM with a scalar head on the last token, trained on preference pairs."""

    stage: Literal["reward"] = "reward"
    output_dir: str = "runs/reward-demo"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(init_from="runs/sft-demo/hf"))
    data: DataConfig = field(default_factory=_pref_data)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=150, micro_batch_size=8))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=50))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(suites=[], at_end=False))
    reward: RewardSection = field(default_factory=RewardSection)

    def validate(self) -> None:
        _check_pairs(self)
        if self.lora.enabled:
            raise ConfigError("lora.enabled: the reward model trains its LLM and head in full; set lora.enabled=false")
        if self.eval.suites:
            raise ConfigError("eval.suites: a reward model does not generate; set eval.suites=[] "
                              "(held-out pair accuracy is reported from reward.heldout_pairs)")
        super().validate()


@dataclass
class DPOSection:
    beta: float = 0.1  # strength of the KL anchor to the reference model
    reference: Literal["cached", "live"] = "cached"  # reference log-probs precomputed once, or a frozen 2nd engine
    sft_weight: float = 0.0  # adds sft_weight x the mean NLL of the chosen answer (0 = pure DPO)
    segment_weight: float = 1.0  # RLHF-V dense weighting: tokens where the answers differ count this much (1 = off)
    cache_flush_steps: int = 20  # cached reference: each rank commits its shard every N steps (resumable)

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError("dpo.beta must be > 0 (typical 0.1)")
        if self.sft_weight < 0:
            raise ConfigError("dpo.sft_weight must be >= 0 (0 disables the SFT term)")
        if self.segment_weight <= 0:
            raise ConfigError("dpo.segment_weight must be > 0 (1 disables dense weighting; RLHF-V uses 5)")
        if self.reference not in ("cached", "live"):
            raise ConfigError("dpo.reference must be cached or live")
        if self.cache_flush_steps < 1:
            raise ConfigError("dpo.cache_flush_steps must be >= 1")


@dataclass
class DPOConfig(RunConfig):
    """Direct preference optimisation (sigmoid loss, RLHF-V / RLAIF-V style) from an SFT model."""

    stage: Literal["dpo"] = "dpo"
    output_dir: str = "runs/dpo-demo"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(init_from="runs/sft-demo/hf"))
    data: DataConfig = field(default_factory=_pref_data)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_steps=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, micro_batch_size=8))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=50))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(suites=["pope"], at_start=True))
    dpo: DPOSection = field(default_factory=DPOSection)

    def validate(self) -> None:
        _check_pairs(self)
        self.dpo.validate()
        if self.lora.enabled and self.dpo.reference == "live":
            raise ConfigError("dpo.reference=live with lora.enabled: use the cached reference (the default)")
        super().validate()


# ---------------------------------------------------------------- PPO (recipes/ppo.py, docs/ppo.md)


@dataclass
class PPOSection:
    """Rollouts, rewards and the PPO update; the actor's learning rate is optim.lr, its minibatch train.*."""

    reward_model: str = "runs/reward-demo/hf"  # frozen reward model: HF InternVL export + score_head.safetensors
    critic_from: str | None = None  # critic start (same format); null = the reward model, VLM and head
    prompts: str = "demo:train/pref"  # shards whose records' `messages` are the prompts (images included)
    rollout_batch_size: int = 8  # prompts per rank per PPO step; a multiple of micro_batch_size x grad_accum_steps
    max_new_tokens: int = 40  # response length limit (a response without end-of-turn is scored as it stands)
    temperature: float = 1.0  # sampling temperature of the rollouts
    epochs: int = 2  # passes over each step's rollouts, in shuffled minibatches
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    clip_ratio: float = 0.2  # policy ratio clip epsilon
    value_clip: float = 0.2  # value clip around the rollout's values
    kl_coef: float = 0.05  # per-token KL penalty coefficient (the starting value when adaptive)
    kl_target: float | None = None  # adaptive KL: mean sequence KL to steer toward; null = fixed kl_coef
    kl_horizon: int = 1000  # adaptive KL: rollouts over which the coefficient moves by at most 20%
    critic_lr: float = 5e-5  # critic learning rate (the whole critic trains: VLM under the policy's modules + head)
    freeze_actor_steps: int = 0  # critic warm-up: the first N steps update only the critic
    whiten_advantages: bool = True  # normalise advantages over every rank's response tokens
    top_p: float = 1.0  # nucleus cut of the rollouts' sampling (1 = none; log-probs are of the tempered distribution)
    # rollouts gather the whole actor once per rollout phase when it is at most this size (0 = layer by layer)
    gather_policy_max_bytes: str = "2GB"

    def validate(self) -> None:
        if not self.reward_model:
            raise ConfigError("ppo.reward_model is empty: point it at a reward export (recipes/reward.py writes <output_dir>/hf)")
        for name in ("rollout_batch_size", "max_new_tokens", "epochs", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo.{name} must be >= 1")
        if self.freeze_actor_steps < 0:
            raise ConfigError("ppo.freeze_actor_steps must be >= 0")
        if self.temperature <= 0:
            raise ConfigError("ppo.temperature must be > 0 (PPO needs sampled rollouts)")
        if not 0.0 < self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ConfigError("ppo.gamma must be within (0, 1] and ppo.lam within [0, 1]")
        if self.clip_ratio <= 0 or self.value_clip <= 0:
            raise ConfigError("ppo.clip_ratio and ppo.value_clip must be > 0")
        if self.kl_coef < 0:
            raise ConfigError("ppo.kl_coef must be >= 0")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ConfigError("ppo.kl_target must be > 0, or null for a fixed ppo.kl_coef")
        if self.critic_lr <= 0:
            raise ConfigError("ppo.critic_lr must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"ppo.top_p={self.top_p} must be within (0, 1] (1 = no nucleus cut)")
        _check_gather_bytes("ppo.gather_policy_max_bytes", self.gather_policy_max_bytes)


def _ppo_policy() -> PolicyConfig:
    return PolicyConfig(vision=ModulePolicy(trainable=False), projector=ModulePolicy(trainable=False),
                        llm=ModulePolicy(trainable=True))


def _ppo_data() -> DataConfig:
    return DataConfig(sources=[SourceConfig(name="pref", path="demo:train/pref")])  # unused: prompts come from ppo.prompts


@dataclass
class PPOConfig(RunConfig):
    """PPO against a frozen reward model: actor, critic, reward and reference, all ZeRO-3 partitioned."""

    stage: Literal["ppo"] = "ppo"
    output_dir: str = "runs/ppo-demo"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(init_from="runs/sft-demo/hf"))
    policy: PolicyConfig = field(default_factory=_ppo_policy)
    data: DataConfig = field(default_factory=_ppo_data)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_steps=0, min_lr_ratio=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=40, micro_batch_size=4, log_every_steps=1))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=10))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(suites=["pope", "vqa"], at_end=True))
    ppo: PPOSection = field(default_factory=PPOSection)

    def validate(self) -> None:
        super().validate()
        self.ppo.validate()
        window = self.train.micro_batch_size * self.train.grad_accum_steps
        if self.ppo.rollout_batch_size % window:
            raise ConfigError(f"ppo.rollout_batch_size={self.ppo.rollout_batch_size} must be a multiple of "
                              f"train.micro_batch_size x train.grad_accum_steps = {window} (one minibatch)")
        if self.lora.enabled:
            raise ConfigError("ppo with lora.enabled is not supported: set lora.enabled=false")
        if self.regularizer.ewc.weight > 0:
            raise ConfigError("ppo keeps the policy near its start with the KL penalty; set regularizer.ewc.weight=0")
        if self.eval.every_steps:
            raise ConfigError("ppo runs evaluation at the end only: set eval.every_steps=0")


# ---------------------------------------------------------------- GRPO (recipes/grpo.py, docs/rl.md)


def _grpo_prompts() -> list[str]:
    return ["demo:train/vqa", "demo:train/grounding", "demo:train/multi"]


@dataclass
class GRPOSection:
    """Group sampling, verifiable rewards and the clipped update; the policy's learning rate is optim.lr,
    its minibatch train.micro_batch_size x train.grad_accum_steps rows."""

    prompts: list[str] = field(default_factory=_grpo_prompts)  # conversation shards: prompt = turns before the last assistant turn
    prompts_per_rank: int = 4  # prompts per rank per step; each is sampled group_size times
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 32  # completion length limit
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling; 1 = off
    inner_epochs: int = 1  # passes over each step's rollouts, in shuffled minibatches
    clip_low: float = 0.2  # ratio clip below 1 - clip_low
    clip_high: float = 0.2  # ratio clip above 1 + clip_high (DAPO's clip-higher: e.g. 0.28)
    kl_coef: float = 0.0  # k3 KL to a frozen reference; 0 = no reference model is built
    advantage: Literal["grpo", "dr_grpo"] = "grpo"  # dr_grpo: r - mean, without the std division
    loss_agg: Literal["token", "sequence", "constant"] = "token"  # constant: Dr. GRPO's / max_new_tokens
    skip_zero_variance: bool = True  # groups whose completions all scored alike are left out of the update
    rewards: dict[str, float] = field(default_factory=lambda: {"exact_match": 1.0, "iou": 1.0})  # name or module:function -> weight
    format_pattern: str | None = None  # regex for the `format` reward
    log_rollouts: bool = True  # output_dir/rollouts/rank-N.jsonl: completions and rewards per prompt per step
    rollout_batch_size: int = 32  # completions decoded together (left-padded, KV-cached)
    # rollouts gather the whole policy once per rollout phase when it is at most this size (0 = layer by layer)
    gather_policy_max_bytes: str = "2GB"

    def validate(self) -> None:
        if not self.prompts:
            raise ConfigError("grpo.prompts is empty: give conversation shard directories (e.g. demo:train/vqa)")
        for name in ("prompts_per_rank", "group_size", "max_new_tokens", "inner_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"grpo.{name} must be >= 1")
        if self.group_size < 2:
            raise ConfigError("grpo.group_size must be >= 2: advantages compare completions within a group")
        if self.temperature <= 0:
            raise ConfigError("grpo.temperature must be > 0 (GRPO needs sampled completions)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("grpo.top_p must be within (0, 1]")
        if not 0.0 < self.clip_low < 1.0 or self.clip_high <= 0:
            raise ConfigError("grpo.clip_low must be within (0, 1) and grpo.clip_high > 0")
        if self.kl_coef < 0:
            raise ConfigError("grpo.kl_coef must be >= 0")
        if not any(w != 0 for w in self.rewards.values()):
            raise ConfigError("grpo.rewards gives no reward a non-zero weight (e.g. grpo.rewards={exact_match: 1.0})")
        if self.rollout_batch_size < 1:
            raise ConfigError("grpo.rollout_batch_size must be >= 1")
        _check_gather_bytes("grpo.gather_policy_max_bytes", self.gather_policy_max_bytes)
        if self.rewards.get("format", 0) and not self.format_pattern:
            raise ConfigError("grpo.rewards has `format` but grpo.format_pattern is unset: give the regex it checks")


@dataclass
class GRPOConfig(RunConfig):
    """GRPO with verifiable rewards: the policy and, when grpo.kl_coef > 0, a frozen reference."""

    stage: Literal["grpo"] = "grpo"
    output_dir: str = "runs/grpo-demo"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(init_from="runs/sft-demo/hf"))
    policy: PolicyConfig = field(default_factory=_ppo_policy)
    data: DataConfig = field(default_factory=_ppo_data)  # unused: prompts come from grpo.prompts
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=40, micro_batch_size=8, log_every_steps=1))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=10))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(suites=["vqa", "grounding", "pope"], at_end=True))
    grpo: GRPOSection = field(default_factory=GRPOSection)

    def rows_per_rank(self) -> int:
        return self.grpo.prompts_per_rank * self.grpo.group_size

    def validate(self) -> None:
        super().validate()
        self.grpo.validate()
        window = self.train.micro_batch_size * self.train.grad_accum_steps
        if self.rows_per_rank() % window:
            raise ConfigError(f"grpo.prompts_per_rank x grpo.group_size = {self.rows_per_rank()} completions per rank "
                              f"must be a multiple of train.micro_batch_size x train.grad_accum_steps = {window} "
                              "(one minibatch)")
        if self.lora.enabled:
            raise ConfigError("grpo with lora.enabled is not supported: set lora.enabled=false")
        if self.regularizer.ewc.weight > 0:
            raise ConfigError("grpo keeps the policy near its start with grpo.kl_coef; set regularizer.ewc.weight=0")
        if self.eval.every_steps:
            raise ConfigError("grpo runs evaluation at the end only: set eval.every_steps=0")
