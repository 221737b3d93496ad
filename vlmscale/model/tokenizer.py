"""Tokenizer, chat template and image processor for InternVL-style models.

Presets get a byte-level BPE tokenizer trained here, deterministically, on text our demo
generator produces (no download). Checkpoints loaded by path keep their own tokenizer; the
image special tokens are added when missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from vlmscale.constants import PAD, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO, SPECIAL_TOKENS

MULTIMODAL_TOKENS = {
    "start_image_token": IMG_START,
    "end_image_token": IMG_END,
    "context_image_token": IMG_CONTEXT,
    "video_token": VIDEO,
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# ChatML with InternVL's image placeholder. The processor expands each <IMG_CONTEXT> into
# <img> + <IMG_CONTEXT> x (tiles x image_seq_length) + </img>; vlmscale.data.render builds the
# identical token sequence in one pass for training (a unit test holds the two together).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def train_bpe_tokenizer(corpus: list[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE over ``corpus`` with our special tokens; deterministic for a given corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=None,
        extra_special_tokens=dict(MULTIMODAL_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """An LLM's or VLM's own tokenizer, with InternVL's image tokens and a ChatML template ensured."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if getattr(tokenizer, "context_image_token", None) is None:
        tokenizer = AutoTokenizer.from_pretrained(path, extra_special_tokens=dict(MULTIMODAL_TOKENS),
                                                  trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_image_processor(*, image_size: int, max_tiles: int, image_mean: list[float] = CLIP_MEAN,
                         image_std: list[float] = CLIP_STD) -> GotOcr2ImageProcessorPil:
    """InternVL's dynamic tiling (GotOcr2's processor, PIL backend: no torchvision needed); presets
    and fresh compositions normalise with CLIP statistics unless told otherwise."""
    return GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        image_mean=list(image_mean),
        image_std=list(image_std),
    )


def load_image_processor(path: str | Path, *, max_tiles: int | None) -> GotOcr2ImageProcessorPil:
    """A checkpoint's own image processor, every setting as its ``preprocessor_config.json`` says
    (mean/std, size, min/max patches, crop-to-patches, resampling); ``max_tiles`` replaces
    ``max_patches`` when given (an explicit ``data.max_tiles``)."""
    pre_file = Path(path) / "preprocessor_config.json"
    if not pre_file.is_file():
        raise ValueError(f"{pre_file}: not found; the checkpoint's image statistics and tiling are unknown. "
                         "Copy the release's preprocessor_config.json next to its config.json")
    kind = json.loads(pre_file.read_text()).get("image_processor_type", "")
    if not kind.startswith("GotOcr2ImageProcessor"):
        raise ValueError(f"{pre_file}: image_processor_type {kind!r} is not InternVL's GotOcr2ImageProcessor; an "
                         "original-format InternVL release is imported with `vlmscale model convert --from internvl-chat`")
    processor = GotOcr2ImageProcessorPil.from_pretrained(path)
    if max_tiles is not None:
        processor.max_patches = max_tiles
    return processor


def save_processor_configs(out: Path, *, image_processor: GotOcr2ImageProcessorPil, image_seq_length: int) -> None:
    """The image, video and processor configs of an HF InternVL export (everything but the tokenizer)."""
    image_processor.save_pretrained(out)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["image_processor_type"] = "GotOcr2ImageProcessor"
    pre["processor_class"] = "InternVLProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    video = {
        "video_processor_type": "InternVLVideoProcessor",
        "processor_class": "InternVLProcessor",
        "size": dict(image_processor.size),
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "rescale_factor": 1 / 255,
        "resample": int(image_processor.resample),
        "initial_shift": True,
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    proc = {"processor_class": "InternVLProcessor", "image_seq_length": image_seq_length}
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2))


@dataclass
class ProcessorAssets:
    """What a model needs besides weights: tokenizer, image processor, tokens per tile."""

    tokenizer: PreTrainedTokenizerBase
    image_processor: GotOcr2ImageProcessorPil
    image_seq_length: int

    @property
    def image_size(self) -> int:
        return int(self.image_processor.size["height"])

    def token_id(self, token: str) -> int:
        idx = self.tokenizer.convert_tokens_to_ids(token)
        assert isinstance(idx, int) and idx >= 0, token
        return idx

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer, image/video processor and processor configs as stock InternVL exports do."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out)
        save_processor_configs(out, image_processor=self.image_processor, image_seq_length=self.image_seq_length)
        (out / "chat_template.jinja").write_text(self.tokenizer.chat_template or CHAT_TEMPLATE)

    @classmethod
    def load(cls, path: str | Path, *, image_seq_length: int, max_tiles: int | None = None) -> "ProcessorAssets":
        """The tokenizer and image processor saved with a checkpoint; ``max_tiles`` (when given)
        replaces its ``max_patches``, every other image setting is the checkpoint's."""
        path = Path(path)
        proc_file = path / "processor_config.json"
        if proc_file.is_file():
            image_seq_length = int(json.loads(proc_file.read_text()).get("image_seq_length", image_seq_length))
        return cls(
            tokenizer=load_tokenizer(path),
            image_processor=load_image_processor(path, max_tiles=max_tiles),
            image_seq_length=image_seq_length,
        )
