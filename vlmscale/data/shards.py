"""Webdataset ``.tar`` shards: writing, a persistent member index, and random access for reading.

Shards are ordinary webdataset tars (``<key>.json`` plus ``<key>.img0.png`` ...), so they work
with the webdataset library and its tools. For training we read samples by position: that makes
the data order a pure function of (seed, position), which is what exact resume, disjoint rank
sharding and world-size changes need.

Each shard's member offsets are indexed once into ``<shard>.idx.npy`` (one 22-byte row per tar
member: sample, suffix id, offset, size) and ``<shard>.keys.npy`` (sample keys, fixed width), with
``<shard>.idx.json`` recording the shard's size and mtime they were built from. They sit beside the
shard, or under ``$VLMSCALE_INDEX_CACHE`` (default ``~/.cache/vlmscale/index``) when the shard
directory is read-only. Readers memory-map them, so a rank holds no per-sample Python objects and
its loader workers share the same pages; a stale index (shard size or mtime changed) is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

log = logging.getLogger(__name__)
INDEX_VERSION = 1
MEMBER_DTYPE = np.dtype([("sample", "<u4"), ("suffix", "<u2"), ("offset", "<u8"), ("size", "<u8")])


class ShardWriter:
    """Write samples to ``dir/shard-%06d.tar``, ``max_count`` samples per shard."""

    def __init__(self, directory: str | Path, *, max_count: int = 2000, pattern: str = "shard-%06d.tar"):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._writer = wds.ShardWriter(str(directory / pattern), maxcount=max_count, verbose=0)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain '.' (webdataset splits keys at the first dot)")
        self._writer.write({"__key__": key, **members})

    def close(self) -> None:
        self._writer.close()


@dataclass(frozen=True)
class SampleRef:
    shard: str
    key: str
    members: dict[str, tuple[int, int]]  # member suffix -> (byte offset, size)


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    prefix = name[: len(name) - len(base)]
    key, _, suffix = base.partition(".")
    return prefix + key, suffix


def scan_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Walk one tar's headers: (members array, keys array, suffix names), samples in file order."""
    rows, keys, suffixes, suffix_ids = [], [], [], {}
    current = None
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, suffix = _split_name(info.name)
            if key != current:
                current = key
                keys.append(key.encode())
            if suffix not in suffix_ids:
                suffix_ids[suffix] = len(suffixes)
                suffixes.append(suffix)
            rows.append((len(keys) - 1, suffix_ids[suffix], info.offset_data, info.size))
    members = np.array(rows, dtype=MEMBER_DTYPE)
    width = max((len(k) for k in keys), default=1)
    return members, np.array(keys, dtype=f"S{width}"), suffixes


def index_cache_dir() -> Path:
    return Path(os.environ.get("VLMSCALE_INDEX_CACHE", Path.home() / ".cache" / "vlmscale" / "index"))


def _stat_key(shard: Path) -> dict:
    st = shard.stat()
    return {"version": INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _index_base(shard: Path) -> Path:
    """Where ``shard``'s index lives: beside it when that directory is writable (or already holds a
    valid index), else in the cache directory under a name derived from the shard's absolute path."""
    beside = shard.with_name(shard.name)
    if _valid(beside, shard) or os.access(shard.parent, os.W_OK):
        return beside
    digest = hashlib.sha1(str(shard.resolve()).encode()).hexdigest()[:16]
    return index_cache_dir() / f"{digest}-{shard.name}"


def _paths(base: Path) -> tuple[Path, Path, Path]:
    return (base.with_name(base.name + ".idx.npy"), base.with_name(base.name + ".keys.npy"),
            base.with_name(base.name + ".idx.json"))


def _valid(base: Path, shard: Path) -> bool:
    members, keys, meta = _paths(base)
    if not (members.is_file() and keys.is_file() and meta.is_file()):
        return False
    try:
        recorded = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in _stat_key(shard).items())


def _atomic_save(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def build_index(shard: str | Path, base: str | Path | None = None) -> dict:
    """Index one shard (atomic: readers never see a half-written index); returns its metadata."""
    shard = Path(shard)
    base = Path(base) if base is not None else _index_base(shard)
    base.parent.mkdir(parents=True, exist_ok=True)
    stat = _stat_key(shard)
    members, keys, suffixes = scan_shard(shard)
    digest = hashlib.sha256(members.tobytes() + keys.tobytes() + "\0".join(suffixes).encode()).hexdigest()[:16]
    meta = {**stat, "num_samples": len(keys), "suffixes": suffixes, "digest": digest}
    members_path, keys_path, meta_path = _paths(base)
    _atomic_save(members_path, lambda f: np.save(f, members))
    _atomic_save(keys_path, lambda f: np.save(f, keys))
    _atomic_save(meta_path, lambda f: f.write(json.dumps(meta).encode()))  # last: it marks the index valid
    return meta


@contextlib.contextmanager
def _locked(directory: Path):
    """One builder at a time per index directory (other ranks wait, then find the index valid)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".vlmscale-index.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_indexes(shards: list[Path], *, workers: int | None = None) -> list[Path]:
    """The index base of every shard, building missing or stale ones in parallel (``workers`` processes)."""
    bases = [_index_base(s) for s in shards]
    stale = [i for i, (b, s) in enumerate(zip(bases, shards)) if not _valid(b, s)]
    if not stale:
        return bases
    with _locked(bases[stale[0]].parent):
        stale = [i for i in stale if not _valid(bases[i], shards[i])]  # another process may have built them
        if stale:
            log.info("indexing %d of %d shards under %s", len(stale), len(shards), bases[stale[0]].parent)
            n = min(len(stale), workers or os.cpu_count() or 1)
            if n <= 1:
                for i in stale:
                    build_index(shards[i], bases[i])
            else:
                with ProcessPoolExecutor(n) as pool:
                    list(pool.map(build_index, [shards[i] for i in stale], [bases[i] for i in stale]))
    return bases


class ShardIndex:
    """One shard's memory-mapped index."""

    def __init__(self, shard: Path, base: Path):
        self._base = base
        members, keys, meta = _paths(base)
        self.shard = str(shard)
        self.meta = json.loads(meta.read_text())
        self.members = np.load(members, mmap_mode="r")
        self.keys = np.load(keys, mmap_mode="r")
        self.suffixes: list[str] = self.meta["suffixes"]

    def __reduce__(self):  # spawned loader workers map the files again instead of receiving copies
        return ShardIndex, (Path(self.shard), self._base)

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    def ref(self, i: int) -> SampleRef:
        column = self.members["sample"]
        lo, hi = np.searchsorted(column, i, side="left"), np.searchsorted(column, i, side="right")
        rows = self.members[lo:hi]
        members = {self.suffixes[int(r["suffix"])]: (int(r["offset"]), int(r["size"])) for r in rows}
        return SampleRef(self.shard, self.keys[i].decode(), members)


def index_shard(path: str | Path) -> list[SampleRef]:
    """Member offsets of one tar, grouped by sample key in file order (no index files written)."""
    members, keys, suffixes = scan_shard(path)
    out: dict[int, dict[str, tuple[int, int]]] = {}
    for r in members:
        out.setdefault(int(r["sample"]), {})[suffixes[int(r["suffix"])]] = (int(r["offset"]), int(r["size"]))
    return [SampleRef(str(path), keys[i].decode(), out.get(i, {})) for i in range(len(keys))]


def list_shards(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_file() and p.suffix == ".tar":
        return [p]
    if p.is_dir():
        shards = sorted(p.rglob("*.tar"))
        if shards:
            return shards
        raise ValueError(f"{p}: no .tar shards inside (create them with `vlmscale data convert` or the webdataset ShardWriter)")
    raise ValueError(f"data path {str(p)!r} does not exist")


class ShardDataset:
    """All samples of a directory of shards, addressable by index (through the persistent index)."""

    def __init__(self, path: str | Path, *, workers: int | None = None):
        self.path = str(path)
        shards = list_shards(path)
        bases = ensure_indexes(shards, workers=workers)
        self.shards = [ShardIndex(s, b) for s, b in zip(shards, bases)]
        self._ends = np.cumsum([len(s) for s in self.shards], dtype=np.int64)
        if not len(self):
            raise ValueError(f"{path}: the shards hold no samples")

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def digest(self) -> str:
        """Changes when any shard's content (as indexed) changes, or shards are added or removed."""
        parts = [f"{Path(s.shard).name}:{s.meta['digest']}" for s in self.shards]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def ref(self, index: int) -> SampleRef:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        s = int(np.searchsorted(self._ends, index, side="right"))
        first = int(self._ends[s - 1]) if s else 0
        return self.shards[s].ref(index - first)

    def read(self, index: int, *, member_limit: int | None = None) -> tuple[SampleRef, dict[str, bytes]]:
        """Sample ``index``'s members; ``member_limit``: read at most that many bytes of each member other
        than the JSON (enough for an image header)."""
        ref = self.ref(index)
        out = {}
        with open(ref.shard, "rb") as f:
            for suffix, (offset, size) in ref.members.items():
                f.seek(offset)
                out[suffix] = f.read(size if member_limit is None or suffix == "json" else min(size, member_limit))
        return ref, out

    def record(self, index: int) -> dict:
        """The parsed JSON of sample ``index`` (raises ValueError if missing or malformed)."""
        ref, members = self.read(index)
        if "json" not in members:
            raise ValueError(f"{ref.shard}:{ref.key} has no .json member")
        return json.loads(members["json"])
