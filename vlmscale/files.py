"""Durable file writes: fsync of files and directories, and atomic replacement (temp file + fsync + rename).

Used wherever a file must be either whole or absent after a crash: checkpoints and their commit markers,
the drift reference, the DPO reference cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory (deepest first), so names and data are durable."""
    dirs = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        dirs.extend(Path(dirpath) / d for d in dirnames)
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)


def atomic_write(path: Path, data: str | bytes | Any) -> None:
    """Write ``data`` (text, bytes, or an object for ``torch.save``) to ``path`` via temp file + fsync + rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(data, (str, bytes)):
        with open(tmp, "w" if isinstance(data, str) else "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    else:
        torch.save(data, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
