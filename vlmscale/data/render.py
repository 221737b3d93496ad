"""Render a sample into input_ids, labels and image tiles in one pass.

The token sequence is exactly what the exported chat template plus the stock InternVL processor
produce (tests/unit/test_render.py holds them together): ChatML turns, and each image as
``<img>`` + ``<IMG_CONTEXT>`` x (tiles x image_seq_length) + ``</img>`` followed by a newline.
Labels are set while building: assistant content and its ``<|im_end|>`` are supervised, nothing
else; documents supervise all their text. Problems raise :class:`BadSample` with a reason that
the data loader counts.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlmscale.model.tokenizer import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, ProcessorAssets

IGNORE = -100
ROLES = ("system", "user", "assistant")
PLACEHOLDER = "<image>"


class BadSample(Exception):
    """A sample that cannot be trained on; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None  # (total tiles, 3, H, W)
    tiles_per_image: list[int] = field(default_factory=list)

    @property
    def num_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


class _Builder:
    def __init__(self, assets: ProcessorAssets):
        self.assets = assets
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.buffer: list[str] = []
        self.buffer_supervised = False
        self.tiles: list[torch.Tensor] = []
        self.tiles_per_image: list[int] = []

    def text(self, text: str, *, supervised: bool) -> None:
        if self.buffer and supervised != self.buffer_supervised:
            self.flush()
        self.buffer.append(text)
        self.buffer_supervised = supervised

    def flush(self) -> None:
        if not self.buffer:
            return
        ids = self.assets.tokenizer("".join(self.buffer), add_special_tokens=False)["input_ids"]
        self.ids.extend(ids)
        self.labels.extend(ids if self.buffer_supervised else [IGNORE] * len(ids))
        self.buffer = []

    def special(self, token: str, *, supervised: bool) -> None:
        self.flush()
        idx = self.assets.token_id(token)
        self.ids.append(idx)
        self.labels.append(idx if supervised else IGNORE)

    def image(self, data: bytes) -> None:
        self.flush()
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
            img = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise BadSample("corrupt_image", str(exc)) from exc
        out = self.assets.image_processor(images=[img], return_tensors="np")
        pixels = torch.from_numpy(np.asarray(out["pixel_values"]))
        n_tiles = int(pixels.shape[0])
        self.tiles.append(pixels)
        self.tiles_per_image.append(n_tiles)
        ctx = self.assets.token_id(IMG_CONTEXT)
        block = [self.assets.token_id(IMG_START)] + [ctx] * (n_tiles * self.assets.image_seq_length) + [self.assets.token_id(IMG_END)]
        self.ids.extend(block)
        self.labels.extend([IGNORE] * len(block))
        self.text("\n", supervised=False)

    def result(self) -> Rendered:
        self.flush()
        pixels = torch.cat(self.tiles) if self.tiles else None
        return Rendered(self.ids, self.labels, pixels, self.tiles_per_image)


def _image_bytes(name: object, members: dict[str, bytes]) -> bytes:
    if not isinstance(name, str):
        raise BadSample("bad_schema", f"image reference {name!r} is not a member name")
    if name not in members:
        raise BadSample("missing_image", f"no member {name!r}")
    return members[name]


def _parts(content: object, images: list[str], cursor: list[int]) -> list[dict]:
    """Normalise a message's content to parts; string content may carry <image> placeholders."""
    if isinstance(content, list):
        return content
    if not isinstance(content, str):
        raise BadSample("bad_schema", "message content must be a string or a list of parts")
    pieces = content.split(PLACEHOLDER)
    parts: list[dict] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            if cursor[0] >= len(images):
                raise BadSample("placeholder_mismatch", f"more {PLACEHOLDER} placeholders than images ({len(images)})")
            parts.append({"type": "image", "image": images[cursor[0]]})
            cursor[0] += 1
            piece = piece[1:] if piece.startswith("\n") else piece  # the image block already ends in a newline
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def render_sample(record: dict, members: dict[str, bytes], assets: ProcessorAssets, *, max_seq_len: int) -> Rendered:
    """Tokens, labels and tiles for one sample of the vlmscale schema (see docs/data.md)."""
    b = _Builder(assets)
    if "document" in record:
        for part in record["document"]:
            kind = part.get("type")
            if kind == "image":
                b.image(_image_bytes(part.get("image"), members))
            elif kind == "text":
                b.text(part.get("text", ""), supervised=True)
            else:
                raise BadSample("bad_schema", f"document part type {kind!r}")
        b.special(IM_END, supervised=True)
    elif "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadSample("bad_schema", "messages must be a non-empty list")
        images = record.get("images", [])
        cursor = [0]
        has_answer = False
        for msg in messages:
            role = msg.get("role")
            if role not in ROLES:
                raise BadSample("bad_schema", f"role {role!r} (use system/user/assistant)")
            supervised = role == "assistant"
            b.special(IM_START, supervised=False)
            b.text(role + "\n", supervised=False)
            for part in _parts(msg.get("content"), images, cursor):
                kind = part.get("type")
                if kind == "image":
                    b.image(_image_bytes(part.get("image"), members))
                elif kind == "text":
                    text = part.get("text", "")
                    has_answer |= supervised and bool(text.strip())
                    b.text(text, supervised=supervised)
                else:
                    raise BadSample("bad_schema", f"content part type {kind!r}")
            b.special(IM_END, supervised=supervised)
            b.text("\n", supervised=False)
        if cursor[0] != len(images):
            raise BadSample("placeholder_mismatch", f"{len(images)} images but {cursor[0]} {PLACEHOLDER} placeholders")
        if not has_answer:
            raise BadSample("no_assistant_turn", "nothing to supervise")
    else:
        raise BadSample("bad_schema", "a sample needs 'messages' or 'document'")
    out = b.result()
    if len(out.input_ids) > max_seq_len:
        raise BadSample("too_long", f"{len(out.input_ids)} tokens > data.max_seq_len={max_seq_len}")
    return out


def render_prompt(messages: list[dict], members: dict[str, bytes], assets: ProcessorAssets) -> Rendered:
    """Tokens for generation: the conversation so far plus ``<|im_start|>assistant\\n``."""
    b = _Builder(assets)
    for msg in messages:
        b.special(IM_START, supervised=False)
        b.text(msg["role"] + "\n", supervised=False)
        for part in _parts(msg["content"], [], [0]):
            if part["type"] == "image":
                b.image(_image_bytes(part["image"], members))
            else:
                b.text(part["text"], supervised=False)
        b.special(IM_END, supervised=False)
        b.text("\n", supervised=False)
    b.special(IM_START, supervised=False)
    b.text("assistant\n", supervised=False)
    return b.result()


def normalise_answer(text: str) -> str:
    return re.sub(r"[^\w<>\[\], ]", "", text.strip().lower()).strip()
