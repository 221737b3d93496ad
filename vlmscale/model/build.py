"""Build an InternVL model three ways: a preset, an HF-format checkpoint, or vision + LLM composition.

Model code is plain transformers: it never imports DeepSpeed. Under ZeRO-3 the caller keeps an
``HfDeepSpeedConfig`` alive around these calls (see ``vlmscale.distributed.zero.zero3_model_scope``),
so ``from_config``/``from_pretrained`` create parameters already partitioned. Composition copies
sub-model weights through the caller's ``load_weights`` hook, which gathers shards as needed.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PretrainedConfig,
    Qwen2Config,
)

from vlmscale.config.schema import ModelConfig
from vlmscale.constants import IMG_CONTEXT
from vlmscale.model.internvl_chat import (
    image_processor_from_original,
    is_internvl_chat,
    load_original,
    read_original_config,
)
from vlmscale.model.presets import PRESETS, Preset
from vlmscale.model.shards import LazyTensor, index_weights
from vlmscale.model.tokenizer import (
    ProcessorAssets,
    load_image_processor,
    load_tokenizer,
    make_image_processor,
    train_bpe_tokenizer,
)

log = logging.getLogger(__name__)
LoadWeights = Callable[[torch.nn.Module, dict[str, "LazyTensor"]], None]


def resolve_attn_implementation(name: str) -> str:
    """``auto``: flash-attention 2 on a GPU that has it installed, else sdpa; on CPU, eager.

    On CPU torch's fused SDPA kernel is slow in the backward: a masked forward + backward at the demo's
    shapes took 45 ms against eager's 13 ms, and eager made a demo SFT step about a quarter faster
    (docs/performance.md). Eager materialises the ``L x L`` scores, which is fine at CPU sequence lengths.
    """
    if name != "auto":
        return name
    if torch.cuda.is_available():
        import importlib.util

        return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
    return "eager"


@functools.lru_cache(maxsize=4)
def preset_tokenizer(name: str):
    from vlmscale.demo_vocab import tokenizer_corpus

    return train_bpe_tokenizer(tokenizer_corpus(), vocab_size=PRESETS[name].vocab_size)


def preset_config(name: str, *, vocab_size: int, image_token_id: int, pad_token_id: int, eos_token_id: int) -> InternVLConfig:
    p: Preset = PRESETS[name]
    vision = InternVLVisionConfig(
        hidden_size=p.vision_hidden,
        num_hidden_layers=p.vision_layers,
        num_attention_heads=p.vision_heads,
        intermediate_size=4 * p.vision_hidden,
        image_size=p.image_size,
        patch_size=p.patch_size,
        layer_scale_init_value=0.1,
    )
    text = Qwen2Config(
        hidden_size=p.text_hidden,
        num_hidden_layers=p.text_layers,
        num_attention_heads=p.text_heads,
        num_key_value_heads=p.text_kv_heads,
        intermediate_size=p.text_intermediate,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=p.image_seq_length,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings (MAE-style), ``(grid * grid, dim)`` in raster order."""
    assert dim % 4 == 0, dim
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


# Strength of the sin-cos positions against patch content in the presets' fresh encoders, measured on
# the demo (held-out accuracy after the default SFT): 0.3 kept colour at 0.94 but position at chance
# (0.35); 1.0 learned position (0.64) but blurred colour (0.75); 0.6 gives colour 0.91, position 0.59.
POSITION_SCALE = 0.6


class InMemory:
    """A computed tensor with the ``load()`` interface of :class:`LazyTensor`."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def load(self) -> torch.Tensor:
        return self.tensor


def preset_assets(name: str, *, max_tiles: int | None = None) -> ProcessorAssets:
    p = PRESETS[name]
    return ProcessorAssets(
        tokenizer=preset_tokenizer(name),
        image_processor=make_image_processor(image_size=p.image_size, max_tiles=max_tiles or p.max_tiles),
        image_seq_length=p.image_seq_length,
    )


def spec_model(name: str, *, dtype: torch.dtype, max_tiles: int | None = None):
    """A published InternVL shape (``vlmscale.model.specs.SPECS``, e.g. ``internvl2-1b``) with random weights,
    the demo tokenizer (its ids fit in the published vocabulary) and InternVL's preprocessing (ImageNet
    statistics, 448-px tiles, up to 12)."""
    from vlmscale.model.internvl_chat import IMAGENET_MEAN, IMAGENET_STD
    from vlmscale.model.specs import SPECS, spec_config

    if name not in SPECS:
        raise ValueError(f"--spec {name!r}: choose one of {', '.join(sorted(SPECS))}")
    tokenizer = preset_tokenizer("demo")
    config = spec_config(name)
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    config._attn_implementation = resolve_attn_implementation("auto")
    model = InternVLForConditionalGeneration._from_config(config, dtype=dtype)
    size = config.vision_config.image_size[0]
    assets = ProcessorAssets(
        tokenizer=tokenizer,
        image_processor=make_image_processor(image_size=size, max_tiles=max_tiles or 12, image_mean=IMAGENET_MEAN,
                                             image_std=IMAGENET_STD),
        image_seq_length=config.image_seq_length,
    )
    _finish(model, assets)
    return model, assets


def _set_image_pos(model: torch.nn.Module, cfg: ModelConfig | None, default: float) -> None:
    """``model.config.image_pos_scale`` from ``model.image_pos_scale`` when set, else ``default`` (the preset's,
    or what the checkpoint's config.json says); saved with the export's config.json."""
    value = cfg.image_pos_scale if cfg is not None and cfg.image_pos_scale is not None else default
    model.config.image_pos_scale = float(value or 0.0)


def _finish(model: torch.nn.Module, assets: ProcessorAssets) -> None:
    cfg = model.config
    cfg.pad_token_id = assets.tokenizer.pad_token_id
    cfg.eos_token_id = assets.tokenizer.eos_token_id
    gen = model.generation_config
    gen.pad_token_id = assets.tokenizer.pad_token_id
    gen.eos_token_id = assets.tokenizer.eos_token_id
    gen.bos_token_id = None
    gen.do_sample = False


def build_model(
    cfg: ModelConfig,
    *,
    max_tiles: int | None,
    dtype: torch.dtype,
    load_weights: LoadWeights,
) -> tuple[InternVLForConditionalGeneration, ProcessorAssets]:
    """Return ``(model, assets)``; call inside the ZeRO-3 scope when training with ZeRO-3.

    ``max_tiles`` None keeps a checkpoint's own ``max_patches`` (``RunConfig.tile_limit``)."""
    if cfg.init_from is not None:
        if is_internvl_chat(cfg.init_from):
            return load_internvl_chat(cfg.init_from, max_tiles=max_tiles, dtype=dtype, cfg=cfg, load_weights=load_weights)
        return load_pretrained(cfg.init_from, max_tiles=max_tiles, dtype=dtype, cfg=cfg)
    if cfg.vision is not None:
        return compose(cfg, max_tiles=max_tiles, dtype=dtype, load_weights=load_weights)
    assets = preset_assets(cfg.preset, max_tiles=max_tiles)
    tok = assets.tokenizer
    config = preset_config(
        cfg.preset,
        vocab_size=len(tok),
        image_token_id=assets.token_id(IMG_CONTEXT),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config._attn_implementation = resolve_attn_implementation(cfg.attn_implementation)
    model = InternVLForConditionalGeneration._from_config(config, dtype=dtype)
    # InternVL initialises the vision position embeddings to zero, which leaves a from-scratch
    # encoder blind to where things are; presets start from 2-D sin-cos embeddings instead, scaled
    # well below the patch content (std ~0.4) so that position does not drown out appearance.
    p = PRESETS[cfg.preset]
    grid = p.image_size // p.patch_size
    table = torch.cat([torch.zeros(1, p.vision_hidden), POSITION_SCALE * sincos_2d(grid, p.vision_hidden)]).unsqueeze(0)
    load_weights(model, {"model.vision_tower.embeddings.position_embeddings": InMemory(table)})
    _set_image_pos(model, cfg, p.image_pos_scale)
    _finish(model, assets)
    return model, assets


def load_pretrained(path: str, *, max_tiles: int | None, dtype: torch.dtype, cfg: ModelConfig | None = None):
    """Load a full InternVL checkpoint in HF format (our exports, or OpenGVLab ``*-hf`` models), or an
    original-format release (converted as it loads; not partitioned: under ZeRO-3 use ``build_model``)."""
    p = Path(path)
    if is_internvl_chat(p):
        return load_internvl_chat(path, max_tiles=max_tiles, dtype=dtype, cfg=cfg, load_weights=load_weights_plain)
    if not (p / "config.json").is_file():
        raise ValueError(f"{path!r}: no config.json there; expected an HF-format InternVL export such as <output_dir>/hf")
    config = AutoConfig.from_pretrained(p, trust_remote_code=bool(cfg and cfg.trust_remote_code))
    if not isinstance(config, InternVLConfig):
        raise ValueError(
            f"{path!r} holds a {type(config).__name__}, not an InternVL model; "
            "use model.vision + model.llm to compose one"
        )
    model = AutoModelForImageTextToText.from_pretrained(
        p,
        dtype=dtype,
        attn_implementation=resolve_attn_implementation(cfg.attn_implementation if cfg else "auto"),
        trust_remote_code=bool(cfg and cfg.trust_remote_code),
    )
    assets = ProcessorAssets.load(p, image_seq_length=config.image_seq_length, max_tiles=max_tiles)
    _set_image_pos(model, cfg, getattr(config, "image_pos_scale", 0.0))
    _finish(model, assets)
    return model, assets


def load_internvl_chat(path: str, *, max_tiles: int | None, dtype: torch.dtype, cfg: ModelConfig | None,
                       load_weights: LoadWeights):
    """An original-format release (``InternVLChatModel``) built as the HF model from its config and loaded
    tensor by tensor through ``load_weights`` (partitioned under ZeRO-3), converted on the fly."""
    config, weights = load_original(path)
    config._attn_implementation = resolve_attn_implementation(cfg.attn_implementation if cfg else "auto")
    model = InternVLForConditionalGeneration._from_config(config, dtype=dtype)
    load_weights(model, weights)
    assets = ProcessorAssets(
        tokenizer=load_tokenizer(path, trust_remote_code=bool(cfg and cfg.trust_remote_code)),
        image_processor=image_processor_from_original(path, read_original_config(path), max_tiles=max_tiles),
        image_seq_length=config.image_seq_length,
    )
    _set_image_pos(model, cfg, 0.0)
    _finish(model, assets)
    return model, assets


# InternVL checkpoints store the vision encoder under one of these prefixes (the original HF
# layout, the in-memory module layout, or none for a standalone vision checkpoint).
_VISION_PREFIXES = ("vision_tower.", "model.vision_tower.")


def _vision_config_and_weights(path: Path) -> tuple[InternVLVisionConfig, dict[str, LazyTensor]]:
    config = AutoConfig.from_pretrained(path)
    weights = index_weights(path)
    if isinstance(config, InternVLConfig):
        out = {}
        for key, value in weights.items():
            for prefix in _VISION_PREFIXES:
                if key.startswith(prefix):
                    out[key[len(prefix):]] = value
        return config.vision_config, out
    if isinstance(config, InternVLVisionConfig):
        return config, {k[len("model."):] if k.startswith("model.") else k: v for k, v in weights.items()}
    raise ValueError(f"model.vision={str(path)!r}: expected an InternVL or InternVL vision checkpoint, got {type(config).__name__}")


def compose(cfg: ModelConfig, *, max_tiles: int | None, dtype: torch.dtype, load_weights: LoadWeights):
    """A vision encoder and an LLM joined by a freshly initialised pixel-shuffle + MLP projector."""
    vision_path, llm_path = Path(cfg.vision), Path(cfg.llm)
    vision_config, vision_weights = _vision_config_and_weights(vision_path)
    text_config: PretrainedConfig = AutoConfig.from_pretrained(llm_path)
    tokenizer = load_tokenizer(llm_path)
    image_size = vision_config.image_size[0]
    patch = vision_config.patch_size[0]
    seq_len = (image_size // patch) ** 2 // 4
    llm_weights = index_weights(llm_path)
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    config = InternVLConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
        image_seq_length=seq_len,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    config._attn_implementation = resolve_attn_implementation(cfg.attn_implementation)
    model = InternVLForConditionalGeneration._from_config(config, dtype=dtype)
    mapped = {f"model.vision_tower.{k}": v for k, v in vision_weights.items()}
    for key, value in llm_weights.items():
        if key.startswith("model."):
            mapped["model.language_model." + key[len("model."):]] = value
        elif key.startswith("lm_head."):
            mapped[key] = value
    load_weights(model, mapped)
    if (vision_path / "preprocessor_config.json").is_file():  # the encoder's own statistics and tiling
        image_processor = load_image_processor(vision_path, max_tiles=max_tiles)
    else:
        image_processor = make_image_processor(image_size=image_size, max_tiles=max_tiles or 12)
    assets = ProcessorAssets(tokenizer=tokenizer, image_processor=image_processor, image_seq_length=seq_len)
    _set_image_pos(model, cfg, 0.0)
    _finish(model, assets)
    return model, assets


def save_architecture(model: torch.nn.Module, assets: ProcessorAssets, out: str | Path) -> None:
    """What rebuilds ``model`` without its weights: the HF config, the generation config, the tokenizer and
    the image processor (as the run uses them). Every resumable checkpoint holds one (``<tag>/model``), so a
    resume never reads ``model.init_from`` (:func:`build_architecture`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    assets.save(out)


def build_architecture(path: str | Path, *, max_tiles: int | None, dtype: torch.dtype, attn_implementation: str = "auto"):
    """The model :func:`save_architecture` wrote, with no weights read and no random initialisation: every
    tensor is about to be overwritten by a checkpoint (trainable ones from the optimizer's fp32 partitions,
    frozen ones from the checkpoint's frozen fragments). Under ZeRO-3, call it inside the ZeRO-3 scope."""
    from transformers import GenerationConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = resolve_attn_implementation(attn_implementation)
    with no_init_weights():
        model = InternVLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig.from_pretrained(path)
    assets = ProcessorAssets.load(path, image_seq_length=config.image_seq_length, max_tiles=max_tiles)
    _finish(model, assets)
    return model, assets


def load_weights_plain(model: torch.nn.Module, weights: dict[str, LazyTensor]) -> None:
    """Copy ``weights`` into a model that is not partitioned; rows beyond a smaller vocab keep their init."""
    params = dict(model.named_parameters())
    unknown = [k for k in weights if k not in params]
    if unknown:
        raise ValueError(f"weights do not fit the model: unexpected keys {unknown[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            copy_into(params[name], value.load(), name=name)


def copy_into(param: torch.Tensor, value: torch.Tensor, *, name: str) -> None:
    if param.shape == value.shape:
        param.copy_(value.to(param.dtype))
    elif param.dim() == 2 and param.shape[1] == value.shape[1] and param.shape[0] >= value.shape[0]:
        param[: value.shape[0]].copy_(value.to(param.dtype))  # embedding grown for new special tokens
    else:
        raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} does not fit model shape {tuple(param.shape)}")
