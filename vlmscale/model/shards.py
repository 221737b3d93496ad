"""Safetensors weights written tensor by tensor into size-capped shards, as transformers lays them out.

One shard is buffered at a time, so whoever writes holds at most about ``max_bytes`` of weights: the
streaming export (``vlmscale.train.step.export_hf``) and the InternVL format conversion
(``vlmscale.model.internvl_chat``) both write through :class:`ShardWriter`. Reading goes through
:func:`hf_weights`, which names tensors as the in-memory InternVL model does whichever layout a
checkpoint was saved in.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). After its first large frees, glibc raises its mmap
    threshold and serves later shard-sized buffers from the heap, which it keeps: without this a streaming
    export's RSS grows by the model's size after all (``benchmarks/export_memory.py``)."""
    if sys.platform == "linux":
        ctypes.CDLL(None).malloc_trim(0)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], *, metadata: dict[str, str]) -> None:
    """The safetensors file format, written tensor by tensor from the tensors' own memory
    (``safetensors.torch.save_file`` first copies them all into one buffer, doubling a shard)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        size = tensor_bytes(t)
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


class ShardWriter:
    """Add tensors in order; each shard file holds at most ``max_bytes`` (a single larger tensor gets a
    shard of its own). ``close()`` names the shards ``model-0000i-of-0000n.safetensors`` and writes
    ``model.safetensors.index.json``, or writes ``model.safetensors`` alone when one shard suffices."""

    def __init__(self, out_dir: str | Path, *, max_bytes: int, metadata: dict[str, str] | None = None):
        if max_bytes < 1:
            raise ValueError(f"shard size must be positive, got {max_bytes}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        assert name not in self.buffer and not any(name in keys for _, keys in self.files), f"duplicate tensor {name}"
        size = tensor_bytes(tensor)
        if self.buffer and self.buffered + size > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self.buffered += size
        self.total += size

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.out / f"shard-{len(self.files):05d}.tmp"
        write_safetensors(path, self.buffer, metadata=self.metadata)
        self.files.append((path, list(self.buffer)))
        self.buffer, self.buffered = {}, 0
        release_freed_memory()

    def close(self) -> list[Path]:
        """Write the last shard and the index; the final file paths."""
        self.flush()
        if len(self.files) == 1:
            final = self.out / WEIGHTS_NAME
            self.files[0][0].rename(final)
            return [final]
        n = len(self.files)
        weight_map, paths = {}, []
        for i, (tmp, keys) in enumerate(self.files):
            final = self.out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(final)
            paths.append(final)
            weight_map.update({k: final.name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return paths


class LazyTensor:
    """One tensor of a safetensors file, read only when ``load()`` is called."""

    def __init__(self, file: Path, key: str):
        self.file, self.key = file, key

    def load(self) -> torch.Tensor:
        with safe_open(str(self.file), framework="pt") as f:
            return f.get_tensor(self.key)


def index_weights(path: str | Path) -> dict[str, LazyTensor]:
    """Every tensor of the ``*.safetensors`` files in ``path``, by its stored name (nothing read yet)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors weights found (only safetensors are loaded)")
    out: dict[str, LazyTensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                out[key] = LazyTensor(file, key)
    return out


# transformers saves InternVL in its original HF layout and loads either that or the module names
_HF_DISK_TO_MODULE = (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                      ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))


def disk_name(name: str) -> str:
    """A parameter name of ``InternVLForConditionalGeneration`` as transformers writes it to disk (the
    layout of OpenGVLab's ``*-hf`` releases, which inference tooling reads)."""
    for disk, module in _HF_DISK_TO_MODULE:
        if name.startswith(module):
            return disk + name[len(module):]
    raise ValueError(f"{name}: not a parameter of an InternVL model")


def hf_weights(path: str | Path) -> dict[str, LazyTensor]:
    """An HF-format InternVL checkpoint's tensors under the names of ``InternVLForConditionalGeneration``'s
    parameters (``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``)."""
    out = {}
    for key, value in index_weights(path).items():
        for disk, module in _HF_DISK_TO_MODULE:
            if key.startswith(disk):
                key = module + key[len(disk):]
                break
        out[key] = value
    return out
