"""``vlmscale plan``: parameter counts, activation formulas against autograd, term arithmetic, DeepSpeed's estimators."""

from __future__ import annotations

import dataclasses
import math
from itertools import product

import pytest
import torch
from transformers import InternVLVisionConfig, Qwen2Config
from transformers.models.internvl.modeling_internvl import InternVLVisionLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from vlmscale.cli import main
from vlmscale.config import AlignConfig, SFTConfig, load_config
from vlmscale.plan.build import facts_for
from vlmscale.plan.memory import (
    LLMDims,
    ModelFacts,
    Param,
    Shape,
    VisionDims,
    ZeroSettings,
    activations,
    deepspeed_estimate,
    eager_scores_bytes,
    llm_layer_bytes_per_token,
    plan,
    vision_layer_bytes_per_token,
)
from vlmscale.model.specs import SPECS, meta_model, spec_config


@pytest.fixture(autouse=True)
def _no_global_state_left_behind(monkeypatch):
    """A plan test must leave torch's defaults, ``F.linear`` and transformers' ZeRO-3 switch as it found
    them, pass or fail: later tests in the same process (tests/unit/test_train_step.py) build real models.

    Each starts from torch's own ``F.linear``: an earlier test in the process that built a ZeRO-3 engine
    (test_ewc, test_train_step) leaves DeepSpeed's replacement installed, which keeps more for backward.
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    def state():
        return (torch.get_default_dtype(), torch.get_default_device(), torch.nn.functional.linear,
                is_deepspeed_zero3_enabled(), torch.is_grad_enabled())

    before = state()
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)
    yield
    monkeypatch.undo()
    assert state() == before


# ---------------------------------------------------------------------------------------------- model sizes
@pytest.mark.parametrize("name", sorted(SPECS))
def test_named_sizes_match_published_parameter_counts(name):
    total = sum(p.numel() for p in meta_model(spec_config(name)).parameters())
    assert total / 1e9 == pytest.approx(SPECS[name][2], rel=0.015)


def test_internvl2_26b_parts():
    model = meta_model(spec_config("internvl2-26b"))
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    llm = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    # InternViT-6B without its last 3 layers (45 x 3200); InternLM2-20B with untied 92553-token embeddings
    assert vision / 1e9 == pytest.approx(5.54, abs=0.01)
    assert llm / 1e9 == pytest.approx(19.86, abs=0.01)
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------- activation formulas
def _saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _decoder_saved(rows: int, length: int, *, mask: bool, trained: bool,
                   attention: str = "sdpa") -> tuple[int, LLMDims]:
    cfg = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160, vocab_size=100)
    cfg._attn_implementation = attention
    layer = Qwen2DecoderLayer(cfg, 0).to(torch.bfloat16).requires_grad_(trained)
    x = torch.randn(rows, length, 64, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(length)[None].expand(rows, -1)
    cos, sin = Qwen2RotaryEmbedding(cfg)(x, pos)
    attn_mask = torch.ones(rows, 1, length, length, dtype=torch.bool).tril() if mask else None
    if mask and attention == "eager":  # eager adds the mask: transformers gives it as a bf16 additive one
        attn_mask = torch.zeros(rows, 1, length, length, dtype=torch.bfloat16).masked_fill(~attn_mask, -1e4)
    saved = _saved_bytes(lambda: layer(x, attention_mask=attn_mask, position_ids=pos, position_embeddings=(cos, sin)),
                         layer.parameters())
    # cos and sin (bf16, head_dim each per token) are shared by all layers; the plan counts them once per model
    saved -= 2 * 2 * rows * length * 16
    return saved, LLMDims(hidden=64, q_dim=64, kv_dim=32, intermediate=160, vocab=100, layers=1, heads=4)


@pytest.mark.parametrize("trained", [True, False])  # False: frozen, but gradients pass through (align)
@pytest.mark.parametrize("length", [24, 40])
def test_llm_layer_formula_equals_what_autograd_keeps(length, trained):
    saved, dims = _decoder_saved(2, length, mask=False, trained=trained)  # no mask: k, v at their own head count
    assert saved == 2 * length * llm_layer_bytes_per_token(dims, repeat_kv=False, weights_train=trained)
    saved, dims = _decoder_saved(2, length, mask=True, trained=trained)  # padding mask: k, v repeated; bf16 mask kept
    assert saved == 2 * length * llm_layer_bytes_per_token(dims, repeat_kv=True, weights_train=trained) + 2 * 2 * length**2


@pytest.mark.parametrize("trained", [True, False])
@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("length", [24, 40])
def test_llm_layer_formula_equals_what_autograd_keeps_eager(length, mask, trained):
    """Eager: repeated k and v, the fp32 softmax and its bf16 cast (6 bytes per score), no log-sum-exp,
    and the additive mask not kept."""
    saved, dims = _decoder_saved(2, length, mask=mask, trained=trained, attention="eager")
    scores = eager_scores_bytes(heads=4, sequences=2, length=length, fp32_softmax=True)
    assert scores == 6 * 4 * 2 * length**2
    assert saved == 2 * length * llm_layer_bytes_per_token(dims, repeat_kv=True, weights_train=trained,
                                                           eager=True) + scores


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("trained", [True, False])
@pytest.mark.parametrize("rms, qk", [(False, False), (True, True)])  # InternViT-300M style, InternViT-6B style
def test_vision_layer_formula_equals_what_autograd_keeps(rms, qk, trained, attention):
    vc = InternVLVisionConfig(hidden_size=64, num_attention_heads=4, intermediate_size=256, image_size=32, patch_size=8,
                              norm_type="rms_norm" if rms else "layer_norm", use_qk_norm=qk)
    vc._attn_implementation = attention
    layer = InternVLVisionLayer(vc).to(torch.bfloat16).requires_grad_(trained)
    x = torch.randn(3, 17, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = _saved_bytes(lambda: layer(x), layer.parameters())
    dims = VisionDims(hidden=64, intermediate=256, layers=1, heads=4, tokens_per_tile=17, pixels_per_tile=3 * 32 * 32,
                      image_seq_length=4, rms_norm=rms, qk_norm=qk)
    eager = attention == "eager"
    scores = eager_scores_bytes(heads=4, sequences=3, length=17, fp32_softmax=False) if eager else 0
    assert saved == 3 * 17 * vision_layer_bytes_per_token(dims, weights_train=trained, eager=eager) + scores


def test_frozen_layers_under_zero3_keep_their_matmul_inputs(monkeypatch):
    """ZeRO-3's zero.Init replaces F.linear for good with a function that saves input, weight and bias."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    saved, dims = _decoder_saved(2, 24, mask=False, trained=False)
    assert saved == 2 * 24 * llm_layer_bytes_per_token(dims, repeat_kv=False, weights_train=False,
                                                       linear_keeps_input=True)
    saved, dims = _decoder_saved(2, 24, mask=True, trained=False, attention="eager")
    assert saved == 2 * 24 * llm_layer_bytes_per_token(dims, repeat_kv=True, weights_train=False, eager=True,
                                                       linear_keeps_input=True) + 6 * 4 * 2 * 24**2
    for (rms, qk), attention in product(((False, False), (True, True)), ("sdpa", "eager")):
        vc = InternVLVisionConfig(hidden_size=64, num_attention_heads=4, intermediate_size=256, image_size=32,
                                  patch_size=8, norm_type="rms_norm" if rms else "layer_norm", use_qk_norm=qk)
        vc._attn_implementation = attention
        layer = InternVLVisionLayer(vc).to(torch.bfloat16).requires_grad_(False)
        x = torch.randn(3, 17, 64, dtype=torch.bfloat16, requires_grad=True)
        dims = VisionDims(hidden=64, intermediate=256, layers=1, heads=4, tokens_per_tile=17, pixels_per_tile=1,
                          image_seq_length=4, rms_norm=rms, qk_norm=qk)
        scores = 2 * 4 * 3 * 17**2 if attention == "eager" else 0
        assert _saved_bytes(lambda: layer(x), layer.parameters()) == 3 * 17 * vision_layer_bytes_per_token(
            dims, weights_train=False, linear_keeps_input=True, eager=attention == "eager") + scores


def _loss_saved(h: int, vocab: int, rows: int, length: int, *, head_trains: bool, chunk: int):
    """Bytes the final RMSNorm + ``supervised_loss_sum`` keep for backward (``chunk`` > 0: the chunked head),
    counting the norm's output as the hidden states the training loop holds; with the supervised count,
    matching ModelFacts and the Shape."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from vlmscale.model.forward import enable_chunked_loss, num_supervised, supervised_loss_sum

    norm = Qwen2RMSNorm(h).to(torch.bfloat16)
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(h, vocab, bias=False).to(torch.bfloat16).requires_grad_(head_trains)
    if chunk:
        enable_chunked_loss(model, chunk)
    x = torch.randn(rows, length, h, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (rows, length))
    labels[0, :9] = labels[1, 15:] = -100  # a prompt, and padding
    sup = num_supervised(labels)
    kept = {}

    def loss():
        kept["hidden"] = norm(x)  # the training loop holds it; here it is saved by no one
        return supervised_loss_sum(model, kept["hidden"], labels)

    saved = _saved_bytes(loss, [*norm.parameters(), *model.lm_head.parameters()])
    saved += kept["hidden"].untyped_storage().nbytes()
    facts = _facts()
    d = dataclasses.replace(facts, llm=dataclasses.replace(facts.llm, hidden=h, vocab=vocab), lm_head_trains=head_trains)
    return saved, sup, d, Shape(rows=rows, length=length, tiles=0, supervised=sup)


@pytest.mark.parametrize("head_trains", [True, False])
def test_loss_formula_equals_what_autograd_keeps(head_trains):
    """Final RMSNorm + ``supervised_loss_sum`` keep 8h + 4 per position (the norm's output counted as the
    hidden states the training loop holds), the boolean index's mask (1 per predicted position) and, per
    supervised token, the head's input (2h, when it trains), the fp32 log-softmax (4V) and the int64
    target (8); plus nll_loss's fp32 total weight (4)."""
    h, vocab, rows, length = 64, 96, 2, 24
    saved, sup, d, shape = _loss_saved(h, vocab, rows, length, head_trains=head_trains, chunk=0)
    assert sup == 2 * 23 - 8 - 9
    assert saved == (rows * length * (8 * h + 4) + rows * (length - 1)
                     + sup * ((2 * h if head_trains else 0) + 4 * vocab + 8) + 4)
    assert activations(d, shape, ckpt_llm=False, ckpt_vision=False)["logits"] == saved
    # unknown supervision: every predicted position (the upper bound)
    assert Shape(rows=rows, length=length, tiles=0).supervised_tokens == rows * (length - 1)


@pytest.mark.parametrize("head_trains", [True, False])
def test_chunked_loss_formula_equals_what_autograd_keeps(head_trains):
    """Above ``train.loss_chunk_tokens`` supervised positions the chunked loss keeps, per supervised token,
    the head's input (2h, trained head or not), the int64 target (8) and the fp32 log-sum-exp (4); per
    position the same final-norm terms and the index mask; no fp32 log-softmax. At or below the chunk the
    plan keeps the unchunked formula, and its loss transient is one chunk's 8V per position."""
    from vlmscale.plan.memory import loss_is_chunked

    h, vocab, rows, length, chunk = 64, 96, 2, 24, 8
    saved, sup, d, shape = _loss_saved(h, vocab, rows, length, head_trains=head_trains, chunk=chunk)
    assert loss_is_chunked(shape, chunk) and not loss_is_chunked(shape, sup) and not loss_is_chunked(shape, 0)
    assert saved == rows * length * (8 * h + 4) + rows * (length - 1) + sup * (2 * h + 8 + 4)
    act = activations(d, shape, ckpt_llm=False, ckpt_vision=False, loss_chunk_tokens=chunk)
    assert act["logits"] == saved
    assert act["transient"] == max(chunk * 8 * vocab, 2 * h * (sup + rows * (length - 1) + rows * length))
    assert activations(d, shape, ckpt_llm=False, ckpt_vision=False, loss_chunk_tokens=sup) == \
        activations(d, shape, ckpt_llm=False, ckpt_vision=False)


# ---------------------------------------------------------------------------------------------- term arithmetic
def _facts(*, llm_backward=True, projector_backward=True, vision_layers=0) -> ModelFacts:
    return ModelFacts(
        params=(Param(1000, True, 0), Param(10, True, 1), Param(501, False, -1)),
        llm=LLMDims(hidden=8, q_dim=8, kv_dim=4, intermediate=16, vocab=32, layers=2, heads=2),
        vision=VisionDims(hidden=4, intermediate=16, layers=1, heads=1, tokens_per_tile=5, pixels_per_tile=48,
                          image_seq_length=1, rms_norm=False, qk_norm=False),
        largest_leaf=1000, largest_block_trainable=1000, llm_backward=llm_backward,
        projector_backward=projector_backward, vision_backward_layers=vision_layers)


def _terms(b) -> dict[str, float]:
    return {t.name: t.nbytes for t in b.terms}


def test_zero3_terms_by_hand():
    z = ZeroSettings(stage=3, reduce_bucket_size=64, prefetch_bucket_size=0, persistence_threshold=10,
                     max_reuse_distance=0, sub_group_size=10**9)
    shape = Shape(rows=1, length=4, tiles=0)
    t = _terms(plan(_facts(), z, world=4, shape=shape, device="cuda"))
    assert t["bf16 parameter partitions"] == 2 * (250 + 3 + 126)  # ceil(n / 4) per parameter
    assert t["persistent small parameters (whole)"] == 2 * 10
    assert t["gathered parameters (working set)"] == 2 * 1000  # min(non-persistent 1501, 0 + 0 + largest leaf)
    assert t["bf16 gradient partitions"] == 2 * 253  # trainable only
    assert t["reduce bucket"] == 2 * 64
    assert t["fp32 master weights"] == 4 * 253
    assert t["Adam moments (fp32 m, v)"] == 8 * 253
    assert t["step: fp32 gradient of one optimizer group"] == 4 * 250  # the larger of the two groups' partitions
    assert t["step: AdamW temporaries"] == 4 * 250  # GPU: one fp32 temporary (foreach)
    # LLM layer: 16h + 8 + 4q + 4q (repeated kv) + 4 heads + 8i = 128 + 8 + 32 + 32 + 8 + 128 = 336 per token
    assert llm_layer_bytes_per_token(_facts().llm, repeat_kv=True) == 336
    assert t["activations: llm"] == 2 * (4 * 336 + 2 * 16) + 4 * 4 * 4 + 16  # layers + mask per layer; rope, bool mask
    # every position's final norm and hidden state, the index mask, and per supervised token (3 of 4 by
    # default: all that predict one) the head's input, fp32 log-softmax and int64 target; nll_loss's weight
    assert t["activations: logits"] == 4 * (8 * 8 + 4) + 3 + 3 * (2 * 8 + 4 * 32 + 8) + 4
    assert t["activations: backward transients"] == 3 * 8 * 32  # fp32 gradients in and out of the log-softmax
    assert t["micro-batch inputs"] == 3 * 8 * 4  # no tiles: ids, labels, mask
    assert t["step: last micro-batch's hidden states"] == 2 * 4 * 8
    one_supervised = _terms(plan(_facts(), z, world=4, shape=dataclasses.replace(shape, supervised=1), device="cuda"))
    assert t["activations: logits"] - one_supervised["activations: logits"] == 2 * (2 * 8 + 4 * 32 + 8)
    b = plan(_facts(), z, world=4, shape=shape)
    standing = 2 * 379 + 2 * 253 + 128 + 4 * 253 + 8 * 253 + 96
    fwd_bwd = 20 + 2000 + 2000 + sum(v for k, v in t.items() if k.startswith("activations"))
    assert b.peak() == standing + max(fwd_bwd, 8 * 250 + 64)
    assert b.peak() == standing + fwd_bwd


def test_checkpointing_keeps_layer_inputs_and_recomputes_one_layer():
    z = ZeroSettings(stage=3)
    shape = Shape(rows=2, length=16, tiles=0)
    full = activations(_facts(), shape, ckpt_llm=False, ckpt_vision=False)
    ckpt = activations(_facts(), shape, ckpt_llm=True, ckpt_vision=False)
    one_layer = (full["llm"] - (32 * 4 * 4 + 2 * 256)) / 2
    assert ckpt["llm"] == 2 * (2 * 32 * 8) + 32 * 4 * 4 + 2 * 256
    assert ckpt["transient"] == max(full["transient"], one_layer)
    assert plan(_facts(), z, world=2, shape=shape, ckpt_llm=True).peak() < plan(_facts(), z, world=2, shape=shape).peak()


def test_eager_attention_terms_by_hand():
    """Eager keeps 6 bytes per LLM score per layer; the last layer's softmax backward (8 bytes per score,
    fp32 gradients in and out) can set the transient once the loss and that layer's tail are freed."""
    f = dataclasses.replace(_facts(), attn_implementation="eager")
    shape = Shape(rows=2, length=64, tiles=0, supervised=3)
    act = activations(f, shape, ckpt_llm=False, ckpt_vision=False)
    scores = 2 * 2 * 64**2  # heads * rows * length^2
    per_layer = 128 * llm_layer_bytes_per_token(f.llm, repeat_kv=True, eager=True) + 6 * scores
    assert act["llm"] == 2 * per_layer + 128 * 4 * 4  # no mask shared or per layer: RoPE only
    kept = 128 * (8 * 8 + 4 + 4 * 8) + 4 * scores  # first norm, q, repeated k, fp32 softmax output
    softmax_backward = 8 * scores - (act["logits"] - 2 * 8 * 128) - (per_layer - kept)
    assert softmax_backward > 3 * 8 * 32  # the loss's gradients are smaller here
    assert act["transient"] == softmax_backward
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        activations(dataclasses.replace(f, attn_implementation="auto"), shape, ckpt_llm=False, ckpt_vision=False)


def test_auto_attention_resolves_for_the_planned_device():
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny"])
    assert cfg.model.attn_implementation == "auto"
    assert facts_for(cfg, device="cpu").attn_implementation == "eager"
    assert facts_for(cfg).attn_implementation == "sdpa"  # GPU: sdpa, an upper bound of flash-attention
    flash = load_config(SFTConfig, overrides=["model.preset=tiny", "model.attn_implementation=flash_attention_2"])
    assert facts_for(flash, device="cpu").attn_implementation == "flash_attention_2"


def test_offload_moves_optimizer_state_to_cpu():
    shape = Shape(rows=1, length=4, tiles=0)
    on_gpu = plan(_facts(), ZeroSettings(stage=3), world=4, shape=shape)
    off = plan(_facts(), ZeroSettings(stage=3, offload_optimizer=True, offload_param=True), world=4, shape=shape)
    cpu = _terms(off)
    assert {t.name for t in off.terms if t.device == "cpu"} >= {"fp32 master weights", "Adam moments (fp32 m, v)",
                                                                "bf16 parameter partitions"}
    assert cpu["fp32 gradient buffers (offloaded optimizer)"] == 4 * 253
    assert off.peak("gpu") < on_gpu.peak("gpu") and off.peak("cpu") > 0
    with pytest.raises(ValueError, match="offload_param needs ZeRO-3"):
        plan(_facts(), ZeroSettings(stage=2, offload_param=True), world=4, shape=shape)


def test_policy_decides_gradients_optimizer_state_and_activations():
    sft = facts_for(load_config(SFTConfig, overrides=["model.preset=demo"]))  # vision frozen
    both = facts_for(load_config(SFTConfig, overrides=["model.preset=demo", "policy.vision.trainable=true"]))
    align = facts_for(load_config(AlignConfig, overrides=["model.preset=demo"]))  # projector only
    assert sft.vision_backward_layers == 0 and both.vision_backward_layers == 4
    assert both.num_trainable == both.num_params > sft.num_trainable > align.num_trainable > 0
    # align: the frozen LLM still back-propagates to the projector, so it keeps its activations
    assert align.llm_backward and align.projector_backward
    shape = Shape(rows=2, length=64, tiles=4)
    z = ZeroSettings(stage=3)
    a, s = _terms(plan(align, z, world=2, shape=shape)), _terms(plan(sft, z, world=2, shape=shape))
    assert a["Adam moments (fp32 m, v)"] < s["Adam moments (fp32 m, v)"]
    assert 0 < a["activations: llm"] < s["activations: llm"]  # frozen: no matmul inputs kept
    assert not align.llm_weights_train and sft.llm_weights_train
    assert _terms(plan(both, z, world=2, shape=shape))["activations: vision"] > 0 == s["activations: vision"]
    lora = facts_for(load_config(SFTConfig, overrides=["model.preset=demo", "lora.enabled=true", "lora.r=4"]))
    assert 0 < lora.num_trainable < sft.num_trainable and lora.num_params > sft.num_params
    assert lora.llm_weights_train  # adapters keep the matmul inputs as trained weights do
    # training vision layer 1 of 4: layers 1-3 pass gradients, only layer 1 keeps what its weights need
    part = facts_for(load_config(SFTConfig, overrides=["model.preset=demo", "policy.vision.trainable=true",
                                                       "policy.vision.layers=1-1"]))
    assert (part.vision_backward_layers, part.vision_trained_layers) == (3, 1)


# ---------------------------------------------------------------------------------------------- DeepSpeed's estimators
def _all_trained_26b() -> ModelFacts:
    return facts_for(load_config(SFTConfig, overrides=["model.init_from=internvl2-26b", "policy.vision.trainable=true"]))


def test_zero3_states_are_deepspeeds_estimate_without_the_fp32_gradient_partition():
    """DeepSpeed counts 18 bytes per parameter per GPU (2 fp16 params + 16: fp32 params, grads, m, v) plus
    4 bytes per parameter of the largest layer. We keep 2 bf16 params + 2 bf16 grads + 4 + 8 = 16 standing;
    the fp32 gradient exists for one optimizer sub-group during the step only."""
    facts, world = _all_trained_26b(), 32
    assert facts.num_trainable == facts.num_params
    z = ZeroSettings(stage=3, contiguous_gradients=False, persistence_threshold=0)
    ds_gpu, _ = deepspeed_estimate(facts, z, nodes=4, gpus_per_node=8)
    t = _terms(plan(facts, z, world=world, shape=Shape(1, 16, 0)))
    ours = sum(t[k] for k in ("bf16 parameter partitions", "bf16 gradient partitions", "fp32 master weights",
                              "Adam moments (fp32 m, v)"))
    theirs_per_param = ds_gpu - 4 * facts.largest_leaf
    assert ours == pytest.approx(theirs_per_param * 16 / 18, rel=1e-4)
    assert ds_gpu / 2**30 == pytest.approx(15.48, abs=0.01)  # what estimate_zero3_..._all_cold prints


def test_zero2_states_are_deepspeeds_estimate_without_the_fp32_gradient_partition():
    """DeepSpeed's ZeRO-2 figure is 2 bytes per parameter plus 18 per parameter per GPU. DeepSpeed 0.19's
    stage 1/2 step also makes each group's fp32 gradient just before stepping that group and frees it
    after, so we keep 2 + 14/W standing and 4 bytes per element of the largest group during the step."""
    facts = _all_trained_26b()
    z = ZeroSettings(stage=2, contiguous_gradients=False)
    ds_gpu, _ = deepspeed_estimate(facts, z, nodes=4, gpus_per_node=8)
    t = _terms(plan(facts, z, world=32, shape=Shape(1, 16, 0)))
    standing = sum(t[k] for k in ("bf16 parameters (whole model)", "bf16 gradient partitions", "fp32 master weights",
                                  "Adam moments (fp32 m, v)"))
    assert standing == pytest.approx(ds_gpu - 4 * facts.num_params / 32, rel=1e-4)
    assert t["step: fp32 gradient of one optimizer group"] < 4 * facts.num_params / 32


# ---------------------------------------------------------------------------------------------- the command
def test_plan_command_reports_a_real_size(capsys, tmp_path):
    out = tmp_path / "plan.json"
    code = main(["plan", "--model", "internvl2-26b", "--nodes", "4", "--gpus-per-node", "8", "--gpu-mem", "40",
                 "--json", str(out), "data.max_seq_len=4096", "train.micro_batch_size=1",
                 "train.activation_checkpointing.llm=true"])
    text = capsys.readouterr().out
    assert code == 0
    assert "25.514B parameters" in text and "what fits" in text and "DeepSpeed's estimator" in text
    import json

    data = json.loads(out.read_text())
    rows = {r["setting"]: r for r in data["alternatives"]}
    assert rows["ZeRO-2; checkpointing none"]["max_micro_batch"] == 0  # 51 GB of bf16 weights on every GPU
    assert rows["ZeRO-3; checkpointing llm"]["max_micro_batch"] >= 1
    assert data["configured"]["peak_gpu_gib"] < 40


def test_config_dirs_and_compositions_count_the_same_model(tmp_path):
    spec_config("internvl2-2b").save_pretrained(tmp_path)  # an HF config.json, as a downloaded model has
    named = facts_for(load_config(SFTConfig, overrides=["model.init_from=internvl2-2b"]))
    from_dir = facts_for(load_config(SFTConfig, overrides=[f"model.init_from={tmp_path}"]))
    composed = facts_for(load_config(SFTConfig, overrides=["model.vision=internvit-300m", "model.llm=internlm2-1.8b"]))
    assert named.num_params == from_dir.num_params == composed.num_params
    assert named.num_trainable == from_dir.num_trainable == composed.num_trainable


def test_plan_command_errors(capsys):
    assert main(["plan", "--model", "no-such-model"]) == 2
    assert "not a preset" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny", "--nodes", "0"]) == 2


def test_micro_batch_search_is_the_largest_that_fits():
    from vlmscale.plan.report import Cluster, Setting, breakdown, max_micro_batch

    cfg = load_config(SFTConfig, overrides=["model.init_from=internvl2.5-8b", "data.max_seq_len=2048"])
    facts = facts_for(cfg)
    cluster = Cluster(nodes=1, gpus_per_node=8, gpu_mem_gib=40, reserve_gib=2)
    setting = Setting(ZeroSettings(stage=3), ckpt_llm=True, ckpt_vision=False)
    best = max_micro_batch(cfg, facts, cluster, setting, limit=64)
    assert 1 <= best < 64
    assert breakdown(cfg, facts, cluster, setting, best).peak() <= cluster.usable
    assert breakdown(cfg, facts, cluster, setting, best + 1).peak() > cluster.usable
    assert math.isfinite(best)
