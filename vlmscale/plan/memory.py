"""Per-rank memory of a training run, from the model's shapes, the parameter policy and the ZeRO settings.

Everything here is plain arithmetic on :class:`ModelFacts` (parameter sizes, which of them train, the
layer dimensions) so it can be checked against hand-computed numbers; ``ModelFacts.from_model`` reads
those facts from a model on the meta device. The terms follow what DeepSpeed 0.19 and PyTorch actually
allocate for vlmscale's setup (bf16 weights, fp32 master weights, ``torch.optim.AdamW``); docs/plan.md
states every formula and where it comes from.

A rank's peak is its standing state plus the larger of two phases that never overlap:

    peak = standing + max(forward/backward, optimizer step)

- standing: parameter partitions (bf16), gradient partitions (bf16), the reduce bucket, fp32 master
  weights and Adam's two fp32 moments;
- forward/backward: gathered ZeRO-3 parameters (persistent small ones included: DeepSpeed releases
  those for the step and gathers them again after it), the micro-batch, saved activations, backward
  transients (logit gradients, a recomputed layer, one layer's full gradients before reduction);
- optimizer step: the fp32 gradient of one optimizer group, AdamW's temporaries, and the last
  micro-batch's hidden states, which the training loop still holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

BF16, FP32 = 2, 4
GiB = 2**30
ATTENTION = ("eager", "sdpa", "flash_attention_2")


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Param:
    numel: int
    trainable: bool
    group: int = 0  # optimizer parameter group (trainable parameters only)
    backward: bool = True  # a module that runs in the backward uses it (so ZeRO-3 keeps it gathered)


@dataclass(frozen=True)
class LLMDims:
    hidden: int
    q_dim: int  # heads * head_dim
    kv_dim: int  # kv_heads * head_dim
    intermediate: int
    vocab: int
    layers: int
    heads: int


@dataclass(frozen=True)
class VisionDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    tokens_per_tile: int  # patches + the CLS token
    pixels_per_tile: int  # 3 * image_size^2
    image_seq_length: int  # LLM tokens per tile after pixel shuffle
    rms_norm: bool
    qk_norm: bool


@dataclass(frozen=True)
class ModelFacts:
    params: tuple[Param, ...]
    llm: LLMDims
    vision: VisionDims
    largest_leaf: int  # most parameters of one module (non-recursive): DeepSpeed's "largest layer"
    largest_block_trainable: int  # most trainable parameters in one transformer layer (or embedding / head)
    llm_backward: bool  # the LLM layers must keep activations (something at or before them trains)
    projector_backward: bool
    vision_backward_layers: int  # vision layers that keep activations (from the first trained one on)
    llm_weights_train: bool = True  # the LLM layers hold trained parameters (LoRA adapters count)
    vision_trained_layers: int = 0  # of the vision layers keeping activations, those with trained parameters
    attn_implementation: str = "sdpa"  # resolved: one of ATTENTION
    lm_head_trains: bool = True

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def num_trainable(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, param_groups: list[dict]) -> "ModelFacts":
        """Facts of an InternVL model (meta device is fine) after the parameter policy is applied."""
        from vlmscale.train.flops import FlopModel

        inner = model.model
        units = {u.name: u for u in FlopModel.from_model(model).units}
        needs = {name: u.weight_grads or u.input_grads for name, u in units.items()}
        # parameters of modules without a backward (a frozen encoder before anything trains) are released
        # after their forward; all others, the loss's lm_head and final norm included, are used again
        unit_modules = {"vision.embed": inner.vision_tower.embeddings, "projector": inner.multi_modal_projector,
                        "llm.embed": inner.language_model.embed_tokens, "lm_head": model.lm_head,
                        **{f"vision.layer.{i}": m for i, m in enumerate(inner.vision_tower.encoder.layer)},
                        **{f"llm.layer.{i}": m for i, m in enumerate(inner.language_model.layers)}}
        in_unit = {id(p) for m in unit_modules.values() for p in m.parameters()}
        backward = {id(p) for name, m in unit_modules.items() if needs[name] or name == "lm_head" for p in m.parameters()}
        backward |= {id(p) for p in model.parameters() if id(p) not in in_unit}
        group_of = {id(p): i for i, g in enumerate(param_groups) for p in g["params"]}
        params = tuple(Param(p.numel(), p.requires_grad, group_of.get(id(p), -1), id(p) in backward)
                       for p in model.parameters())
        largest_leaf = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        blocks = [*inner.vision_tower.encoder.layer, *inner.language_model.layers, inner.language_model.embed_tokens,
                  model.lm_head, inner.multi_modal_projector]
        largest_block = max(sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks)
        cfg = model.config
        vc, tc = cfg.vision_config, cfg.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        img = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        return cls(
            params=params,
            llm=LLMDims(hidden=tc.hidden_size, q_dim=tc.num_attention_heads * head_dim,
                        kv_dim=tc.num_key_value_heads * head_dim, intermediate=tc.intermediate_size,
                        vocab=tc.vocab_size, layers=tc.num_hidden_layers, heads=tc.num_attention_heads),
            vision=VisionDims(hidden=vc.hidden_size, intermediate=vc.intermediate_size, layers=vc.num_hidden_layers,
                              heads=vc.num_attention_heads, tokens_per_tile=(img // patch) ** 2 + 1,
                              pixels_per_tile=3 * img * img,
                              image_seq_length=cfg.image_seq_length, rms_norm=vc.norm_type == "rms_norm",
                              qk_norm=bool(vc.use_qk_norm)),
            largest_leaf=largest_leaf,
            largest_block_trainable=largest_block,
            llm_backward=any(needs[f"llm.layer.{i}"] for i in range(tc.num_hidden_layers)),
            projector_backward=needs["projector"],
            vision_backward_layers=sum(needs[f"vision.layer.{i}"] for i in range(vc.num_hidden_layers)),
            llm_weights_train=any(p.requires_grad for p in inner.language_model.layers.parameters()),
            vision_trained_layers=sum(any(p.requires_grad for p in layer.parameters())
                                      for layer in inner.vision_tower.encoder.layer),
            attn_implementation=getattr(tc, "_attn_implementation", None) or "sdpa",
            lm_head_trains=any(p.requires_grad for p in model.lm_head.parameters()),
        )


@dataclass(frozen=True)
class ZeroSettings:
    """The parts of a DeepSpeed JSON that decide memory (DeepSpeed's defaults where a key is absent)."""

    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket_size: int = int(5e8)
    prefetch_bucket_size: int = int(5e7)
    persistence_threshold: int = int(1e5)
    max_reuse_distance: int = int(1e9)
    sub_group_size: int = int(1e9)
    contiguous_gradients: bool = True
    memory_efficient_linear: bool = True  # ZeRO-3 replaces F.linear with one that always keeps its input

    @classmethod
    def from_ds_config(cls, ds: dict[str, Any]) -> "ZeroSettings":
        z = ds.get("zero_optimization", {})

        def on(key: str) -> bool:
            return (z.get(key) or {}).get("device", "none") not in ("none", None)

        def num(key: str, default: float) -> int:
            return int(float(z.get(key, default)))

        return cls(stage=int(z.get("stage", 0)), offload_optimizer=on("offload_optimizer"), offload_param=on("offload_param"),
                   reduce_bucket_size=num("reduce_bucket_size", 5e8),
                   prefetch_bucket_size=num("stage3_prefetch_bucket_size", 5e7),
                   persistence_threshold=num("stage3_param_persistence_threshold", 1e5),
                   max_reuse_distance=num("stage3_max_reuse_distance", 1e9),
                   sub_group_size=num("sub_group_size", 1e9),
                   contiguous_gradients=bool(z.get("contiguous_gradients", True)),
                   memory_efficient_linear=bool(z.get("memory_efficient_linear", True)))

    def label(self) -> str:
        off = "+".join(n for n, o in (("optimizer", self.offload_optimizer), ("params", self.offload_param)) if o)
        return f"ZeRO-{self.stage}" + (f", offload {off}" if off else "")


@dataclass(frozen=True)
class Shape:
    """One micro-batch on one rank."""

    rows: int  # sequences
    length: int  # padded sequence length (tokens)
    tiles: int  # image tiles (448-px crops / thumbnails), all sequences together
    supervised: int | None = None  # tokens with a label (the loss's positions); None: every predicted position

    @property
    def supervised_tokens(self) -> int:
        """Supervised tokens: ``supervised``, or ``rows * (length - 1)`` (every position but the last
        predicts one) as the upper bound when it is not known."""
        return self.rows * (self.length - 1) if self.supervised is None else self.supervised


# ---------------------------------------------------------------------------------------------- output
@dataclass(frozen=True)
class Term:
    name: str
    kind: str  # params | grads | optimizer | activations
    nbytes: float
    phase: str  # standing | fwd_bwd | step
    device: str  # gpu | cpu


@dataclass
class Breakdown:
    terms: list[Term] = field(default_factory=list)

    def add(self, name: str, kind: str, nbytes: float, *, phase: str = "standing", device: str = "gpu") -> None:
        self.terms.append(Term(name, kind, float(nbytes), phase, device))

    def _sum(self, device: str, phase: str) -> float:
        return sum(t.nbytes for t in self.terms if t.device == device and t.phase == phase)

    def peak(self, device: str = "gpu") -> float:
        """Standing state plus the larger of the forward/backward and optimizer-step phases."""
        return self._sum(device, "standing") + max(self._sum(device, "fwd_bwd"), self._sum(device, "step"))

    def by_kind(self, device: str = "gpu") -> dict[str, float]:
        """Each kind's contribution at the peak (the phase that sets the peak counts, the other does not)."""
        peak_phase = "fwd_bwd" if self._sum(device, "fwd_bwd") >= self._sum(device, "step") else "step"
        out = dict.fromkeys(("params", "grads", "optimizer", "activations"), 0.0)
        for t in self.terms:
            if t.device == device and t.phase in ("standing", peak_phase):
                out[t.kind] += t.nbytes
        return out


# ---------------------------------------------------------------------------------------------- activations
def llm_layer_bytes_per_token(d: LLMDims, *, repeat_kv: bool, weights_train: bool = True,
                              linear_keeps_input: bool = False, eager: bool = False) -> int:
    """Bytes one decoder layer keeps for backward, per token (bf16, RMSNorm, SwiGLU, GQA).

    Each RMSNorm keeps its fp32 input (4h), its fp32 reciprocal RMS (4), its normalised bf16 value (2h)
    and its output, which the next matmuls keep (2h): 8h + 4. Attention keeps the rotated q (2q), k and
    v (2kv each, or 2q each when sdpa repeats them to full head count because a mask is given), its
    output, which o_proj reuses without a copy (2q), and its fp32 log-sum-exp (4 per head). The MLP
    keeps the gate and up outputs, SiLU(gate) and their product: 8i.

    A frozen layer that gradients pass through (``weights_train=False``) keeps no matmul inputs and no
    norm outputs: 4h + 4 per norm, the same attention tensors, and SiLU's input and the product's two
    factors (6i). Under ZeRO-3 (``linear_keeps_input``) DeepSpeed replaces ``F.linear`` with a function
    that keeps its input whether or not the weight trains: then only the norms' normalised values
    (2h each) are saved less than in a trained layer.

    ``eager`` (HF ``eager_attention_forward``): ``q @ k^T`` keeps q and the ``repeat_kv``'d k, ``probs @ v``
    the repeated v (pass ``repeat_kv=True``), and there is no log-sum-exp; the scores themselves are per
    row, not per token (:func:`eager_scores_bytes`). A frozen layer does not keep eager's output (2q):
    unlike sdpa's, no backward but a trained o_proj's needs it.
    """
    kv = d.q_dim if repeat_kv else d.kv_dim
    attention = 4 * d.q_dim + 4 * kv + (0 if eager else 4 * d.heads)
    if weights_train:
        return 16 * d.hidden + 8 + attention + 8 * d.intermediate
    if linear_keeps_input:
        return 12 * d.hidden + 8 + attention + 8 * d.intermediate
    # eager's output is a fresh tensor only a trained o_proj keeps (sdpa's own backward keeps sdpa's)
    return 8 * d.hidden + 8 + attention - (2 * d.q_dim if eager else 0) + 6 * d.intermediate


def vision_layer_bytes_per_token(d: VisionDims, *, weights_train: bool = True, linear_keeps_input: bool = False,
                                 eager: bool = False) -> int:
    """Bytes one InternViT layer keeps for backward, per token (bf16).

    Each of its two norms keeps its input and output: 4v + 4 (LayerNorm, bf16 mean and rstd) or
    8v + 4 (RMSNorm, as in the LLM). q and k keep 2v each, or 8v + 4 each through their own RMSNorm;
    v, the attention output and the two layer-scale inputs keep 2v each, the log-sum-exp 4 per head,
    and the MLP its GELU input and output: 4i.

    Frozen but passing gradients: norms keep only their input side (2v + 4, or 4v + 4), q/k RMSNorms
    6v + 4 each, no layer-scale inputs, and the MLP only the GELU input (2i). Under ZeRO-3's
    ``F.linear`` (``linear_keeps_input``) the matmul inputs are kept as well: the norm outputs (2v
    each) and the fc2 input (2i).

    ``eager`` keeps the same q, k, v and output (a frozen layer not its output, which only the projection
    keeps) but no log-sum-exp (the scores: :func:`eager_scores_bytes`).
    """
    v = d.hidden
    lse = 0 if eager else 4 * d.heads
    if not weights_train:
        norm = 4 * v + 4 if d.rms_norm else 2 * v + 4
        qk = 2 * (6 * v + 4) if d.qk_norm else 4 * v
        extra = 4 * v + 2 * d.intermediate if linear_keeps_input else 0
        # eager's output is a fresh tensor only a trained (or ZeRO-3-wrapped) projection keeps
        out = 2 * v if eager and not linear_keeps_input else 0
        return 2 * norm + qk + 4 * v - out + lse + 2 * d.intermediate + extra
    norm = 8 * v + 4 if d.rms_norm else 4 * v + 4
    qk = 2 * (8 * v + 4) if d.qk_norm else 4 * v
    return 2 * norm + qk + 8 * v + lse + 4 * d.intermediate


def eager_scores_bytes(*, heads: int, sequences: int, length: int, fp32_softmax: bool) -> int:
    """Bytes eager attention keeps of its ``length x length`` scores, in one layer.

    ``softmax`` keeps its output and ``probs @ v`` its probabilities (dropout at p=0 returns its input).
    The LLM's softmax runs in fp32 and is cast back to bf16: both copies are kept (6 bytes per score);
    InternViT's softmax stays in bf16, one tensor serving both (2 bytes). ``q @ k^T``, the scaling and
    the mask addition keep nothing more, so the additive mask itself is not kept.
    """
    return (FP32 + BF16 if fp32_softmax else BF16) * heads * sequences * length**2


def loss_is_chunked(shape: Shape, loss_chunk_tokens: int) -> bool:
    """Whether ``supervised_loss_sum`` takes the chunked path: more supervised positions in the micro-batch
    than ``train.loss_chunk_tokens`` (0 = never)."""
    return bool(loss_chunk_tokens) and shape.supervised_tokens > loss_chunk_tokens


def activations(f: ModelFacts, shape: Shape, *, ckpt_llm: bool, ckpt_vision: bool,
                linear_keeps_input: bool = False, loss_chunk_tokens: int = 0) -> dict[str, float]:
    """Saved activations (by module) and backward transients of one micro-batch, in bytes.

    ``linear_keeps_input``: ZeRO-3's ``F.linear`` keeps matmul inputs of frozen layers too.
    ``loss_chunk_tokens``: ``train.loss_chunk_tokens`` (0 = the loss is never chunked).
    """
    if f.attn_implementation not in ATTENTION:
        raise ValueError(f"model.attn_implementation={f.attn_implementation!r}: the plan models "
                         f"{', '.join(ATTENTION)} (resolve 'auto' first: vlmscale.plan.build.planned_attention)")
    tokens = shape.rows * shape.length
    vis_tokens = shape.tiles * f.vision.tokens_per_tile
    h, vocab = f.llm.hidden, f.llm.vocab
    sdpa, eager = f.attn_implementation == "sdpa", f.attn_implementation == "eager"
    llm_full = tokens * llm_layer_bytes_per_token(f.llm, repeat_kv=sdpa or eager, weights_train=f.llm_weights_train,
                                                  linear_keeps_input=linear_keeps_input, eager=eager)
    if sdpa:  # sdpa turns the boolean padding mask into a bf16 additive one and keeps it, in every layer
        llm_full += BF16 * shape.rows * shape.length ** 2
    if eager:
        llm_full += eager_scores_bytes(heads=f.llm.heads, sequences=shape.rows, length=shape.length, fp32_softmax=True)
    vis_scores = eager_scores_bytes(heads=f.vision.heads, sequences=shape.tiles, length=f.vision.tokens_per_tile,
                                    fp32_softmax=False) if eager else 0
    vis_full = vis_tokens * vision_layer_bytes_per_token(f.vision, eager=eager) + vis_scores
    vis_frozen = vis_tokens * vision_layer_bytes_per_token(f.vision, weights_train=False, eager=eager,
                                                           linear_keeps_input=linear_keeps_input) + vis_scores
    out = {"vision": 0.0, "projector": 0.0, "llm": 0.0, "logits": 0.0, "transient": 0.0}
    recompute = 0.0
    if f.vision_backward_layers:
        trained, frozen = f.vision_trained_layers, f.vision_backward_layers - f.vision_trained_layers
        if ckpt_vision:
            out["vision"] = f.vision_backward_layers * BF16 * vis_tokens * f.vision.hidden
        else:
            out["vision"] = trained * vis_full + frozen * vis_frozen
        recompute = max(recompute, vis_full if ckpt_vision else 0.0)
    if f.projector_backward:  # LayerNorm over 4v: input + output; GELU over h: input + output
        out["projector"] = shape.tiles * f.vision.image_seq_length * (16 * f.vision.hidden + 4 * h)
    if f.llm_backward:
        per_layer = BF16 * tokens * h if ckpt_llm else llm_full
        head_dim = f.llm.q_dim // f.llm.heads
        # shared by all layers: RoPE cos and sin (bf16), sdpa's boolean mask (eager's additive mask is not kept)
        shared = tokens * 4 * head_dim + (shape.rows * shape.length ** 2 if sdpa else 0)
        out["llm"] = f.llm.layers * per_layer + shared
        recompute = max(recompute, llm_full if ckpt_llm else 0.0)
    chunk = loss_chunk_tokens if loss_is_chunked(shape, loss_chunk_tokens) else 0
    out["logits"] = loss_saved_bytes(f, shape, linear_keeps_input=linear_keeps_input, chunk=chunk)
    # backward: fp32 gradients into and out of the log-softmax (8V per supervised token); chunked, one
    # chunk's fp32 logits and the log-sum-exp's fp32 temporary over them (8V per chunk position, in the
    # forward; the backward's recomputed bf16 + fp32 logits and bf16 gradient are 8V too); or scattering
    # the head's input gradient back: index_put into zeros over hidden[:, :-1], then the slice's backward
    # into zeros over all positions (bf16); or one recomputed layer
    sup = shape.supervised_tokens
    scatter = BF16 * h * (sup + shape.rows * (shape.length - 1) + tokens)
    out["transient"] = max((chunk or sup) * 8 * vocab, scatter, recompute)
    if eager and f.llm_backward:
        # the last layer's softmax backward: fp32 gradients into and out of it (8 bytes per score), while
        # the loss (but the hidden states the loop holds) and that layer's tensors after the softmax are
        # already freed; the layer keeps its first norm, q and k and the fp32 softmax output until then
        norm1 = 8 * h + 4 if f.llm_weights_train else (6 * h + 4 if linear_keeps_input else 4 * h + 4)
        scores = f.llm.heads * shape.rows * shape.length ** 2
        kept = tokens * (norm1 + 4 * f.llm.q_dim) + FP32 * scores
        softmax_backward = 2 * FP32 * scores - (out["logits"] - BF16 * h * tokens) + kept - (0 if ckpt_llm else llm_full)
        out["transient"] = max(out["transient"], softmax_backward)
    return out


def loss_saved_bytes(f: ModelFacts, shape: Shape, *, linear_keeps_input: bool = False, chunk: int = 0) -> int:
    """What the final norm and ``supervised_loss_sum`` keep for backward, and the hidden states the
    training loop holds (vlmscale/model/forward.py).

    Every position: the final RMSNorm's fp32 input (4h), reciprocal RMS (4) and normalised value (2h),
    and its output, the hidden states the training loop holds (2h). The boolean index keeps its mask
    (1 byte per predicted position). Per supervised token: the gathered hidden state that ``lm_head``
    keeps (2h; when it trains, or always under ZeRO-3's ``F.linear``), the fp32 log-softmax (4V) and the
    int64 target (8); and nll_loss's fp32 total weight (4). The bf16 and fp32 logits are freed when the
    loss returns.

    ``chunk`` > 0 (the chunked loss, ``ChunkedHeadLoss``): per supervised token only the head's input
    (2h, whether or not the head trains), the int64 target (8) and the fp32 log-sum-exp (4).
    """
    h, sup = f.llm.hidden, shape.supervised_tokens
    if chunk:
        return shape.rows * shape.length * (8 * h + 4) + shape.rows * (shape.length - 1) + sup * (BF16 * h + 8 + FP32)
    head_input = BF16 * h if f.lm_head_trains or linear_keeps_input else 0
    return (shape.rows * shape.length * (8 * h + 4) + shape.rows * (shape.length - 1)
            + sup * (head_input + FP32 * f.llm.vocab + 8) + 4)


# ---------------------------------------------------------------------------------------------- model states
def _partition(numel: int, world: int) -> int:
    return math.ceil(numel / world)


def _sub_groups(f: ModelFacts, world: int, sub_group_size: int) -> list[int]:
    """Partition sizes of DeepSpeed's optimizer sub-groups: each parameter group cut every ``sub_group_size``."""
    sizes: list[int] = []
    for g in sorted({p.group for p in f.params if p.trainable}):
        run = 0
        for p in (p for p in f.params if p.trainable and p.group == g):
            run += _partition(p.numel, world)
            if run >= sub_group_size:
                sizes.append(run)
                run = 0
        if run:
            sizes.append(run)
    return sizes or [0]


def plan(f: ModelFacts, z: ZeroSettings, *, world: int, shape: Shape, ckpt_llm: bool = False,
         ckpt_vision: bool = False, device: str = "cuda", loss_chunk_tokens: int = 0) -> Breakdown:
    """Per-rank memory terms of one training configuration.

    ``loss_chunk_tokens``: ``train.loss_chunk_tokens``; a micro-batch with more supervised positions than
    that runs the chunked loss (its logits one chunk at a time).

    ``device`` is where the run executes: AdamW's step keeps one fp32 temporary per element of the
    stepped group on a GPU (foreach) and two on a CPU (single-tensor ``sqrt`` then ``div``).
    """
    if z.stage not in (1, 2, 3):
        raise ValueError(f"zero_optimization.stage={z.stage}: vlmscale plans ZeRO stages 1-3")
    if z.offload_param and z.stage != 3:
        raise ValueError("offload_param needs ZeRO-3 (DeepSpeed offloads parameters only at stage 3)")
    b = Breakdown()
    n_all = f.num_params
    trainable = [p for p in f.params if p.trainable]
    part_t = sum(_partition(p.numel, world) for p in trainable)
    opt_dev = "cpu" if z.offload_optimizer else "gpu"
    # ------------------------------------------------ parameters
    if z.stage == 3:
        persistent = sum(p.numel for p in f.params if p.numel <= z.persistence_threshold)
        b.add("bf16 parameter partitions", "params", BF16 * sum(_partition(p.numel, world) for p in f.params),
              device="cpu" if z.offload_param else "gpu")
        # gathered once and kept, except during the optimizer step (re-gathered after it)
        b.add("persistent small parameters (whole)", "params", BF16 * persistent, phase="fwd_bwd")
        reused = sum(p.numel for p in f.params if p.backward and p.numel > z.persistence_threshold)
        working = min(reused, z.max_reuse_distance // 2 + z.prefetch_bucket_size + f.largest_leaf)
        b.add("gathered parameters (working set)", "params", BF16 * working, phase="fwd_bwd")
    else:
        b.add("bf16 parameters (whole model)", "params", BF16 * n_all)
    # ------------------------------------------------ gradients
    if z.stage == 1:
        b.add("bf16 gradients (whole)", "grads", BF16 * f.num_trainable)
    else:
        b.add("bf16 gradient partitions", "grads", BF16 * part_t, device=opt_dev if z.stage == 3 else "gpu")
    if z.contiguous_gradients and f.num_trainable:
        b.add("reduce bucket", "grads", BF16 * z.reduce_bucket_size)
    b.add("one layer's gradients before reduction", "grads", BF16 * f.largest_block_trainable, phase="fwd_bwd")
    # ------------------------------------------------ optimizer
    b.add("fp32 master weights", "optimizer", FP32 * part_t, device=opt_dev)
    b.add("Adam moments (fp32 m, v)", "optimizer", 2 * FP32 * part_t, device=opt_dev)
    # the step, one optimizer group at a time (ZeRO-3 also cuts groups every sub_group_size elements):
    # that group's fp32 gradient, and AdamW's temporaries over its flat fp32 partition
    temps = 2 if device == "cpu" or z.offload_optimizer else 1
    stepped = max(_sub_groups(f, world, z.sub_group_size if z.stage == 3 else 2**62))
    if z.offload_optimizer:  # the CPU optimizer keeps a standing fp32 gradient buffer per group
        b.add("fp32 gradient buffers (offloaded optimizer)", "optimizer", FP32 * part_t, device="cpu")
    else:
        b.add("step: fp32 gradient of one optimizer group", "optimizer", FP32 * stepped, phase="step")
    b.add("step: AdamW temporaries", "optimizer", FP32 * temps * stepped, phase="step", device=opt_dev)
    # ------------------------------------------------ activations
    act = activations(f, shape, ckpt_llm=ckpt_llm, ckpt_vision=ckpt_vision,
                      linear_keeps_input=z.stage == 3 and z.memory_efficient_linear, loss_chunk_tokens=loss_chunk_tokens)
    # the micro-batch, held by the training loop through the step: fp32 pixels (and their bf16 copy when
    # the encoder trains, which its patch embedding keeps); int64 ids, labels and attention mask
    pixels = shape.tiles * f.vision.pixels_per_tile * (FP32 + (BF16 if f.vision_backward_layers else 0))
    b.add("micro-batch inputs", "activations", pixels + 3 * 8 * shape.rows * shape.length)
    for key in ("vision", "projector", "llm", "logits"):
        b.add(f"activations: {key}", "activations", act[key], phase="fwd_bwd")
    b.add("activations: backward transients", "activations", act["transient"], phase="fwd_bwd")
    # the training loop still references the last micro-batch's bf16 hidden states while the optimizer steps
    b.add("step: last micro-batch's hidden states", "activations", BF16 * shape.rows * shape.length * f.llm.hidden,
          phase="step")
    return b


# ---------------------------------------------------------------------------------------------- DeepSpeed's estimators
def deepspeed_estimate(f: ModelFacts, z: ZeroSettings, *, nodes: int, gpus_per_node: int) -> tuple[float, float]:
    """``(per-GPU, per-node CPU)`` bytes from DeepSpeed's own model-state estimators (zero_init=True,
    additional_buffer_factor=1.5): fp16 parameters, fp32 Adam, every parameter trained, no activations."""
    if z.stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=f.num_params, largest_layer_params=f.largest_leaf, num_gpus_per_node=gpus_per_node,
            num_nodes=nodes, cpu_offload=z.offload_optimizer, cpu_offload_params=z.offload_param, zero_init=True)
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params=f.num_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
            cpu_offload=z.offload_optimizer)
    return float(gpu), float(cpu)
