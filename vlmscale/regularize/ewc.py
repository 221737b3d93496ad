"""Elastic weight consolidation: the penalty, its files, and applying it to a ZeRO-3 partition.

EWC keeps parameters that mattered for an earlier task near their values after that task: it adds
``weight / 2 * sum F * (theta - theta_star) ** 2`` to the loss, with ``F`` the diagonal Fisher
information and ``theta_star`` the anchor weights (both written by ``vlmscale ewc fisher``, see
:mod:`vlmscale.regularize.fisher` and docs/forgetting.md).

Files: ``ewc.json`` (meta, and an index from parameter name to file) plus ``ewc-NNNNN.safetensors``
shards holding full fp32 tensors ``fisher.<name>`` and ``anchor.<name>``, where ``<name>`` is the
model's in-memory parameter name (``model.language_model.layers.0...``), the same whatever the
checkpoint layout the model was loaded from. Full tensors make the files independent of the world
size that wrote them.

Under ZeRO-3 every rank reads only its own slice of each tensor (the slice the optimizer holds for
that parameter, :func:`vlmscale.distributed.zero.local_range`), so F and theta_star cost each rank
1 / world of their total, like the fp32 master weights. Between the last backward of a step and
the optimizer update, :meth:`EWC.apply` adds the penalty's gradient to that rank's slice of the
reduced gradient, so gradient clipping and the optimizer see the sum.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmscale.distributed.zero import is_partitioned, local_fp32_param, local_grad, local_range, set_local_grad
from vlmscale.model.policy import module_of

log = logging.getLogger(__name__)
META = "ewc.json"
FORMAT = 1
PARAM_SETS = {"llm": ("llm",), "vision": ("vision",), "both": ("llm", "vision")}  # --params -> policy modules
SHARD_BYTES = 2 << 30  # F + theta_star per safetensors file


def protects(name: str, params: str) -> bool:
    """Whether parameter ``name`` belongs to the set ``params`` (llm | vision | both)."""
    return module_of(name) in PARAM_SETS[params]


# ---------------------------------------------------------------- the penalty (pure)


def ewc_penalty(theta: torch.Tensor, *, anchor: torch.Tensor, fisher: torch.Tensor,
                weight: float) -> tuple[float, torch.Tensor]:
    """``(weight / 2 * sum F * (theta - anchor)^2, its gradient weight * F * (theta - anchor))``."""
    diff = theta - anchor
    grad = weight * fisher * diff
    value = 0.5 * weight * float((fisher.double() * diff.double() ** 2).sum())
    return value, grad


# ---------------------------------------------------------------- files


def write_files(out_dir: str | Path, tensors, *, meta: dict) -> Path:
    """Write ``(name, fisher, anchor)`` triples (full tensors) as shards plus ``ewc.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[str] = []

    def flush():
        if shard:
            name = f"ewc-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name))
            files.append(name)
            for key in shard:
                if key.startswith("fisher."):
                    index[key[len("fisher."):]] = name
            shard.clear()

    size = 0
    for name, fisher, anchor in tensors:
        assert fisher.shape == anchor.shape, name
        shard[f"fisher.{name}"] = fisher.float().contiguous()
        shard[f"anchor.{name}"] = anchor.float().contiguous()
        shapes[name] = list(fisher.shape)
        size += 8 * fisher.numel()
        if size >= SHARD_BYTES:
            flush()
            size = 0
    flush()
    meta = {"format": FORMAT, **meta, "files": files, "index": index, "shapes": shapes}
    (out / META).write_text(json.dumps(meta, indent=2))
    return out


def read_meta(path: str | Path) -> dict:
    p = Path(path) / META
    if not p.is_file():
        raise ValueError(f"{p} does not exist: point at a directory written by `vlmscale ewc fisher`")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p}: format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def missing_files(path: str | Path) -> list[str]:
    """What a directory written by ``vlmscale ewc fisher`` lacks (empty when complete)."""
    p = Path(path)
    if not (p / META).is_file():
        return [META]
    files = json.loads((p / META).read_text()).get("files") or []
    if not files:
        return [f"ewc-*.safetensors ({META} lists none)"]
    return [f for f in files if not (p / f).is_file()]


def read_flat_range(f, key: str, start: int, stop: int) -> torch.Tensor:
    """Elements ``[start, stop)`` of the flattened tensor ``key`` in an open safetensors file.

    Reads only the rows (along the first dimension longer than one) that cover the range, so a
    rank never loads a whole tensor to keep its slice of it.
    """
    sl = f.get_slice(key)
    shape = sl.get_shape()
    if stop <= start:
        return torch.zeros(0)
    lead = next((d for d, n in enumerate(shape) if n > 1), None)
    if lead is None:  # a scalar or all-ones shape: a single element
        return f.get_tensor(key).reshape(-1)[start:stop]
    row = math.prod(shape[lead + 1:])
    r0, r1 = start // row, -(-stop // row)
    rows = sl[tuple([slice(0, 1)] * lead + [slice(r0, r1)])]
    return rows.reshape(-1)[start - r0 * row: stop - r0 * row]


# ---------------------------------------------------------------- the penalty on this rank's partition


@dataclass
class Protected:
    name: str
    param: torch.nn.Parameter
    fisher: torch.Tensor  # this rank's slice (fp32, padded like the optimizer's partition)
    anchor: torch.Tensor


class EWC:
    """F and theta_star for this rank's partition of every protected, trainable parameter."""

    def __init__(self, entries: list[Protected], *, weight: float):
        self.entries, self.weight = entries, weight

    @classmethod
    def load(cls, path: str | Path, model: torch.nn.Module, *, weight: float) -> "EWC":
        """Read this rank's slices (ZeRO-3 partitioned model, after the engine exists).

        Parameters the files protect but the stage freezes are skipped: they do not move.
        """
        meta = read_meta(path)
        params = dict(model.named_parameters())
        unknown = [n for n in meta["index"] if n not in params]
        if unknown:
            raise ValueError(f"regularizer.ewc.path={str(path)!r}: {len(unknown)} tensors match no parameter of this "
                             f"model (e.g. {unknown[:3]}); was the Fisher estimated for another model?")
        entries, frozen, files = [], 0, {}
        for name, file in meta["index"].items():
            p = params[name]
            if not p.requires_grad:
                frozen += 1
                continue
            if not is_partitioned(p):
                raise ValueError("regularizer.ewc needs ZeRO-3 (deepspeed.config with zero_optimization.stage 3)")
            if list(p.ds_shape) != meta["shapes"][name]:
                raise ValueError(f"regularizer.ewc.path: {name} has shape {meta['shapes'][name]} in the files "
                                 f"but {list(p.ds_shape)} in the model")
            if file not in files:
                files[file] = safe_open(str(Path(path) / file), framework="pt")
            start, size, real = local_range(p)
            fisher, anchor = torch.zeros(size), torch.zeros(size)
            fisher[:real] = read_flat_range(files[file], f"fisher.{name}", start, start + real)
            anchor[:real] = read_flat_range(files[file], f"anchor.{name}", start, start + real)
            where = local_fp32_param(p).device  # the master partition's device (CPU when the optimizer is offloaded)
            entries.append(Protected(name, p, fisher.to(where), anchor.to(where)))
        if not entries:
            raise ValueError(f"regularizer.ewc: none of the {len(meta['index'])} parameters in {path} is trainable in "
                             "this stage (check policy.*), so the penalty would do nothing")
        ewc = cls(entries, weight=weight)
        log.info("ewc: %d tensors protected (%d frozen in this stage, skipped), %s of %s elements of F and theta* on "
                 "this rank (%.1f MB), weight %g", len(entries), frozen, f"{ewc.local_numel():,}",
                 f"{ewc.total_numel():,}", 8 * ewc.local_numel() / 2**20, weight)
        return ewc

    def local_numel(self) -> int:
        """Elements of F held on this rank (theta_star holds as many)."""
        return sum(e.fisher.numel() for e in self.entries)

    def total_numel(self) -> int:
        return sum(e.param.ds_numel for e in self.entries)

    def apply(self) -> float:
        """Add the penalty gradient to this rank's reduced gradient; return this rank's penalty value.

        Call after the last backward of a step and before ``engine.step()``. The gradient there is
        the global mean-loss gradient (``train_step`` normalises for ranks and accumulation), and
        the penalty is added in the same units: the total objective is loss + penalty.
        """
        total = 0.0
        for e in self.entries:
            theta = local_fp32_param(e.param)
            value, grad = ewc_penalty(theta.detach(), anchor=e.anchor, fisher=e.fisher, weight=self.weight)
            set_local_grad(e.param, local_grad(e.param) + grad)
            total += value
        return total
