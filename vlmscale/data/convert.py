"""Converters from formats users already have into vlmscale shards."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from vlmscale.data.shards import ShardWriter

log = logging.getLogger(__name__)
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def _load_records(path: Path, what: str = "LLaVA samples") -> list[dict]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {what}")
    return data


def convert_llava(json_path: str | Path, *, image_root: str | Path, out_dir: str | Path,
                  shard_size: int = 1000) -> dict[str, int]:
    """LLaVA JSON/JSONL (``conversations`` with ``from: human/gpt``, ``<image>`` placeholders) -> shards.

    Text is kept as written, ``<image>`` placeholders included; each referenced image file becomes
    a member ``img<i>.<ext>`` listed in the sample's ``images``. Samples whose image files are
    missing or whose turns cannot be read are skipped and counted; placeholder/image mismatches
    are left for the loader, which skips and counts them at training time.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    writer = ShardWriter(out_dir, max_count=shard_size)
    counts: Counter = Counter()
    for n, item in enumerate(_load_records(json_path)):
        key = f"llava{n:09d}"
        turns = item.get("conversations")
        if not isinstance(turns, list) or not turns:
            counts["skipped/no_conversations"] += 1
            continue
        try:
            messages = [{"role": LLAVA_ROLES[t["from"]], "content": str(t["value"])} for t in turns]
        except (KeyError, TypeError):
            counts["skipped/bad_turn"] += 1
            continue
        images = item.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        members: dict[str, bytes] = {}
        names = []
        missing = False
        for i, rel in enumerate(images):
            src = image_root / rel
            if not src.is_file():
                log.warning("sample %s: image %s not found; skipped", item.get("id", n), src)
                missing = True
                break
            name = f"img{i}{src.suffix.lower() or '.jpg'}"
            members[name] = src.read_bytes()
            names.append(name)
        if missing:
            counts["skipped/missing_image"] += 1
            continue
        record = {"id": str(item.get("id", key)), "messages": messages}
        if names:
            record["images"] = names
        members["json"] = json.dumps(record).encode()
        writer.write(key, members)
        counts["written"] += 1
    writer.close()
    return dict(counts)


def _pair_fields(item: dict) -> dict:
    """RLHF-V keeps question/chosen/rejected in a ``text`` field (a JSON string); RLAIF-V at top level."""
    inner = item.get("text")
    if isinstance(inner, str) and inner.lstrip().startswith("{"):
        inner = json.loads(inner)
    return {**item, **inner} if isinstance(inner, dict) else item


def convert_preference(json_path: str | Path, *, image_root: str | Path, out_dir: str | Path,
                       shard_size: int = 1000) -> dict[str, int]:
    """RLAIF-V / RLHF-V style JSON or JSONL -> preference shards (``vlmscale.data.preference``).

    Each record needs ``question``, ``chosen`` and ``rejected`` strings (top level, or inside ``text``
    as RLHF-V writes them) and an image file under ``image_root`` named by ``image_path`` or ``image``
    (none for a text-only pair). A ``<image>`` placeholder in the question places the image; without
    one the image goes first. Bad records are skipped, counted by reason and logged.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    writer = ShardWriter(out_dir, max_count=shard_size)
    counts: Counter = Counter()
    for n, raw in enumerate(_load_records(json_path, "preference records")):
        key = f"pref{n:09d}"
        try:
            item = _pair_fields(raw) if isinstance(raw, dict) else None
        except json.JSONDecodeError:
            item = None
        if item is None:
            log.warning("record %d: not an object (or unreadable 'text'); skipped", n)
            counts["skipped/bad_record"] += 1
            continue
        fields = [item.get(k) for k in ("question", "chosen", "rejected")]
        if not all(isinstance(f, str) and f.strip() for f in fields):
            log.warning("record %s: question, chosen and rejected must be non-empty strings; skipped", item.get("idx", n))
            counts["skipped/missing_field"] += 1
            continue
        question, chosen, rejected = fields
        if chosen == rejected:
            log.warning("record %s: chosen equals rejected; skipped", item.get("idx", n))
            counts["skipped/identical_answers"] += 1
            continue
        rel = item.get("image_path") or item.get("image")
        members: dict[str, bytes] = {}
        if rel is not None:
            src = image_root / str(rel) if isinstance(rel, str) else None
            if src is None or not src.is_file():
                log.warning("record %s: image %s not found; skipped", item.get("idx", n), src or rel)
                counts["skipped/missing_image"] += 1
                continue
            members["img0" + (src.suffix.lower() or ".jpg")] = src.read_bytes()
        if members and "<image>" not in question:
            question = "<image>\n" + question
        record = {"id": str(item.get("idx", item.get("id", key))), "task": "preference",
                  "messages": [{"role": "user", "content": question}], "chosen": chosen, "rejected": rejected}
        if members:
            record["images"] = list(members)
        for extra in ("ds_name", "origin_dataset"):
            if extra in item:
                record[extra] = item[extra]
        members["json"] = json.dumps(record).encode()
        writer.write(key, members)
        counts["written"] += 1
    writer.close()
    return dict(counts)
