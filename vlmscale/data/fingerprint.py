"""The data mixture a checkpoint was trained on, and the check that a resume still reads the same stream.

Position ``p`` of the stream maps to a sample through the sources, their sizes and contents, the
weights, the seed and (through skips) ``max_seq_len``. A checkpoint stores them as
``data_fingerprint.json``; resuming with a different one would continue a different stream, so the
launch stops with exit 2 and names what changed, before any process group starts.
``resume_allow_data_change=true`` resumes anyway (the positions continue from the checkpoint's).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlmscale.config.schema import DataConfig

log = logging.getLogger(__name__)
FINGERPRINT = "data_fingerprint.json"


def data_fingerprint(data: DataConfig, *, seed: int) -> dict:
    """Sources (name, path, sample count, index digest, normalised weight), seed and max_seq_len."""
    from vlmscale.data.dataset import open_sources

    datasets = open_sources(data)
    weights = data.mixture_weights()
    total = sum(weights)
    return {
        "seed": seed,
        "max_seq_len": data.max_seq_len,
        "sources": [{"name": s.name or s.path, "path": s.path, "samples": len(ds), "index": ds.digest,
                     "weight": round(w / total, 9)} for s, ds, w in zip(data.sources, datasets, weights)],
    }


def describe_changes(saved: dict, now: dict) -> list[str]:
    """Human-readable differences, empty when the two fingerprints match."""
    changes = [f"train.seed {saved['seed']} -> {now['seed']}"] if saved.get("seed") != now["seed"] else []
    if saved.get("max_seq_len") != now["max_seq_len"]:
        changes.append(f"data.max_seq_len {saved.get('max_seq_len')} -> {now['max_seq_len']}")
    old = {s["name"]: s for s in saved.get("sources", [])}
    new = {s["name"]: s for s in now["sources"]}
    changes += [f"source {n!r} removed" for n in old if n not in new]
    changes += [f"source {n!r} added" for n in new if n not in old]
    for name in (n for n in new if n in old):
        a, b = old[name], new[name]
        if a["weight"] != b["weight"]:
            changes.append(f"source {name!r} weight share {a['weight']:.4g} -> {b['weight']:.4g}")
        if a["samples"] != b["samples"]:
            changes.append(f"source {name!r} has {b['samples']} samples, was {a['samples']}")
        elif a["index"] != b["index"]:
            changes.append(f"source {name!r} shards changed (index digest {a['index']} -> {b['index']})")
        if a["path"] != b["path"] and a["index"] == b["index"]:
            log.info("source %r moved from %s to %s (same shards)", name, a["path"], b["path"])
    if not changes and [s["name"] for s in saved.get("sources", [])] != [s["name"] for s in now["sources"]]:
        changes.append("the sources are listed in another order")
    return changes


def read_fingerprint(checkpoint_dir: Path) -> dict | None:
    path = Path(checkpoint_dir) / FINGERPRINT
    return json.loads(path.read_text()) if path.is_file() else None


def check_resume_data(cfg, checkpoint_dir: Path) -> None:
    """Raise ``ConfigError`` if ``checkpoint_dir`` was trained on another mixture (unless allowed)."""
    from vlmscale.config import ConfigError

    saved = read_fingerprint(checkpoint_dir)
    if saved is None:
        log.warning("%s records no data fingerprint (saved before it existed); not checking the mixture", checkpoint_dir)
        return
    changes = describe_changes(saved, data_fingerprint(cfg.data, seed=cfg.train.seed))
    if not changes:
        return
    if cfg.resume_allow_data_change:
        log.warning("resuming %s with a changed data mixture (resume_allow_data_change=true): %s",
                    checkpoint_dir, "; ".join(changes))
        return
    raise ConfigError(f"{checkpoint_dir} was trained on another data mixture: {'; '.join(changes)}. The sample order "
                      "depends on it: restore the data settings, or set resume_allow_data_change=true to resume "
                      "with the new mixture")
