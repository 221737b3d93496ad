"""Webdataset ``.tar`` shards: writing, and indexed random access for reading.

Shards are ordinary webdataset tars (``<key>.json`` plus ``<key>.img0.png`` ...), so they work
with the webdataset library and its tools. For training we index each shard's member offsets
once and read samples by position: that makes the data order a pure function of (seed,
position), which is what exact resume, disjoint rank sharding and world-size changes need.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds


class ShardWriter:
    """Write samples to ``dir/shard-%06d.tar``, ``max_count`` samples per shard."""

    def __init__(self, directory: str | Path, *, max_count: int = 2000):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._writer = wds.ShardWriter(str(directory / "shard-%06d.tar"), maxcount=max_count, verbose=0)

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


def index_shard(path: str | Path) -> list[SampleRef]:
    """Member offsets of one tar, grouped by sample key in file order."""
    refs: list[SampleRef] = []
    current_key, members = None, {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, suffix = _split_name(info.name)
            if key != current_key:
                if current_key is not None:
                    refs.append(SampleRef(str(path), current_key, members))
                current_key, members = key, {}
            members[suffix] = (info.offset_data, info.size)
    if current_key is not None:
        refs.append(SampleRef(str(path), current_key, members))
    return refs


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
    """All samples of a directory of shards, addressable by index."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.refs: list[SampleRef] = []
        for shard in list_shards(path):
            self.refs.extend(index_shard(shard))
        if not self.refs:
            raise ValueError(f"{path}: the shards hold no samples")

    def __len__(self) -> int:
        return len(self.refs)

    def read(self, index: int) -> tuple[SampleRef, dict[str, bytes]]:
        ref = self.refs[index]
        out = {}
        with open(ref.shard, "rb") as f:
            for suffix, (offset, size) in ref.members.items():
                f.seek(offset)
                out[suffix] = f.read(size)
        return ref, out

    def record(self, index: int) -> dict:
        """The parsed JSON of sample ``index`` (raises ValueError if missing or malformed)."""
        ref, members = self.read(index)
        if "json" not in members:
            raise ValueError(f"{ref.shard}:{ref.key} has no .json member")
        return json.loads(members["json"])
