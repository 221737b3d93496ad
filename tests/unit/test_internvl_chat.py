"""InternVL's original format: published key layouts, wqkv split/fuse, bitwise round trips, equal logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, LlamaConfig, Qwen2Config
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from vlmscale.config.schema import ModelConfig
from vlmscale.constants import IMG_CONTEXT
from vlmscale.model.build import build_model, load_pretrained, load_weights_plain
from vlmscale.model.forward import vlm_logits
from vlmscale.model.internvl_chat import (
    ARCHITECTURES,
    AUTO_MAP,
    export_original,
    fuse_wqkv,
    import_original,
    is_internvl_chat,
    split_wqkv,
)
from vlmscale.model.shards import hf_weights, index_weights
from vlmscale.model.tokenizer import ProcessorAssets

VISION = {  # the two InternViT layouts, at toy sizes
    "300m": dict(norm_type="layer_norm", attention_bias=True, use_qk_norm=False),
    "6b": dict(norm_type="rms_norm", attention_bias=False, use_qk_norm=True),
}
LLM = {"qwen2": Qwen2Config, "llama": LlamaConfig, "internlm2": LlamaConfig}  # InternLM2 is Llama-shaped in HF

# layer 0 and the non-layer tensors of each part, as OpenGVLab's modeling code names them
VIT_LAYER = {
    "300m": {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "norm1.weight", "norm1.bias",
             "norm2.weight", "norm2.bias"},
    "6b": {"attn.qkv.weight", "attn.q_norm.weight", "attn.k_norm.weight", "attn.proj.weight", "attn.proj.bias",
           "norm1.weight", "norm2.weight"},
}
VIT_COMMON = {"mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls1", "ls2"}
LLM_LAYER = {
    "qwen2": {f"self_attn.{x}_proj.{p}" for x in "qkv" for p in ("weight", "bias")}
    | {"self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
       "input_layernorm.weight", "post_attention_layernorm.weight"},
    "llama": {f"self_attn.{x}_proj.weight" for x in "qkvo"}
    | {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
       "post_attention_layernorm.weight"},
    "internlm2": {"attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                  "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight"},
}
LLM_TOP = {
    "qwen2": {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight", "language_model.lm_head.weight"},
    "llama": {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight", "language_model.lm_head.weight"},
    "internlm2": {"language_model.model.tok_embeddings.weight", "language_model.model.norm.weight",
                  "language_model.output.weight"},
}


def _hf_model(vision: str, llm: str, tiny_assets, out):
    torch.manual_seed(0)
    tok = tiny_assets.tokenizer
    v = InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8, layer_scale_init_value=0.1, **VISION[vision])
    t = LLM[llm](hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                 vocab_size=len(tok), tie_word_embeddings=False, max_position_embeddings=256,
                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config = InternVLConfig(vision_config=v.to_dict(), text_config=t.to_dict(), image_token_id=tiny_assets.token_id(IMG_CONTEXT),
                            image_seq_length=4, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    model = InternVLForConditionalGeneration._from_config(config, dtype=torch.float32)
    with torch.no_grad():  # layer scales, norms and biases start at constants; make every tensor distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=12,
                                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    ProcessorAssets(tokenizer=tok, image_processor=processor, image_seq_length=4).save(out)
    return model


def _logits(model, assets):
    ids = torch.tensor([[20, 21, 22] + [assets.token_id(IMG_CONTEXT)] * 4 + [23, 24, 25]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return vlm_logits(model.eval(), input_ids=ids, attention_mask=None, pixel_values=pixels)


@pytest.mark.parametrize("vision", sorted(VISION))
@pytest.mark.parametrize("llm", sorted(LLM))
def test_round_trip_is_bitwise_and_keys_are_published(vision, llm, tiny_assets, tmp_path):
    _hf_model(vision, llm, tiny_assets, tmp_path / "hf")
    export_original(tmp_path / "hf", tmp_path / "orig", llm=llm if llm == "internlm2" else None)
    assert is_internvl_chat(tmp_path / "orig")
    keys = set(index_weights(tmp_path / "orig"))
    layer0 = {k[len("vision_model.encoder.layers.0."):] for k in keys if k.startswith("vision_model.encoder.layers.0.")}
    assert layer0 == VIT_LAYER[vision] | VIT_COMMON
    assert {k for k in keys if k.startswith("vision_model.embeddings.")} == {
        f"vision_model.embeddings.{x}" for x in ("class_embedding", "position_embedding", "patch_embedding.weight",
                                                 "patch_embedding.bias")}
    assert {k for k in keys if k.startswith("mlp1.")} == {f"mlp1.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    lm0 = {k[len("language_model.model.layers.0."):] for k in keys if k.startswith("language_model.model.layers.0.")}
    assert lm0 == LLM_LAYER[llm]
    assert {k for k in keys if k.startswith("language_model.") and ".layers." not in k} == LLM_TOP[llm]
    orig = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert orig["architectures"] == ARCHITECTURES and orig["auto_map"] == AUTO_MAP
    assert orig["llm_config"]["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                                                    "internlm2": "InternLM2ForCausalLM"}[llm]]
    assert orig["max_dynamic_patch"] == 12
    assert json.loads((tmp_path / "orig" / "preprocessor_config.json").read_text())["image_mean"] == [0.485, 0.456, 0.406]

    import_original(tmp_path / "orig", tmp_path / "back")
    before, after = hf_weights(tmp_path / "hf"), hf_weights(tmp_path / "back")
    assert before.keys() == after.keys()
    for k in before:
        a, b = before[k].load(), after[k].load()
        assert a.dtype == b.dtype and torch.equal(a, b), k
    pre = json.loads((tmp_path / "back" / "preprocessor_config.json").read_text())
    assert pre["max_patches"] == 12 and pre["image_mean"] == [0.485, 0.456, 0.406]
    # and the way back out restores the original's own config fields (architectures, auto_map, LLM class)
    export_original(tmp_path / "back", tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["llm_config"]["architectures"] == \
        orig["llm_config"]["architectures"]


@pytest.mark.parametrize("llm", sorted(LLM))
def test_converted_logits_equal_source(llm, tiny_assets, tmp_path):
    source = _hf_model("300m", llm, tiny_assets, tmp_path / "hf")
    export_original(tmp_path / "hf", tmp_path / "orig", llm=llm if llm == "internlm2" else None)
    expected = _logits(source, tiny_assets)
    # init_from an original-format directory converts on the fly
    cfg = ModelConfig(init_from=str(tmp_path / "orig"), attn_implementation="eager")
    model, assets = build_model(cfg, max_tiles=None, dtype=torch.float32, load_weights=load_weights_plain)
    assert assets.image_processor.max_patches == 12 and list(assets.image_processor.image_mean) == [0.485, 0.456, 0.406]
    torch.testing.assert_close(_logits(model, assets), expected, rtol=0, atol=0)
    import_original(tmp_path / "orig", tmp_path / "back")
    reloaded, assets = load_pretrained(str(tmp_path / "back"), max_tiles=None, dtype=torch.float32,
                                       cfg=ModelConfig(attn_implementation="eager"))
    torch.testing.assert_close(_logits(reloaded, assets), expected, rtol=0, atol=0)


@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_original_language_model_is_stock_transformers(llm, tiny_assets, tmp_path):
    """The exported ``language_model.*`` is what InternVLChatModel builds: stock Qwen2/LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM

    source = _hf_model("6b", llm, tiny_assets, tmp_path / "hf")
    export_original(tmp_path / "hf", tmp_path / "orig")
    llm_config = json.loads((tmp_path / "orig" / "config.json").read_text())["llm_config"]
    config = LLM[llm](**{k: v for k, v in llm_config.items() if k not in ("architectures", "torch_dtype")})
    config._attn_implementation = "eager"
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k[len("language_model."):]: v.load() for k, v in index_weights(tmp_path / "orig").items()
             if k.startswith("language_model.")}
    lm.load_state_dict(state, strict=True)
    ids = torch.tensor([[20, 21, 22, 23, 24]])
    with torch.no_grad():
        ours = vlm_logits(source.eval(), input_ids=ids, attention_mask=None, pixel_values=None)
        torch.testing.assert_close(lm.eval()(input_ids=ids).logits, ours, rtol=0, atol=0)


def test_wqkv_split_matches_internlm2_layout():
    """Hand-built reference: per KV head, its group's query heads, then its key head, then its value head."""
    heads, kv, d, hidden = 8, 2, 3, 5
    q, k, v = torch.randn(heads * d, hidden), torch.randn(kv * d, hidden), torch.randn(kv * d, hidden)
    rows = []
    for h in range(kv):
        for g in range(heads // kv):
            rows.append(q[(h * (heads // kv) + g) * d:(h * (heads // kv) + g + 1) * d])
        rows += [k[h * d:(h + 1) * d], v[h * d:(h + 1) * d]]
    wqkv = torch.cat(rows)
    assert torch.equal(fuse_wqkv(q, k, v, num_heads=heads, num_kv_heads=kv, head_dim=d), wqkv)
    for got, want in zip(split_wqkv(wqkv, num_heads=heads, num_kv_heads=kv, head_dim=d), (q, k, v)):
        assert torch.equal(got, want)
    bias = torch.randn((heads + 2 * kv) * d)  # biases regroup the same way
    assert torch.equal(fuse_wqkv(*split_wqkv(bias, num_heads=heads, num_kv_heads=kv, head_dim=d), num_heads=heads,
                                 num_kv_heads=kv, head_dim=d), bias)


def test_unknown_tensor_is_named(tiny_assets, tmp_path):
    from safetensors.torch import save_file

    _hf_model("300m", "qwen2", tiny_assets, tmp_path / "hf")
    export_original(tmp_path / "hf", tmp_path / "orig")
    save_file({"vision_model.extra.weight": torch.zeros(1)}, str(tmp_path / "orig" / "extra.safetensors"))
    with pytest.raises(ValueError, match="vision_model.extra.weight"):
        import_original(tmp_path / "orig", tmp_path / "back")
