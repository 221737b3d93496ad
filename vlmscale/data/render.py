"""Render a sample into input_ids, labels and image tiles in one pass.

The token sequence is exactly what the exported chat template plus the stock InternVL processor
produce (tests/unit/test_render.py holds them together): ChatML turns, and each image as
``<img>`` + ``<IMG_CONTEXT>`` x (tiles x image_seq_length) + ``</img>`` followed by a newline.
Labels are set while building: assistant content and its ``<|im_end|>`` are supervised, nothing
else; documents supervise all their text. A video part becomes a few sampled frames, each one
tile tagged with its time, its token grid optionally pooled, the whole clip within
``data.video.token_budget`` tokens (:func:`plan_video`). Problems raise :class:`BadSample` with a reason that
the data loader counts.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from vlmscale.config.schema import VideoConfig
from vlmscale.constants import IGNORE, IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START
from vlmscale.model.tokenizer import ProcessorAssets

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
    tile_pool: list[int] = field(default_factory=list)  # per tile: 1, or a video frame's pooling factor

    @property
    def num_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass(frozen=True)
class ImageOptions:
    """How images become tiles for one source (``data.max_tiles``, ``data.sources[i].max_tiles``,
    ``data.split_tiles``)."""

    max_tiles: int | None = None  # tile limit per image; None = the image processor's max_patches
    split_tiles: bool = True  # n images in a sample: each gets max(1, max_tiles // n) tiles (InternVL)
    raw: bool = False  # tiles as uint8 0..255 (normalised later by :func:`normalise_tiles`)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every mode: 16/32-bit greyscale scaled to 8 bits (not clipped), transparency over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.int64)
        if img.mode == "I" and arr.size and arr.max() <= 255:
            arr8 = arr.astype(np.uint8)
        else:
            arr8 = np.clip(arr >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _canvas_size(img: Image.Image, *, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """The (stored-orientation) size the tile grid of ``img`` is resized to: what a draft must cover."""
    transposed = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap width and height
    w, h = (img.height, img.width) if transposed else img.size
    cols, rows = get_optimal_tiled_canvas((h, w), (tile_size, tile_size), 1, max_tiles)
    need = (cols * tile_size, rows * tile_size)
    return need[::-1] if transposed else need


def decode_image(data: bytes, *, tile_size: int | None = None, max_tiles: int | None = None) -> Image.Image:
    """An upright RGB image, or :class:`BadSample`: ``decompression_bomb`` (over PIL's pixel limit),
    ``corrupt_image`` (unreadable or truncated). Animated images give their first frame. A large JPEG
    is decoded at a reduced DCT scale (``Image.draft``) when that still covers the tile grid."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if tile_size is not None and max_tiles is not None and img.format == "JPEG":
                img.draft("RGB", _canvas_size(img, tile_size=tile_size, max_tiles=max_tiles))
            img.load()  # the first frame of an animation
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample("decompression_bomb", str(exc)) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadSample("corrupt_image", str(exc) or type(exc).__name__) from exc


def normalise_tiles(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """uint8 tiles (from ``ImageOptions(raw=True)``) -> the float values the processor itself gives."""
    p = image_processor
    tiles = [p.normalize(p.rescale(tile, p.rescale_factor), p.image_mean, p.image_std) for tile in pixels.numpy()]
    return torch.from_numpy(np.stack(tiles).astype(np.float32, copy=False))


def pooled_tokens(image_seq_length: int, pool: int) -> int:
    """Tokens of one tile after ``pool`` x ``pool`` average pooling of its (square) token grid."""
    grid = math.isqrt(image_seq_length)
    if grid * grid != image_seq_length:
        raise ValueError(f"image_seq_length={image_seq_length} is not a square grid; use data.video.pool=1")
    return math.ceil(grid / pool) ** 2


@dataclass
class VideoPlan:
    frames: list[int]  # indices into the clip, in time order
    tokens_per_frame: int  # image tokens of one frame after pooling
    total_tokens: int  # everything the clip adds: time tags, <img> blocks, newlines


def _frame_cost(tag_tokens: int, tokens_per_frame: int, newline_tokens: int) -> int:
    return tag_tokens + 2 + tokens_per_frame + newline_tokens


def plan_video(num_frames: int, *, tag_tokens: list[int], newline_tokens: int, image_seq_length: int,
               cfg: VideoConfig, scores: list[float] | None = None) -> VideoPlan:
    """Choose frames so the clip fits ``cfg.token_budget``: at most ``cfg.max_frames``, fewer if needed.

    ``tag_tokens[k]`` is the token count of the k-th chosen frame's time tag. Uniform sampling takes
    the centre of each of n equal segments; keyframe sampling takes frame 0 and the n - 1 frames
    with the largest ``scores`` (change from the previous frame).
    """
    per_frame = pooled_tokens(image_seq_length, cfg.pool)
    n = min(num_frames, cfg.max_frames)
    while n > 0 and sum(_frame_cost(tag_tokens[k], per_frame, newline_tokens) for k in range(n)) > cfg.token_budget:
        n -= 1
    if n == 0:
        one = _frame_cost(tag_tokens[0], per_frame, newline_tokens)
        raise BadSample("video_over_budget", f"one frame needs {one} tokens > data.video.token_budget={cfg.token_budget}")
    if cfg.sampling == "keyframe" and scores is not None and n > 1:
        ranked = sorted(range(1, num_frames), key=lambda i: (-scores[i], i))
        frames = sorted([0] + ranked[: n - 1])
    else:
        frames = [min(num_frames - 1, int((k + 0.5) * num_frames / n)) for k in range(n)]
    total = sum(_frame_cost(tag_tokens[k], per_frame, newline_tokens) for k in range(n))
    return VideoPlan(frames, per_frame, total)


def _change_scores(images: list[Image.Image]) -> list[float]:
    arrays = [np.asarray(im.resize((32, 32)), dtype=np.float32) for im in images]
    return [0.0] + [float(np.abs(a - b).mean()) for a, b in zip(arrays[1:], arrays[:-1])]


def count_images(record: dict) -> int:
    """Images (not video frames) of a sample: entries of ``images`` plus image parts."""
    parts = list(record.get("document") or [])
    for msg in record.get("messages") or []:
        if isinstance(msg, dict) and isinstance(msg.get("content"), list):
            parts.extend(msg["content"])
    listed = record.get("images")
    return (len(listed) if isinstance(listed, list) else 0) + sum(
        1 for p in parts if isinstance(p, dict) and p.get("type") == "image")


class _Builder:
    def __init__(self, assets: ProcessorAssets, video: VideoConfig | None = None, images: ImageOptions | None = None,
                 num_images: int = 1):
        self.assets = assets
        self.video_cfg = video or VideoConfig()
        self.image_opts = images or ImageOptions()
        limit = self.image_opts.max_tiles or int(assets.image_processor.max_patches)
        split = self.image_opts.split_tiles and num_images > 1
        self.tile_limit = max(1, limit // num_images) if split else limit
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.buffer: list[str] = []
        self.buffer_supervised = False
        self.tiles: list[torch.Tensor] = []
        self.tiles_per_image: list[int] = []
        self.tile_pool: list[int] = []

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

    def _block(self, n_context: int) -> None:
        ctx = self.assets.token_id(IMG_CONTEXT)
        block = [self.assets.token_id(IMG_START)] + [ctx] * n_context + [self.assets.token_id(IMG_END)]
        self.ids.extend(block)
        self.labels.extend([IGNORE] * len(block))

    def _tokens(self, text: str) -> list[int]:
        return self.assets.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pixels(self, img: Image.Image, **kwargs) -> torch.Tensor:
        raw = self.image_opts.raw
        out = self.assets.image_processor(images=[img], return_tensors="np", do_rescale=not raw, do_normalize=not raw, **kwargs)
        pixels = np.asarray(out["pixel_values"])
        if raw:
            assert np.array_equal(pixels, np.round(pixels)), "resized tiles are expected to hold whole 0..255 values"
            pixels = pixels.astype(np.uint8)
        return torch.from_numpy(pixels)

    def image(self, data: bytes) -> None:
        self.flush()
        img = decode_image(data, tile_size=self.assets.image_size, max_tiles=self.tile_limit)
        pixels = self._pixels(img, max_patches=self.tile_limit)
        n_tiles = int(pixels.shape[0])
        self.tiles.append(pixels)
        self.tiles_per_image.append(n_tiles)
        self.tile_pool.extend([1] * n_tiles)
        self._block(n_tiles * self.assets.image_seq_length)
        self.text("\n", supervised=False)

    def video(self, frames: list[bytes], timestamps: list[float]) -> None:
        """Sampled frames, one tile each: ``Frame{k} ({t}s): <img>...</img>\n``, tokenized on their own
        so the clip's token count is exactly what :func:`plan_video` budgeted."""
        self.flush()
        cfg = self.video_cfg
        keyframes = cfg.sampling == "keyframe"
        decoded = [decode_image(f) for f in frames] if keyframes else None
        newline = self._tokens("\n")
        # tag token counts depend on the chosen frames' times: plan with the widest tags, then render exact
        widest = max(len(self._tokens(f"Frame{k + 1} ({t:.1f}s): ")) for k, t in enumerate(timestamps))
        plan = plan_video(len(frames), tag_tokens=[widest] * len(frames), newline_tokens=len(newline),
                          image_seq_length=self.assets.image_seq_length, cfg=cfg,
                          scores=_change_scores(decoded) if keyframes else None)
        for k, i in enumerate(plan.frames):
            img = decoded[i] if decoded is not None else decode_image(frames[i])
            self.tiles.append(self._pixels(img, crop_to_patches=False))
            self.tiles_per_image.append(1)
            self.tile_pool.append(cfg.pool)
            tag = self._tokens(f"Frame{k + 1} ({timestamps[i]:.1f}s): ")
            self.ids.extend(tag)
            self.labels.extend([IGNORE] * len(tag))
            self._block(plan.tokens_per_frame)
            self.ids.extend(newline)
            self.labels.extend([IGNORE] * len(newline))

    def result(self) -> Rendered:
        self.flush()
        pixels = torch.cat(self.tiles) if self.tiles else None
        return Rendered(self.ids, self.labels, pixels, self.tiles_per_image, self.tile_pool)


def _image_bytes(name: object, members: dict[str, bytes]) -> bytes:
    if not isinstance(name, str):
        raise BadSample("bad_schema", f"image reference {name!r} is not a member name")
    if name not in members:
        raise BadSample("missing_image", f"no member {name!r}")
    return members[name]


def _video(part: dict, members: dict[str, bytes]) -> tuple[list[bytes], list[float]]:
    names = part.get("frames")
    if not isinstance(names, list) or not names:
        raise BadSample("bad_schema", "a video part needs a non-empty 'frames' list of member names")
    frames = [_image_bytes(n, members) for n in names]
    if "timestamps" in part:
        times = part["timestamps"]
        if not isinstance(times, list) or len(times) != len(frames):
            raise BadSample("bad_schema", f"video: {len(frames)} frames but timestamps={times!r}")
    else:
        fps = float(part.get("fps", 1.0))
        times = [i / fps for i in range(len(frames))]
    return frames, [float(t) for t in times]


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


def _visual(b: _Builder, part: dict, members: dict[str, bytes]) -> bool:
    """Add an image or video part; False if the part is neither."""
    kind = part.get("type")
    if kind == "image":
        b.image(_image_bytes(part.get("image"), members))
    elif kind == "video":
        b.video(*_video(part, members))
    else:
        return False
    return True


def render_sample(record: dict, members: dict[str, bytes], assets: ProcessorAssets, *, max_seq_len: int,
                  video: VideoConfig | None = None, images: ImageOptions | None = None, builder=None) -> Rendered:
    """Tokens, labels and tiles for one sample of the vlmscale schema (see docs/data.md)."""
    b = (builder or _Builder)(assets, video, images, num_images=count_images(record))
    if "document" in record:
        for part in record["document"]:
            kind = part.get("type")
            if _visual(b, part, members):
                continue
            if kind == "text":
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
                if _visual(b, part, members):
                    continue
                if kind == "text":
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


@dataclass(frozen=True)
class Probe:
    """A sample's size without decoding its pixels (``probe_sample``): what balancing costs are made of."""

    tokens: int  # LLM sequence length, image tokens included
    tiles: int  # vision tiles (video frames count one each)
    supervised: int  # supervised positions


def _grid_tiles(width: int, height: int, *, tile_size: int, limit: int, processor) -> int:
    """Tiles the image processor cuts a ``width`` x ``height`` image into (grid plus thumbnail)."""
    if not getattr(processor, "crop_to_patches", True) or limit <= 1:
        return 1
    cols, rows = get_optimal_tiled_canvas((height, width), (tile_size, tile_size), int(getattr(processor, "min_patches", 1)), limit)
    return cols * rows + (1 if cols * rows > 1 else 0)  # the processor's thumbnail


class _Probe(_Builder):
    """:class:`_Builder` that reads image headers only: token and tile counts equal to the full render's
    for images; for a video, its frame plan with uniform sampling (keyframe choice needs the pixels,
    but changes which frames are taken, not how many)."""

    def image(self, data: bytes) -> None:
        self.flush()
        try:
            img = Image.open(io.BytesIO(data))  # reads the header; pixels stay undecoded
            transposed = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            w, h = (img.height, img.width) if transposed else img.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            raise BadSample("corrupt_image", str(exc) or type(exc).__name__) from exc
        n_tiles = _grid_tiles(w, h, tile_size=self.assets.image_size, limit=self.tile_limit,
                              processor=self.assets.image_processor)
        self.tiles_per_image.append(n_tiles)
        self._block(n_tiles * self.assets.image_seq_length)
        self.text("\n", supervised=False)

    def video(self, frames: list[bytes], timestamps: list[float]) -> None:
        self.flush()
        widest = max(len(self._tokens(f"Frame{k + 1} ({t:.1f}s): ")) for k, t in enumerate(timestamps))
        newline = len(self._tokens("\n"))
        plan = plan_video(len(frames), tag_tokens=[widest] * len(frames), newline_tokens=newline,
                          image_seq_length=self.assets.image_seq_length, cfg=self.video_cfg, scores=None)
        for k, i in enumerate(plan.frames):
            tag = len(self._tokens(f"Frame{k + 1} ({timestamps[i]:.1f}s): "))
            self.tiles_per_image.append(1)
            self.ids.extend([0] * (tag + 2 + plan.tokens_per_frame + newline))
            self.labels.extend([IGNORE] * (tag + 2 + plan.tokens_per_frame + newline))


def probe_sample(record: dict, members: dict[str, bytes], assets: ProcessorAssets, *, max_seq_len: int,
                 video: VideoConfig | None = None, images: ImageOptions | None = None) -> Probe:
    """:func:`render_sample`'s sizes (tokens, tiles, supervised) without decoding pixels; raises
    :class:`BadSample` where the render would, except for faults only decoding finds."""
    out = render_sample(record, members, assets, max_seq_len=max_seq_len, video=video, images=images, builder=_Probe)
    return Probe(len(out.input_ids), sum(out.tiles_per_image), out.num_supervised)


def render_prompt(messages: list[dict], members: dict[str, bytes], assets: ProcessorAssets,
                  video: VideoConfig | None = None, images: ImageOptions | None = None) -> Rendered:
    """Tokens for generation: the conversation so far plus ``<|im_start|>assistant\\n``."""
    b = _Builder(assets, video, images, num_images=count_images({"messages": messages}))
    for msg in messages:
        b.special(IM_START, supervised=False)
        b.text(msg["role"] + "\n", supervised=False)
        for part in _parts(msg["content"], [], [0]):
            if not _visual(b, part, members):
                b.text(part["text"], supervised=False)
        b.special(IM_END, supervised=False)
        b.text("\n", supervised=False)
    b.special(IM_START, supervised=False)
    b.text("assistant\n", supervised=False)
    return b.result()


def normalise_answer(text: str) -> str:
    return re.sub(r"[^\w<>\[\], ]", "", text.strip().lower()).strip()
