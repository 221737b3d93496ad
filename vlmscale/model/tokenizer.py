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

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO]
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


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """An LLM's or VLM's own tokenizer, with InternVL's image tokens and a ChatML template ensured."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if getattr(tokenizer, "context_image_token", None) is None:
        tokenizer = AutoTokenizer.from_pretrained(path, extra_special_tokens=dict(MULTIMODAL_TOKENS))
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_image_processor(*, image_size: int, max_tiles: int) -> GotOcr2ImageProcessorPil:
    return GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


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
        self.image_processor.save_pretrained(out)
        pre = json.loads((out / "preprocessor_config.json").read_text())
        pre["image_processor_type"] = "GotOcr2ImageProcessor"
        pre["processor_class"] = "InternVLProcessor"
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        video = {
            "video_processor_type": "InternVLVideoProcessor",
            "processor_class": "InternVLProcessor",
            "size": dict(self.image_processor.size),
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "rescale_factor": 1 / 255,
            "resample": 3,
            "initial_shift": True,
        }
        (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
        proc = {"processor_class": "InternVLProcessor", "image_seq_length": self.image_seq_length}
        (out / "processor_config.json").write_text(json.dumps(proc, indent=2))
        (out / "chat_template.jinja").write_text(self.tokenizer.chat_template or CHAT_TEMPLATE)

    @classmethod
    def load(cls, path: str | Path, *, image_seq_length: int, max_tiles: int | None = None) -> "ProcessorAssets":
        path = Path(path)
        tokenizer = load_tokenizer(path)
        pre_file = path / "preprocessor_config.json"
        size, tiles = 448, 12
        if pre_file.is_file():
            pre = json.loads(pre_file.read_text())
            size = int(pre.get("size", {}).get("height", size))
            tiles = int(pre.get("max_patches", tiles))
        proc_file = path / "processor_config.json"
        if proc_file.is_file():
            image_seq_length = int(json.loads(proc_file.read_text()).get("image_seq_length", image_seq_length))
        return cls(
            tokenizer=tokenizer,
            image_processor=make_image_processor(image_size=size, max_tiles=max_tiles or tiles),
            image_seq_length=image_seq_length,
        )
