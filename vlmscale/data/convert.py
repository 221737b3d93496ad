"""Converters from formats users already have into vlmscale shards."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from vlmscale.data.shards import ShardWriter

log = logging.getLogger(__name__)
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def _load_records(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA samples")
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
