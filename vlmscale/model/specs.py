"""Published InternVL sizes as transformers config objects, and the model a plan describes.

Nothing is downloaded: each named size is built from the dimensions OpenGVLab published for its
vision encoder and LLM (hidden size, layers, heads, KV heads, MLP width, vocabulary), using the same
transformers config classes the models load with. InternLM2 is Llama-shaped (its fused ``wqkv`` holds
exactly Llama's q/k/v parameters), so a ``LlamaConfig`` of the same dimensions counts it exactly.
Instantiated on the meta device these give exact parameter counts in milliseconds; the totals match
the published sizes (InternVL2-26B: 25.5B, InternVL2.5-8B: 8.1B; ``tests/unit/test_plan.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
)

from vlmscale.config.schema import PRESETS, ModelConfig
from vlmscale.model.internvl_chat import hf_config_from_original, is_internvl_chat, read_original_config

VISION_PARTS = {
    # InternViT-6B-448px-V1-5 / V2_5: the 48-layer InternViT-6B without its last 3 layers
    "internvit-6b": dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
                         attention_bias=False, use_qk_norm=True, norm_type="rms_norm"),
    # InternViT-300M-448px(-V2_5)
    "internvit-300m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           attention_bias=True, use_qk_norm=False, norm_type="layer_norm"),
}

LLM_PARTS = {
    "internlm2-20b": ("llama", dict(hidden_size=6144, num_hidden_layers=48, num_attention_heads=48, num_key_value_heads=8,
                                    intermediate_size=16384, vocab_size=92553, tie_word_embeddings=False)),
    "internlm2.5-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     intermediate_size=14336, vocab_size=92553, tie_word_embeddings=False)),
    "internlm2-1.8b": ("llama", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                                     intermediate_size=8192, vocab_size=92553, tie_word_embeddings=False)),
    # Qwen2-0.5B-Instruct as InternVL2-1B holds it (InternVLChatConfig never ties the LM head)
    "qwen2-0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                 intermediate_size=4864, vocab_size=151655, tie_word_embeddings=False)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                 intermediate_size=18944, vocab_size=151674, tie_word_embeddings=False)),
}

# name -> (vision part, LLM part, published total parameters in billions)
SPECS = {
    "internvl2-26b": ("internvit-6b", "internlm2-20b", 25.5),
    "internvl2.5-26b": ("internvit-6b", "internlm2-20b", 25.5),
    "internvl2.5-8b": ("internvit-300m", "internlm2.5-7b", 8.1),
    "internvl3-8b": ("internvit-300m", "qwen2.5-7b", 7.9),
    "internvl2-2b": ("internvit-300m", "internlm2-1.8b", 2.2),
    "internvl2-1b": ("internvit-300m", "qwen2-0.5b", 0.94),
}


def _vision_config(part: str) -> InternVLVisionConfig:
    return InternVLVisionConfig(**VISION_PARTS[part], image_size=448, patch_size=14)


def _llm_config(part: str) -> PretrainedConfig:
    kind, dims = LLM_PARTS[part]
    return (LlamaConfig if kind == "llama" else Qwen2Config)(**dims)


def _join(vision: PretrainedConfig, text: PretrainedConfig) -> InternVLConfig:
    """The InternVL config of a vision encoder + pixel-shuffle MLP projector + LLM (as ``build.compose``)."""
    image = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    return InternVLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                          image_seq_length=(image // patch) ** 2 // 4, downsample_ratio=0.5,
                          tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))


def spec_config(name: str) -> InternVLConfig:
    vision, llm, _ = SPECS[name]
    return _join(_vision_config(vision), _llm_config(llm))


def _part_or_path(value: str, *, vision: bool) -> PretrainedConfig:
    parts = VISION_PARTS if vision else LLM_PARTS
    if value in parts:
        return _vision_config(value) if vision else _llm_config(value)
    field = "model.vision" if vision else "model.llm"
    if not (Path(value) / "config.json").is_file():
        raise ValueError(f"{field}={value!r}: neither a directory with config.json nor a known part "
                         f"({', '.join(sorted(parts))})")
    config = AutoConfig.from_pretrained(value)
    if vision and isinstance(config, InternVLConfig):
        return config.vision_config
    if vision and not isinstance(config, InternVLVisionConfig):
        raise ValueError(f"model.vision={value!r} holds a {type(config).__name__}, not an InternVL vision encoder")
    return config


def model_config(cfg: ModelConfig) -> InternVLConfig:
    """The InternVL config the run would build: preset, named size, HF config dir, or vision + LLM.

    ``cfg.init_from`` may name a published size (``internvl2-26b``); ``cfg.vision`` / ``cfg.llm`` may
    name parts (``internvit-6b``, ``internlm2-20b``). Only ``config.json`` files are read.
    """
    if cfg.init_from is not None:
        if cfg.init_from in SPECS:
            return spec_config(cfg.init_from)
        if is_internvl_chat(cfg.init_from):  # the image token's id does not change any size
            return hf_config_from_original(read_original_config(cfg.init_from), image_token_id=0)
        if not (Path(cfg.init_from) / "config.json").is_file():
            raise ValueError(f"--model {cfg.init_from!r}: not a preset ({', '.join(PRESETS)}), a named size "
                             f"({', '.join(SPECS)}) or a directory with an HF config.json")
        config = AutoConfig.from_pretrained(cfg.init_from)
        if not isinstance(config, InternVLConfig):
            raise ValueError(f"{cfg.init_from!r} holds a {type(config).__name__}, not an InternVL model; "
                             "plan a composition with model.vision=... model.llm=...")
        return config
    if cfg.vision is not None:
        return _join(_part_or_path(cfg.vision, vision=True), _part_or_path(cfg.llm, vision=False))
    from vlmscale.model.build import preset_assets, preset_config
    from vlmscale.constants import IMG_CONTEXT

    assets = preset_assets(cfg.preset)
    tok = assets.tokenizer
    return preset_config(cfg.preset, vocab_size=len(tok), image_token_id=assets.token_id(IMG_CONTEXT),
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


def meta_model(config: InternVLConfig) -> InternVLForConditionalGeneration:
    """The model with every parameter on the meta device: exact shapes, no memory."""
    with torch.device("meta"):
        return InternVLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
