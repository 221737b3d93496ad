"""Converters from formats users already have into vlmscale shards.

Every format goes through :func:`convert`: records are read one at a time (:mod:`vlmscale.data.records`),
turned into a shard sample by a per-format function (in ``--workers`` processes, order kept), and
written to a fresh directory that replaces ``out_dir`` only when the conversion finished, so an
output directory never mixes shards of two runs. A bad record is skipped and counted by reason; the
counts are printed and written to ``out_dir/convert-summary.json``.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from vlmscale.data.records import BadLine, iter_records
from vlmscale.data.shards import ShardWriter
from vlmscale.data.video_files import FrameSampling, MissingExtra, UnreadableVideo, decode_video, is_video_file

log = logging.getLogger(__name__)
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
SUMMARY = "convert-summary.json"


class Skip(Exception):
    """A record that cannot become a sample; ``reason`` is its counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Options:
    """What a per-format function needs besides the record (picklable: it travels to the workers)."""

    media_root: Path = Path(".")
    video: FrameSampling = field(default_factory=FrameSampling)


Sample = tuple[dict, dict[str, bytes]]  # (record JSON, other members)


# --- output: a fresh directory, swapped in at the end --------------------------------------------

def _prepare_out(out_dir: Path, *, overwrite: bool) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ValueError(f"--out {out_dir} exists and is not empty; choose a new directory or pass --overwrite "
                         "(which replaces it once the new conversion has finished)")
    tmp = out_dir.with_name(f".{out_dir.name}.converting-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit_out(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with ``tmp``: two renames, so readers see the old set or the new, never both."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# --- the shared loop ------------------------------------------------------------------------------

def _guarded(fn: Callable[[object, Options], Sample | list[Sample]], opts: Options, item: tuple[int, object]):
    n, record = item
    try:
        if isinstance(record, BadLine):
            raise Skip("bad_json", f"line {record.line}: {record.error}")
        if not isinstance(record, dict):
            raise Skip("bad_record", "not a JSON object")
        return n, fn(record, opts), None
    except Skip as exc:
        return n, None, exc
    except MissingExtra:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        return n, None, Skip("bad_record", repr(exc))


def convert(records: Iterable[object], fn: Callable[[dict, Options], Sample], *, out_dir: str | Path, prefix: str,
            opts: Options = Options(), shard_size: int = 1000, workers: int = 1, overwrite: bool = False,
            total: int | None = None, desc: str = "convert") -> dict[str, int]:
    """Write ``fn(record)`` of each record as one sample; counts ``written`` and ``skipped/<reason>``."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    tmp = _prepare_out(out_dir, overwrite=overwrite)
    writer = ShardWriter(tmp, max_count=shard_size)
    counts: Counter = Counter()
    job = functools.partial(_guarded, fn, opts)
    items: Iterator = enumerate(records)
    t0 = time.time()
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(job, items, chunksize=8) if pool else map(job, items)
        bar = tqdm(results, total=total, desc=desc, unit=" samples", file=sys.stderr, mininterval=1.0,
                   disable=os.environ.get("VLMSCALE_NO_PROGRESS") == "1")
        for n, sample, skip in bar:
            if skip is not None:
                log.warning("record %d skipped (%s): %s", n, skip.reason, skip.detail)
                counts[f"skipped/{skip.reason}"] += 1
                continue
            record, members = sample
            record.setdefault("id", f"{prefix}{n:09d}")
            members = {**members, "json": json.dumps(record).encode()}
            writer.write(f"{prefix}{n:09d}", members)
            counts["written"] += 1
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool:
            pool.terminate()
    writer.close()
    result = dict(counts)
    summary = {"counts": result, "seconds": round(time.time() - t0, 3), "workers": workers}
    (tmp / SUMMARY).write_text(json.dumps(summary, indent=2))
    _commit_out(tmp, out_dir)
    skipped = {k: v for k, v in result.items() if k != "written"}
    log.info("%s: %d samples written to %s%s", desc, result.get("written", 0), out_dir,
             f"; skipped {sum(skipped.values())} ({', '.join(f'{k[8:]} {v}' for k, v in sorted(skipped.items()))})"
             if skipped else "")
    return result


# --- media references -----------------------------------------------------------------------------

def _media_bytes(ref: object, opts: Options, kind: str = "image") -> tuple[bytes, str]:
    """(bytes, lower-case suffix) of a media reference: a path under the media root, a ``data:`` URL,
    a ``file://`` URL, or a ``{"bytes": ..., "path": ...}`` dict (Hugging Face ``Image`` columns)."""
    if isinstance(ref, dict):
        if isinstance(ref.get("bytes"), (bytes, bytearray)):
            return bytes(ref["bytes"]), Path(str(ref.get("path") or "")).suffix.lower() or ".png"
        ref = ref.get("path") or ref.get("url")
    if not isinstance(ref, str) or not ref:
        raise Skip("bad_record", f"media reference {ref!r} is not a path")
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        mime = header[5:].split(";")[0]
        try:
            data = base64.b64decode(payload) if ";base64" in header else payload.encode()
        except ValueError as exc:
            raise Skip("bad_media", f"data URL: {exc}") from exc
        return data, "." + (mime.split("/")[-1] or "png")
    if ref.startswith(("http://", "https://")):
        raise Skip("remote_media", f"{ref}: download media first and point --media-root at it")
    path = Path(ref[7:] if ref.startswith("file://") else ref)
    src = path if path.is_absolute() else opts.media_root / path
    if not src.is_file():
        raise Skip(f"missing_{kind}", f"{src} not found")
    return src.read_bytes(), src.suffix.lower() or ".jpg"


class _Media:
    """Members of one sample being built: images as ``img<i>.<ext>``, video frames as ``vid<j>f<k>.jpg``."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.members: dict[str, bytes] = {}
        self.num_images = 0
        self.num_videos = 0

    def image(self, ref: object) -> str:
        data, suffix = _media_bytes(ref, self.opts)
        name = f"img{self.num_images}{suffix}"
        self.num_images += 1
        self.members[name] = data
        return name

    def video(self, ref: object) -> dict:
        """A video part: a file (decoded and sampled here) or a list of frame images."""
        j = self.num_videos
        self.num_videos += 1
        if isinstance(ref, list):
            names = []
            for k, frame in enumerate(ref):
                data, suffix = _media_bytes(frame, self.opts, "video")
                names.append(f"vid{j}f{k}{suffix}")
                self.members[names[-1]] = data
            if not names:
                raise Skip("bad_record", "an empty frame list")
            return {"type": "video", "frames": names, "fps": self.opts.video.fps or 1.0}
        if not (isinstance(ref, str) and is_video_file(ref)) and not isinstance(ref, dict):
            raise Skip("bad_record", f"video {ref!r}: expected a video file or a list of frames")
        data, _ = _media_bytes(ref, self.opts, "video")
        try:
            frames = decode_video(data, self.opts.video)
        except UnreadableVideo as exc:
            raise Skip("unreadable_video", f"{ref}: {exc}") from exc
        names = []
        for k, (jpeg, _) in enumerate(frames):
            names.append(f"vid{j}f{k}.jpg")
            self.members[names[-1]] = jpeg
        return {"type": "video", "frames": names, "timestamps": [round(t, 3) for _, t in frames]}


def _as_list(value: object) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, (str, dict)) else list(value)


# --- conversations: LLaVA, ShareGPT (LLaMA-Factory), InternVL annotations --------------------------

def _turns(record: dict) -> list[tuple[str, str]]:
    turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise Skip("no_conversations", "no 'messages' or 'conversations' list")
    out = []
    for t in turns:
        if not isinstance(t, dict):
            raise Skip("bad_turn", f"turn {t!r} is not an object")
        role, text = t.get("role", t.get("from")), t.get("content", t.get("value"))
        if role not in LLAVA_ROLES or not isinstance(text, str):
            raise Skip("bad_turn", f"turn with role {role!r} and content {type(text).__name__}")
        out.append((LLAVA_ROLES[role], text))
    return out


_PLACEHOLDER = re.compile(r"(<image>|<video>)")


def _expand(text: str, images: list[str], videos: list, media: _Media, cursor: dict[str, int]) -> list[dict]:
    """A string with ``<image>``/``<video>`` placeholders as content parts (media consumed in order)."""
    parts: list[dict] = []
    after_visual = False
    for piece in _PLACEHOLDER.split(text):
        if piece in ("<image>", "<video>"):
            kind = piece[1:-1]
            pool = images if kind == "image" else videos
            if cursor[kind] >= len(pool):
                raise Skip("placeholder_mismatch", f"more {piece} placeholders than {kind}s ({len(pool)})")
            ref = pool[cursor[kind]]
            cursor[kind] += 1
            parts.append({"type": "image", "image": ref} if kind == "image" else media.video(ref))
            after_visual = True
            continue
        if after_visual and piece.startswith("\n"):  # the visual block already ends in a newline
            piece = piece[1:]
        after_visual = False
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def conversation_sample(record: dict, opts: Options) -> Sample:
    """LLaVA / ShareGPT / InternVL: ``messages`` (role/content) or ``conversations`` (from/value) with
    ``<image>``/``<video>`` placeholders, ``images``/``image`` and ``videos``/``video`` lists, optional ``system``.

    Without videos the text is kept as written, placeholders included, with the images in ``images``
    (a placeholder/image mismatch is left to the loader, which counts it); with videos, messages become
    content parts and a mismatch is counted here.
    """
    turns = _turns(record)
    system = record.get("system")
    if isinstance(system, str) and system.strip() and turns[0][0] != "system":
        turns.insert(0, ("system", system))
    media = _Media(opts)
    images = [media.image(r) for r in _as_list(record.get("images", record.get("image")))]
    videos = _as_list(record.get("videos", record.get("video")))
    out: dict = {"id": str(record["id"])} if "id" in record else {}
    if not videos:
        out["messages"] = [{"role": role, "content": text} for role, text in turns]
        if images:
            out["images"] = images
        return out, media.members
    cursor = {"image": 0, "video": 0}
    out["messages"] = [{"role": role, "content": _expand(text, images, videos, media, cursor)} for role, text in turns]
    if cursor["image"] != len(images) or cursor["video"] != len(videos):
        raise Skip("placeholder_mismatch", f"{len(images)} images and {len(videos)} videos but {cursor['image']} "
                                           f"<image> and {cursor['video']} <video> placeholders")
    return out, media.members


# --- OpenAI / TRL content lists -------------------------------------------------------------------

OPENAI_MEDIA_KEYS = ("image", "image_url", "video", "url", "path", "value")


def _part_ref(part: dict) -> object:
    for key in OPENAI_MEDIA_KEYS:
        value = part.get(key)
        if isinstance(value, dict) and "url" in value and "bytes" not in value:
            value = value["url"]
        if value is not None and key != "type":
            return value
    return None


def openai_sample(record: dict, opts: Options) -> Sample:
    """``messages`` whose content is a string or a list of ``{"type": "text"|"image"|"image_url"|"video", ...}``
    parts; the media reference comes from ``image``, ``image_url`` (a string or ``{url}``), ``url``, ``path``
    or ``value``. A part without a reference takes the next entry of a top-level ``images``/``videos`` list
    (TRL's layout)."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Skip("no_conversations", "no 'messages' list")
    media = _Media(opts)
    pending = {"image": _as_list(record.get("images")), "video": _as_list(record.get("videos"))}
    used = {"image": 0, "video": 0}
    out_messages = []
    for msg in messages:
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise Skip("bad_turn", f"message {str(msg)[:80]!r}")
        content = msg.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise Skip("bad_turn", "content is neither a string nor a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text"):
                parts.append({"type": "text", "text": str(part.get("text", ""))})
                continue
            if kind in ("image", "image_url", "input_image"):
                kind = "image"
            elif kind != "video":
                raise Skip("bad_part", f"content part type {kind!r}")
            ref = _part_ref(part)
            if ref is None:
                if used[kind] >= len(pending[kind]):
                    raise Skip("placeholder_mismatch", f"more {kind} parts than entries in '{kind}s'")
                ref = pending[kind][used[kind]]
                used[kind] += 1
            parts.append({"type": "image", "image": media.image(ref)} if kind == "image" else media.video(ref))
        out_messages.append({"role": msg["role"], "content": parts})
    if used["image"] != len(pending["image"]) or used["video"] != len(pending["video"]):
        raise Skip("placeholder_mismatch", f"{len(pending['image'])} images listed, {used['image']} used")
    out = {"id": str(record["id"])} if "id" in record else {}
    out["messages"] = out_messages
    return out, media.members


def auto_sample(record: dict, opts: Options) -> Sample:
    """Content lists -> :func:`openai_sample`; plain strings with placeholders -> :func:`conversation_sample`."""
    turns = record.get("messages", record.get("conversations"))
    if isinstance(turns, list) and any(isinstance(t, dict) and isinstance(t.get("content"), list) for t in turns):
        return openai_sample(record, opts)
    return conversation_sample(record, opts)


# --- file-based entry points ----------------------------------------------------------------------

def convert_llava(json_path: str | Path, *, image_root: str | Path, out_dir: str | Path, shard_size: int = 1000,
                  workers: int = 1, overwrite: bool = False, video: FrameSampling = FrameSampling()) -> dict[str, int]:
    """LLaVA JSON/JSONL (``conversations`` with ``from: human/gpt``, ``<image>`` placeholders) -> shards.

    Text is kept as written, ``<image>`` placeholders included; each referenced image file becomes
    a member ``img<i>.<ext>`` listed in the sample's ``images``. Samples whose image files are
    missing or whose turns cannot be read are skipped and counted; placeholder/image mismatches
    are left for the loader, which skips and counts them at training time.
    """
    return convert(iter_records(json_path), conversation_sample, out_dir=out_dir, prefix="llava",
                   opts=Options(Path(image_root), video), shard_size=shard_size, workers=workers, overwrite=overwrite,
                   desc="llava")


def convert_sharegpt(json_path: str | Path, *, image_root: str | Path, out_dir: str | Path, shard_size: int = 1000,
                     workers: int = 1, overwrite: bool = False, video: FrameSampling = FrameSampling()) -> dict[str, int]:
    """LLaMA-Factory's ShareGPT form (see :func:`conversation_sample`) -> shards."""
    return convert(iter_records(json_path), conversation_sample, out_dir=out_dir, prefix="sgpt",
                   opts=Options(Path(image_root), video), shard_size=shard_size, workers=workers, overwrite=overwrite,
                   desc="sharegpt")


def convert_openai(json_path: str | Path, *, image_root: str | Path, out_dir: str | Path, shard_size: int = 1000,
                   workers: int = 1, overwrite: bool = False, video: FrameSampling = FrameSampling()) -> dict[str, int]:
    """OpenAI / TRL content-list messages (see :func:`openai_sample`) -> shards."""
    return convert(iter_records(json_path), openai_sample, out_dir=out_dir, prefix="oai",
                   opts=Options(Path(image_root), video), shard_size=shard_size, workers=workers, overwrite=overwrite,
                   desc="openai")


def _annotation_path(value: str, meta_path: Path) -> Path:
    p = Path(value)
    if p.is_absolute() or p.exists():
        return p
    return meta_path.parent / p


def convert_internvl(meta_path: str | Path, *, out_dir: str | Path, shard_size: int = 1000, workers: int = 1,
                     overwrite: bool = False, video: FrameSampling = FrameSampling()) -> dict:
    """InternVL meta JSON ``{name: {root, annotation, repeat_time, length, max_dynamic_patch?}}`` -> one shard
    directory per entry under ``out_dir`` plus ``out_dir/sources.yaml``, the matching ``data.sources``:
    weight ``length x repeat_time`` (fractions kept), ``max_tiles`` from ``max_dynamic_patch``."""
    import yaml

    meta_path, out_dir = Path(meta_path), Path(out_dir)
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{meta_path}: expected an InternVL meta object {{name: {{root, annotation, ...}}}}")
    tmp = _prepare_out(out_dir, overwrite=overwrite)
    sources, report = [], {}
    try:
        for name, entry in meta.items():
            if not isinstance(entry, dict) or "annotation" not in entry:
                raise ValueError(f"{meta_path}: entry {name!r} needs 'annotation' (and 'root')")
            safe = re.sub(r"[^\w-]", "_", name)
            counts = convert(iter_records(_annotation_path(entry["annotation"], meta_path)), conversation_sample,
                             out_dir=tmp / safe, prefix="ivl", opts=Options(Path(entry.get("root", ".")), video),
                             shard_size=shard_size, workers=workers, desc=name)
            report[name] = counts
            if not counts.get("written"):
                log.warning("%s: no sample written; left out of sources.yaml", name)
                continue
            length = entry.get("length", counts["written"])
            source = {"name": safe, "path": str((out_dir / safe).resolve()),
                      "weight": float(length) * float(entry.get("repeat_time", 1.0))}
            if entry.get("max_dynamic_patch") is not None:
                source["max_tiles"] = int(entry["max_dynamic_patch"])
            sources.append(source)
        (tmp / "sources.yaml").write_text(yaml.safe_dump({"data": {"sources": sources}}, sort_keys=False))
        (tmp / SUMMARY).write_text(json.dumps(report, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit_out(tmp, out_dir)
    return {"sources": sources, "counts": report}


def _hf_rows(path: Path, *, split: str | None):
    try:
        import datasets
    except ImportError as exc:
        raise MissingExtra("the hf converter needs the datasets library: pip install 'vlmscale[hf]'") from exc
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
    else:
        files = sorted(path.rglob("*.parquet")) or sorted(path.rglob("*.arrow")) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"--data {path}: no .parquet or .arrow files (or a save_to_disk directory)")
        builder = "parquet" if files[0].suffix == ".parquet" else "arrow"
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files])
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        ds = ds[split or ("train" if "train" in ds else names[0])]
    for column, feature in ds.features.items():  # keep images as encoded bytes: no decode + re-encode
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.Sequence, list)):
            inner = feature.feature if isinstance(feature, datasets.Sequence) else feature[0]
            if isinstance(inner, datasets.Image):
                ds = ds.cast_column(column, datasets.Sequence(datasets.Image(decode=False)) if isinstance(feature, datasets.Sequence)
                                    else [datasets.Image(decode=False)])
    return ds


def convert_hf(data_path: str | Path, *, out_dir: str | Path, media_root: str | Path = ".", messages_column: str | None = None,
               images_column: str | None = None, videos_column: str | None = None, split: str | None = None,
               shard_size: int = 1000, workers: int = 1, overwrite: bool = False,
               video: FrameSampling = FrameSampling()) -> dict[str, int]:
    """A Hugging Face dataset on disk (parquet / arrow files, or a ``save_to_disk`` directory) with embedded
    images -> shards. Columns default to ``messages`` or ``conversations`` and ``images`` or ``image``."""
    ds = _hf_rows(Path(data_path), split=split)
    columns = set(ds.column_names)

    def pick(given: str | None, defaults: tuple[str, ...], what: str, required: bool) -> str | None:
        if given is not None:
            if given not in columns:
                raise ValueError(f"--{what}-column {given!r} is not a column of {data_path} ({sorted(columns)})")
            return given
        found = next((c for c in defaults if c in columns), None)
        if found is None and required:
            raise ValueError(f"{data_path}: no {'/'.join(defaults)} column; name it with --{what}-column "
                             f"(columns: {sorted(columns)})")
        return found

    msg = pick(messages_column, ("messages", "conversations"), "messages", True)
    img = pick(images_column, ("images", "image"), "images", False)
    vid = pick(videos_column, ("videos", "video"), "videos", False)

    def rows():
        for row in ds:
            rec = {"messages": row[msg]}
            if img and row.get(img) is not None:
                rec["images"] = row[img]
            if vid and row.get(vid) is not None:
                rec["videos"] = row[vid]
            if "id" in row:
                rec["id"] = row["id"]
            yield rec

    return convert(rows(), auto_sample, out_dir=out_dir, prefix="hf", opts=Options(Path(media_root), video),
                   shard_size=shard_size, workers=workers, overwrite=overwrite, total=len(ds), desc="hf")


# --- preference pairs -----------------------------------------------------------------------------

def _pair_fields(item: dict) -> dict:
    """RLHF-V keeps question/chosen/rejected in a ``text`` field (a JSON string); RLAIF-V at top level."""
    inner = item.get("text")
    if isinstance(inner, str) and inner.lstrip().startswith("{"):
        inner = json.loads(inner)
    return {**item, **inner} if isinstance(inner, dict) else item


def pair_sample(raw: dict, opts: Options) -> Sample:
    try:
        item = _pair_fields(raw)
    except json.JSONDecodeError as exc:
        raise Skip("bad_record", f"unreadable 'text': {exc}") from exc
    fields = [item.get(k) for k in ("question", "chosen", "rejected")]
    if not all(isinstance(f, str) and f.strip() for f in fields):
        raise Skip("missing_field", "question, chosen and rejected must be non-empty strings")
    question, chosen, rejected = fields
    if chosen == rejected:
        raise Skip("identical_answers", "chosen equals rejected")
    rel = item.get("image_path") or item.get("image")
    media = _Media(opts)
    if rel is not None:
        media.image(rel)
    if media.members and "<image>" not in question:
        question = "<image>\n" + question
    record = {"task": "preference", "messages": [{"role": "user", "content": question}], "chosen": chosen,
              "rejected": rejected}
    if "idx" in item or "id" in item:
        record = {"id": str(item.get("idx", item.get("id"))), **record}
    if media.members:
        record["images"] = list(media.members)
    for extra in ("ds_name", "origin_dataset"):
        if extra in item:
            record[extra] = item[extra]
    return record, media.members


def convert_preference(json_path: str | Path, *, image_root: str | Path, out_dir: str | Path, shard_size: int = 1000,
                       workers: int = 1, overwrite: bool = False, video: FrameSampling = FrameSampling()) -> dict[str, int]:
    """RLAIF-V / RLHF-V style JSON or JSONL -> preference shards (``vlmscale.data.preference``).

    Each record needs ``question``, ``chosen`` and ``rejected`` strings (top level, or inside ``text``
    as RLHF-V writes them) and an image file under ``image_root`` named by ``image_path`` or ``image``
    (none for a text-only pair). A ``<image>`` placeholder in the question places the image; without
    one the image goes first. Bad records are skipped, counted by reason and logged.
    """
    return convert(iter_records(json_path), pair_sample, out_dir=out_dir, prefix="pref", opts=Options(Path(image_root), video),
                   shard_size=shard_size, workers=workers, overwrite=overwrite, desc="preference")


def yes_no_pairs(shards: str | Path, *, out_dir: str | Path, shard_size: int = 5000) -> dict[str, int]:
    """Correctional preference pairs from yes/no questions in conversation shards.

    For each sample, its first assistant turn that is exactly "yes" or "no" becomes a pair: the
    conversation up to that question is the prompt, the answer is chosen and the opposite rejected
    (RLHF-V's hallucination probes as pairs; e.g. the demo's "Is there a ... in the image?" turns).
    The sample's images are copied along. Samples without such a turn are counted, not written.
    """
    from vlmscale.data.shards import ShardDataset

    data = ShardDataset(shards)
    writer = ShardWriter(out_dir, max_count=shard_size)
    counts: Counter = Counter()
    for i in range(len(data)):
        ref, members = data.read(i)
        try:
            record = json.loads(members["json"])
            messages = record["messages"]
        except (KeyError, ValueError, TypeError):
            counts["skipped/bad_record"] += 1
            continue
        turn = next((t for t, m in enumerate(messages) if t > 0 and isinstance(m, dict) and m.get("role") == "assistant"
                     and _text(m.get("content")).strip().lower() in ("yes", "no")), None)
        if turn is None:
            counts["skipped/no_yes_no_turn"] += 1
            continue
        answer = _text(messages[turn]["content"]).strip().lower()
        pair = {"id": f"{record.get('id', ref.key)}-yesno{turn}", "task": "preference", "messages": messages[:turn],
                "chosen": answer, "rejected": "no" if answer == "yes" else "yes"}
        if "images" in record:
            pair["images"] = record["images"]
        out = {k: v for k, v in members.items() if k != "json"}
        out["json"] = json.dumps(pair).encode()
        writer.write(f"{ref.key.replace('.', '_')}yesno{turn}", out)
        counts["written"] += 1
        counts[f"chosen/{answer}"] += 1
    writer.close()
    return dict(counts)


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""
