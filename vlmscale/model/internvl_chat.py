"""InternVL's original release format (``InternVLChatModel``, remote code) to and from our HF layout.

Most OpenGVLab releases (InternVL2 / 2.5, -MPO, 76B) ship as ``InternVLChatModel``: ``vision_model.*``
(InternViT: a fused ``attn.qkv``, ``ls1``/``ls2`` layer scales, ``norm1``/``norm2``), ``mlp1.{0,1,3}``
(the projector: LayerNorm, Linear, GELU, Linear) and ``language_model.*`` in the LLM's own layout
(Qwen2 and Llama as transformers names them; InternLM2 with a fused ``attention.wqkv``, ``wo``,
``feed_forward.w1/w2/w3``, ``attention_norm``/``ffn_norm``, ``tok_embeddings``, ``output``).

Conversion reads ``config.json`` and safetensors only, never the release's Python code. Every tensor
maps to one tensor, except the fused projections, which split exactly (rows are only regrouped), so
HF -> original -> HF is bitwise. Mappings are lazy: a tensor is read from disk when it is written or
loaded into a (possibly ZeRO-3 partitioned) model, so neither direction holds the whole model.

The key names and config fields follow OpenGVLab's ``internvl_chat/internvl/model/internvl_chat/*.py``
and ``internlm2/*.py``; the split of InternLM2's ``wqkv`` follows its attention (per KV head: the
query heads of its group, then its key, then its value).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, PretrainedConfig, Qwen2Config
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from vlmscale.model.shards import ShardWriter, disk_name, hf_weights, index_weights
from vlmscale.config.load import parse_size

log = logging.getLogger(__name__)

MODEL_TYPE = "internvl_chat"
ARCHITECTURES = ["InternVLChatModel"]
AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}
INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
# what a user copies from the original release next to an exported config.json (docs/checkpoints.md)
REMOTE_CODE_FILES = ["configuration_intern_vit.py", "configuration_internvl_chat.py", "conversation.py",
                     "modeling_intern_vit.py", "modeling_internvl_chat.py"]
INTERNLM2_CODE_FILES = ["configuration_internlm2.py", "modeling_internlm2.py", "tokenization_internlm2.py",
                        "tokenization_internlm2_fast.py"]
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # what InternVL's own preprocessing normalises with
IMAGENET_STD = [0.229, 0.224, 0.225]
LLM_ARCHS = ("Qwen2ForCausalLM", "LlamaForCausalLM", "InternLM2ForCausalLM")
META_KEY = "internvl_chat"  # HF config attribute keeping the original's own fields for the way back
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "generation_config.json")


class Source(Protocol):
    def load(self) -> torch.Tensor: ...


@dataclass
class Derived:
    """A tensor computed from others when loaded (one part of a split, or a fusion)."""

    sources: list[Source]
    fn: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    index: int = 0

    def load(self) -> torch.Tensor:
        return self.fn([s.load() for s in self.sources])[self.index].contiguous()


# ---------------------------------------------------------------- fused projections


def split_wqkv(w: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int) -> list[torch.Tensor]:
    """InternLM2's ``wqkv`` (weight or bias) -> ``[q, k, v]``: its rows are, per KV head, the
    ``num_heads / num_kv_heads`` query heads of that group, the key head, then the value head."""
    groups = num_heads // num_kv_heads
    rest = w.shape[1:]
    x = w.reshape(num_kv_heads, groups + 2, head_dim, *rest)
    q = x[:, :groups].reshape(num_heads * head_dim, *rest)
    k = x[:, groups].reshape(num_kv_heads * head_dim, *rest)
    v = x[:, groups + 1].reshape(num_kv_heads * head_dim, *rest)
    return [q, k, v]


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int, num_kv_heads: int,
              head_dim: int) -> torch.Tensor:
    """The inverse of :func:`split_wqkv`."""
    groups = num_heads // num_kv_heads
    rest = q.shape[1:]
    parts = [q.reshape(num_kv_heads, groups, head_dim, *rest), k.reshape(num_kv_heads, 1, head_dim, *rest),
             v.reshape(num_kv_heads, 1, head_dim, *rest)]
    return torch.cat(parts, dim=1).reshape((num_heads + 2 * num_kv_heads) * head_dim, *rest)


def _chunk3(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(tensors[0].chunk(3, dim=0))


def _cat(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat(tensors, dim=0)]


# ---------------------------------------------------------------- key mapping

# (original, HF module name): {n} a layer index, {p} weight|bias, {rest} any suffix; one-to-one renames
_VISION = [
    ("vision_model.embeddings.class_embedding", "model.vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    ("vision_model.embeddings.patch_embedding.{p}", "model.vision_tower.embeddings.patch_embeddings.projection.{p}"),
    ("vision_model.encoder.layers.{n}.ls1", "model.vision_tower.encoder.layer.{n}.lambda_1"),
    ("vision_model.encoder.layers.{n}.ls2", "model.vision_tower.encoder.layer.{n}.lambda_2"),
    ("vision_model.encoder.layers.{n}.attn.proj.{p}", "model.vision_tower.encoder.layer.{n}.attention.projection_layer.{p}"),
    ("vision_model.encoder.layers.{n}.attn.q_norm.{p}", "model.vision_tower.encoder.layer.{n}.attention.q_norm.{p}"),
    ("vision_model.encoder.layers.{n}.attn.k_norm.{p}", "model.vision_tower.encoder.layer.{n}.attention.k_norm.{p}"),
    ("vision_model.encoder.layers.{n}.mlp.fc1.{p}", "model.vision_tower.encoder.layer.{n}.mlp.fc1.{p}"),
    ("vision_model.encoder.layers.{n}.mlp.fc2.{p}", "model.vision_tower.encoder.layer.{n}.mlp.fc2.{p}"),
    ("vision_model.encoder.layers.{n}.norm1.{p}", "model.vision_tower.encoder.layer.{n}.layernorm_before.{p}"),
    ("vision_model.encoder.layers.{n}.norm2.{p}", "model.vision_tower.encoder.layer.{n}.layernorm_after.{p}"),
    ("mlp1.0.{p}", "model.multi_modal_projector.layer_norm.{p}"),
    ("mlp1.1.{p}", "model.multi_modal_projector.linear_1.{p}"),
    ("mlp1.3.{p}", "model.multi_modal_projector.linear_2.{p}"),
]
_VISION_QKV = ("vision_model.encoder.layers.{n}.attn.qkv.{p}",
               [f"model.vision_tower.encoder.layer.{{n}}.attention.{x}_proj.{{p}}" for x in "qkv"])
_HF_LLM = [  # Qwen2ForCausalLM / LlamaForCausalLM inside InternVLChatModel
    ("language_model.model.{rest}", "model.language_model.{rest}"),
    ("language_model.lm_head.{p}", "lm_head.{p}"),
]
_INTERNLM2 = [
    ("language_model.model.tok_embeddings.{p}", "model.language_model.embed_tokens.{p}"),
    ("language_model.model.norm.{p}", "model.language_model.norm.{p}"),
    ("language_model.output.{p}", "lm_head.{p}"),
    ("language_model.model.layers.{n}.attention.wo.{p}", "model.language_model.layers.{n}.self_attn.o_proj.{p}"),
    ("language_model.model.layers.{n}.feed_forward.w1.{p}", "model.language_model.layers.{n}.mlp.gate_proj.{p}"),
    ("language_model.model.layers.{n}.feed_forward.w3.{p}", "model.language_model.layers.{n}.mlp.up_proj.{p}"),
    ("language_model.model.layers.{n}.feed_forward.w2.{p}", "model.language_model.layers.{n}.mlp.down_proj.{p}"),
    ("language_model.model.layers.{n}.attention_norm.{p}", "model.language_model.layers.{n}.input_layernorm.{p}"),
    ("language_model.model.layers.{n}.ffn_norm.{p}", "model.language_model.layers.{n}.post_attention_layernorm.{p}"),
]
_WQKV = ("language_model.model.layers.{n}.attention.wqkv.{p}",
         [f"model.language_model.layers.{{n}}.self_attn.{x}_proj.{{p}}" for x in "qkv"])
_FIELDS = {"n": r"(?P<n>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}


def _pattern(template: str) -> re.Pattern:
    out = re.escape(template)
    for name, regex in _FIELDS.items():
        out = out.replace(re.escape("{" + name + "}"), regex)
    return re.compile(out + "$")


def _match(template: str, key: str) -> dict[str, str] | None:
    m = _pattern(template).match(key)
    return m.groupdict() if m else None


@dataclass(frozen=True)
class TextShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _text_shape(text: PretrainedConfig) -> TextShape:
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return TextShape(text.num_attention_heads, text.num_key_value_heads or text.num_attention_heads, head_dim)


def _map_keys(weights: dict[str, Source], *, renames: list[tuple[str, str]], splits: list[tuple[str, list[str]]],
              split_fns: list[Callable], fuse_fns: list[Callable], forward: bool) -> dict[str, Source]:
    """Apply renames and fused-projection splits (``forward``: original -> HF) or their inverses."""
    out: dict[str, Source] = {}
    pending: dict[tuple[int, tuple], dict[int, Source]] = {}
    for key, src in weights.items():
        done = False
        for orig, hf in renames:
            fields = _match(orig if forward else hf, key)
            if fields is not None:
                out[(hf if forward else orig).format(**fields)] = src
                done = True
                break
        if done:
            continue
        for i, (fused, parts) in enumerate(splits):
            if forward:
                fields = _match(fused, key)
                if fields is not None:
                    for j, part in enumerate(parts):
                        out[part.format(**fields)] = Derived([src], split_fns[i], j)
                    done = True
                    break
            else:
                for j, part in enumerate(parts):
                    fields = _match(part, key)
                    if fields is not None:
                        pending.setdefault((i, tuple(sorted(fields.items()))), {})[j] = src
                        done = True
                        break
                if done:
                    break
        if not done:
            raise ValueError(f"{key}: no InternVL {'original' if forward else 'HF'} tensor has this name; "
                             "only InternViT + mlp1 + Qwen2/Llama/InternLM2 checkpoints convert")
    for (i, fields), parts in pending.items():
        fused, names = splits[i]
        if len(parts) != len(names):
            raise ValueError(f"{fused.format(**dict(fields))}: needs all of {[n.format(**dict(fields)) for n in names]}")
        out[fused.format(**dict(fields))] = Derived([parts[j] for j in range(len(names))], fuse_fns[i])
    return out


def _rules(llm_arch: str, text: PretrainedConfig):
    renames = list(_VISION)
    splits, split_fns, fuse_fns = [_VISION_QKV], [_chunk3], [_cat]
    if llm_arch == "InternLM2ForCausalLM":
        s = _text_shape(text)
        kw = dict(num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim)
        renames += _INTERNLM2
        splits.append(_WQKV)
        split_fns.append(lambda ts: split_wqkv(ts[0], **kw))
        fuse_fns.append(lambda ts: [fuse_wqkv(*ts, **kw)])
    else:
        renames += _HF_LLM
    return dict(renames=renames, splits=splits, split_fns=split_fns, fuse_fns=fuse_fns)


def original_to_hf_weights(weights: dict[str, Source], *, llm_arch: str, text: PretrainedConfig) -> dict[str, Source]:
    """Original tensor names -> ``InternVLForConditionalGeneration`` parameter names (lazy)."""
    return _map_keys(weights, **_rules(llm_arch, text), forward=True)


def hf_to_original_weights(weights: dict[str, Source], *, llm_arch: str, text: PretrainedConfig) -> dict[str, Source]:
    """The inverse of :func:`original_to_hf_weights`."""
    return _map_keys(weights, **_rules(llm_arch, text), forward=False)


# ---------------------------------------------------------------- configs


def is_internvl_chat(path: str | Path) -> bool:
    """Whether ``path`` holds an original-format (``InternVLChatModel``) checkpoint."""
    file = Path(path) / "config.json"
    return file.is_file() and json.loads(file.read_text()).get("model_type") == MODEL_TYPE


def read_original_config(path: str | Path) -> dict:
    cfg = json.loads((Path(path) / "config.json").read_text())
    arch = cfg["llm_config"].get("architectures", [""])[0]
    if arch not in LLM_ARCHS:
        raise ValueError(f"{path}: llm_config.architectures {arch!r} is not one of {LLM_ARCHS}")
    if cfg.get("ps_version", "v1") != "v2":
        raise ValueError(f"{path}: ps_version {cfg.get('ps_version')!r}; transformers' InternVL implements "
                         "pixel shuffle v2 only (every InternVL2 and later release)")
    return cfg


_DROP = {"architectures", "auto_map", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
         "attn_implementation", "_attn_implementation_autoset", "use_flash_attn", "bias", "rope_scaling", "rope_theta",
         "tie_word_embeddings", "use_bfloat16"}


def _text_from_original(llm: dict) -> PretrainedConfig:
    arch = llm["architectures"][0]
    kept = {k: v for k, v in llm.items() if k not in _DROP}
    rope = {"rope_theta": llm.get("rope_theta", 10000.0), "rope_scaling": llm.get("rope_scaling")}
    if arch == "InternLM2ForCausalLM":
        return LlamaConfig(**kept, **rope, attention_bias=bool(llm.get("bias", False)), tie_word_embeddings=False)
    if arch == "LlamaForCausalLM":
        return LlamaConfig(**kept, **rope, tie_word_embeddings=False)
    return Qwen2Config(**kept, **rope, tie_word_embeddings=False)


def _image_size(orig: dict) -> int:
    vision = orig["vision_config"]
    size = orig.get("force_image_size") or vision["image_size"]
    if size != vision["image_size"]:
        raise ValueError(f"force_image_size={size} differs from vision_config.image_size={vision['image_size']}: "
                         "resize the position embeddings in the original code before converting")
    return int(size)


def hf_config_from_original(orig: dict, *, image_token_id: int) -> InternVLConfig:
    v = orig["vision_config"]
    size = _image_size(orig)
    vision = InternVLVisionConfig(
        hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"], hidden_act=v.get("hidden_act", "gelu"),
        norm_type=v.get("norm_type", "rms_norm"), layer_norm_eps=v.get("layer_norm_eps", 1e-6), image_size=size,
        patch_size=v["patch_size"], num_channels=v.get("num_channels", 3), attention_bias=bool(v.get("qkv_bias", False)),
        use_qk_norm=bool(v.get("qk_normalization", True)), attention_dropout=v.get("attention_dropout", 0.0),
        projection_dropout=v.get("dropout", 0.0), hidden_dropout_prob=v.get("dropout", 0.0),
        layer_scale_init_value=v.get("initializer_factor", 0.1), initializer_range=v.get("initializer_range", 0.02),
    )
    text = _text_from_original(orig["llm_config"])
    ratio = orig.get("downsample_ratio", 0.5)
    config = InternVLConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id,
        image_seq_length=int((size // v["patch_size"]) ** 2 * ratio**2), downsample_ratio=ratio,
        vision_feature_layer=orig.get("select_layer", -1), projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    # the original's own fields, so that an export back restores them (architectures, auto_map, template, ...)
    setattr(config, META_KEY, {k: orig[k] for k in orig if k not in ("vision_config", "llm_config")}
            | {"llm_architectures": orig["llm_config"]["architectures"], "llm_auto_map": orig["llm_config"].get("auto_map")})
    return config


def llm_arch_of(config: InternVLConfig, *, requested: str | None = None) -> str:
    """The original LLM class an HF model exports as: ``requested``, else what it was imported from, else
    by text config (Qwen2 -> Qwen2ForCausalLM, Llama -> LlamaForCausalLM)."""
    text = config.text_config
    if requested is not None:
        arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "internlm2": "InternLM2ForCausalLM"}[requested]
    elif getattr(config, META_KEY, None):
        arch = getattr(config, META_KEY)["llm_architectures"][0]
    else:
        arch = "Qwen2ForCausalLM" if text.model_type == "qwen2" else "LlamaForCausalLM"
    expected = "qwen2" if arch == "Qwen2ForCausalLM" else "llama"
    if text.model_type != expected:
        raise ValueError(f"a {text.model_type} text model cannot be written as {arch}")
    return arch


def _rope_fields(text: PretrainedConfig) -> dict:
    rope = dict(text.rope_parameters or {})
    theta = rope.pop("rope_theta", 10000.0)
    kind = rope.get("rope_type", "default")
    rope.pop("rope_type", None)
    return {"rope_theta": theta, "rope_scaling": None if kind == "default" else {"type": kind, **rope}}


def original_config_from_hf(config: InternVLConfig, *, llm_arch: str, image_processor: GotOcr2ImageProcessorPil,
                            dtype: torch.dtype) -> dict:
    meta = dict(getattr(config, META_KEY, None) or {})
    v, text = config.vision_config, config.text_config
    image = v.image_size[0] if isinstance(v.image_size, (list, tuple)) else v.image_size
    patch = v.patch_size[0] if isinstance(v.patch_size, (list, tuple)) else v.patch_size
    vision = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
        "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
        "intermediate_size": v.intermediate_size, "hidden_act": v.hidden_act, "norm_type": v.norm_type,
        "layer_norm_eps": v.layer_norm_eps, "image_size": image, "patch_size": patch, "num_channels": v.num_channels,
        "qkv_bias": v.attention_bias, "qk_normalization": v.use_qk_norm, "attention_dropout": v.attention_dropout,
        "dropout": v.projection_dropout, "drop_path_rate": 0.0, "initializer_factor": v.layer_scale_init_value,
        "initializer_range": v.initializer_range, "use_flash_attn": False,
    }
    dims = {k: getattr(text, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "hidden_act",
                                          "max_position_embeddings", "rms_norm_eps", "initializer_range",
                                          "pad_token_id", "bos_token_id", "eos_token_id")}
    if llm_arch == "InternLM2ForCausalLM":
        llm = {"architectures": [llm_arch], "model_type": "internlm2", "auto_map": meta.get("llm_auto_map") or INTERNLM2_AUTO_MAP,
               **dims, "bias": text.attention_bias, "attn_implementation": "eager"}
    else:
        llm = {k: val for k, val in text.to_dict().items() if k not in ("rope_parameters", "layer_types", "dtype")}
        llm["architectures"] = [llm_arch]
        if meta.get("llm_auto_map"):
            llm["auto_map"] = meta["llm_auto_map"]
    llm |= _rope_fields(text) | {"tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch.")}
    meta.pop("llm_architectures", None)
    meta.pop("llm_auto_map", None)
    out = {
        "architectures": ARCHITECTURES, "auto_map": AUTO_MAP, "model_type": MODEL_TYPE, "template": "internvl2_5",
        "ps_version": "v2", "select_layer": config.vision_feature_layer, "use_backbone_lora": 0, "use_llm_lora": 0,
        "pad2square": False, **meta,
        "vision_config": vision, "llm_config": llm, "downsample_ratio": config.downsample_ratio,
        "force_image_size": image, "dynamic_image_size": bool(image_processor.crop_to_patches),
        "min_dynamic_patch": int(image_processor.min_patches), "max_dynamic_patch": int(image_processor.max_patches),
        "use_thumbnail": True, "torch_dtype": str(dtype).removeprefix("torch."), "tie_word_embeddings": False,
    }
    return out


def image_processor_from_original(path: str | Path, orig: dict, *, max_tiles: int | None) -> GotOcr2ImageProcessorPil:
    """The release's preprocessing as transformers' InternVL processor: its ``preprocessor_config.json``
    statistics (InternVL's code normalises with ImageNet's, which releases record there), its
    ``force_image_size`` and ``min/max_dynamic_patch``; ``max_tiles`` (explicit) replaces the maximum."""
    pre_file = Path(path) / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    if not orig.get("use_thumbnail", True):
        log.warning("%s: use_thumbnail=false, but transformers' InternVL processor always adds the thumbnail tile", path)
    size = _image_size(orig)
    return GotOcr2ImageProcessorPil(
        size={"height": size, "width": size}, crop_to_patches=bool(orig.get("dynamic_image_size", True)),
        min_patches=int(orig.get("min_dynamic_patch", 1)),
        max_patches=int(max_tiles if max_tiles is not None else orig.get("max_dynamic_patch", 12)),
        image_mean=list(pre.get("image_mean", IMAGENET_MEAN)), image_std=list(pre.get("image_std", IMAGENET_STD)),
    )


def original_preprocessor_config(image_processor: GotOcr2ImageProcessorPil) -> dict:
    """``preprocessor_config.json`` as InternVL releases write it (CLIP-style, read by their tooling)."""
    size = int(image_processor.size["height"])
    return {"crop_size": size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(image_processor.image_mean),
            "image_std": list(image_processor.image_std), "resample": int(image_processor.resample), "size": size}


def token_id(path: str | Path, token: str) -> int:
    """A special token's id from the tokenizer files (no tokenizer code is run)."""
    path = Path(path)
    tc = path / "tokenizer_config.json"
    if tc.is_file():
        for idx, entry in json.loads(tc.read_text()).get("added_tokens_decoder", {}).items():
            if entry.get("content") == token:
                return int(idx)
    tj = path / "tokenizer.json"
    if tj.is_file():
        for entry in json.loads(tj.read_text()).get("added_tokens", []):
            if entry.get("content") == token:
                return int(entry["id"])
    at = path / "added_tokens.json"
    if at.is_file() and token in json.loads(at.read_text()):
        return int(json.loads(at.read_text())[token])
    raise ValueError(f"{path}: the tokenizer files do not define {token!r}; is this an InternVL chat release?")


# ---------------------------------------------------------------- whole-checkpoint conversion


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _write(weights: dict[str, Source], out: Path, *, shard_size: str, dtype: torch.dtype | None,
           rename: Callable[[str], str] = str) -> torch.dtype:
    writer = ShardWriter(out, max_bytes=parse_size(shard_size))
    seen = None
    for name in sorted(weights):
        t = weights[name].load()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        seen = seen or t.dtype
        writer.add(rename(name), t)
    writer.close()
    return seen


def _expected_shapes(config: InternVLConfig) -> dict[str, tuple]:
    from vlmscale.model.specs import meta_model

    return {k: tuple(v.shape) for k, v in meta_model(config).state_dict().items()}


def load_original(path: str | Path) -> tuple[InternVLConfig, dict[str, Source]]:
    """An original-format checkpoint as an HF config and lazily converted, HF-named tensors."""
    path = Path(path)
    orig = read_original_config(path)
    config = hf_config_from_original(orig, image_token_id=token_id(path, "<IMG_CONTEXT>"))
    weights = original_to_hf_weights(index_weights(path), llm_arch=orig["llm_config"]["architectures"][0],
                                     text=config.text_config)
    missing = sorted(set(_expected_shapes(config)) - set(weights))
    if missing:
        raise ValueError(f"{path}: tensors missing for {missing[:5]} ({len(missing)} in all)")
    return config, weights


def import_original(src: str | Path, out: str | Path, *, shard_size: str = "5GB", dtype: torch.dtype | None = None) -> Path:
    """``src`` (original format) -> ``out`` (HF format: safetensors shards, config, tokenizer files, processor)."""
    from vlmscale.model.tokenizer import save_processor_configs

    src, out = Path(src), Path(out)
    config, weights = load_original(src)
    out.mkdir(parents=True, exist_ok=True)
    written = _write(weights, out, shard_size=shard_size, dtype=dtype, rename=disk_name)
    config.dtype = written
    config.save_pretrained(out)
    _copy_tokenizer(src, out)
    processor = image_processor_from_original(src, read_original_config(src), max_tiles=None)
    save_processor_configs(out, image_processor=processor, image_seq_length=config.image_seq_length)
    return out


def export_original(src: str | Path, out: str | Path, *, llm: str | None = None, shard_size: str = "5GB") -> Path:
    """``src`` (an HF-format InternVL dir, e.g. ``<output_dir>/hf``) -> ``out`` in the original format.
    Tied embeddings are written out as ``lm_head`` too (the original format never ties them)."""
    from transformers import AutoConfig

    from vlmscale.model.tokenizer import load_image_processor

    src, out = Path(src), Path(out)
    config = AutoConfig.from_pretrained(src)
    if not isinstance(config, InternVLConfig):
        raise ValueError(f"{src}: holds a {type(config).__name__}, not an HF-format InternVL model")
    arch = llm_arch_of(config, requested=llm)
    weights = hf_weights(src)
    if "lm_head.weight" not in weights:  # tied
        weights["lm_head.weight"] = weights["model.language_model.embed_tokens.weight"]
    mapped = hf_to_original_weights(weights, llm_arch=arch, text=config.text_config)
    out.mkdir(parents=True, exist_ok=True)
    dtype = _write(mapped, out, shard_size=shard_size, dtype=None)
    processor = load_image_processor(src, max_tiles=None)
    (out / "config.json").write_text(json.dumps(
        original_config_from_hf(config, llm_arch=arch, image_processor=processor, dtype=dtype), indent=2))
    _copy_tokenizer(src, out)
    (out / "preprocessor_config.json").write_text(json.dumps(original_preprocessor_config(processor), indent=2))
    return out
