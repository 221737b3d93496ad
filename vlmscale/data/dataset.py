"""The training dataset: mixture positions -> rendered samples, with counted skips.

``TrainDataset[p]`` renders global stream position ``p``. A bad sample (corrupt or missing
image, placeholder mismatch, no assistant turn, too long, bad JSON) is logged, counted by
reason, and replaced by a stand-in chosen from (seed, position, attempt) only, so a run and its
resumption see the same data. ``StepBatchSampler`` gives each rank, and within it each loader
worker, a disjoint slice of every step's positions.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from vlmscale.config.schema import DataConfig, VideoConfig
from vlmscale.constants import IGNORE
from vlmscale.data.demo import ensure_demo
from vlmscale.data.mixture import Mixture
from vlmscale.data.packing import packed_tensors, plan_rows
from vlmscale.data.balance import assign, assign_padded, sample_cost
from vlmscale.data.render import BadSample, ImageOptions, Probe, Rendered, normalise_tiles, probe_sample, render_sample
from vlmscale.data.shards import ShardDataset
from vlmscale.model.tokenizer import ProcessorAssets

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 16
PROBE_READ_BYTES = 1 << 16  # of each image member: enough for its header (the whole member is read if not)
DEMO_PREFIX = "demo:"


def resolve_path(path: str, data: DataConfig) -> Path:
    """``demo:<split>/<task>`` -> the demo directory (generated on first use); else the path itself."""
    if path.startswith(DEMO_PREFIX):
        root = ensure_demo(data.demo_dir)
        return root / path[len(DEMO_PREFIX):]
    return Path(path)


def image_options(data: DataConfig, *, tile_limit: int | None, raw: bool = False) -> list[ImageOptions]:
    """Each source's tiling: its own ``max_tiles``, else the run's ``tile_limit`` (``RunConfig.tile_limit()``:
    ``data.max_tiles``, or None for the checkpoint's ``max_patches``); ``data.split_tiles``."""
    return [ImageOptions(max_tiles=s.max_tiles or tile_limit, split_tiles=data.split_tiles, raw=raw) for s in data.sources]


class NormalisingLoader:
    """Iterates a loader whose workers return uint8 tiles and normalises them here, in the main process:
    a quarter of the float32 bytes cross the worker boundary, and the values equal the processor's."""

    def __init__(self, loader: torch.utils.data.DataLoader, image_processor):
        self.loader, self.image_processor = loader, image_processor

    def __iter__(self):
        for batch in self.loader:
            pixels = batch.get("pixel_values")
            if pixels is not None and pixels.dtype == torch.uint8:
                batch["pixel_values"] = normalise_tiles(pixels, self.image_processor)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def open_sources(data: DataConfig) -> list[ShardDataset]:
    out = []
    for i, src in enumerate(data.sources):
        p = resolve_path(src.path, data)
        if not p.exists():
            raise ValueError(f"data.sources[{i}].path={src.path!r}: {p} does not exist")
        out.append(ShardDataset(p))
    return out


@dataclass
class Item:
    rendered: Rendered
    sample_id: str
    source: int
    skipped: list[str]


class TrainDataset(torch.utils.data.Dataset):
    def __init__(self, *, sources: list[ShardDataset], names: list[str], weights: list[float],
                 assets: ProcessorAssets, max_seq_len: int, seed: int, video: VideoConfig | None = None,
                 image_options: list[ImageOptions] | None = None):
        self.sources, self.names, self.assets = sources, names, assets
        self.max_seq_len = max_seq_len
        self.video = video
        self.image_options = image_options or [ImageOptions()] * len(sources)
        self.mixture = Mixture(sizes=[len(s) for s in sources], weights=weights, seed=seed)

    # record -> rendered sample; subclasses render other things from the same shards (PairDataset: pairs)
    render = staticmethod(render_sample)

    def __len__(self) -> int:  # the stream is unbounded; the sampler decides what is read
        return 2**62

    def _render(self, source: int, index: int) -> tuple[Rendered, str]:  # (or what ``render`` returns)
        ds = self.sources[source]
        try:
            ref, members = ds.read(index)
        except OSError as exc:
            raise BadSample("unreadable", str(exc)) from exc
        if "json" not in members:
            raise BadSample("bad_json", f"{ref.key}: no .json member")
        try:
            record = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadSample("bad_json", f"{ref.key}: {exc}") from exc
        if not isinstance(record, dict):
            raise BadSample("bad_json", f"{ref.key}: top level is not an object")
        sample_id = str(record.get("id", f"{Path(ref.shard).name}:{ref.key}"))
        try:
            return self.render(record, members, self.assets, max_seq_len=self.max_seq_len, video=self.video,
                               images=self.image_options[source]), sample_id
        except BadSample as exc:
            exc.detail = f"{sample_id}: {exc.detail}"
            raise
        except (KeyError, TypeError, AttributeError) as exc:
            raise BadSample("bad_schema", f"{sample_id}: {exc!r}") from exc

    # record -> its sizes without pixels (balancing); subclasses that render something else return None
    probe_record = staticmethod(probe_sample)

    def probe(self, position: int) -> Probe | None:
        """The sizes of the sample at ``position`` (the record as stored; None if it is bad), from its JSON
        and image headers only: what ``data.balance`` estimates a sample's cost from."""
        if self.probe_record is None:
            return None
        source, index = self.mixture.locate(position)
        try:
            for limit in (PROBE_READ_BYTES, None):  # the whole member only for a header beyond the first bytes
                _, members = self.sources[source].read(index, member_limit=limit)
                try:
                    return self.probe_record(json.loads(members["json"]), members, self.assets, max_seq_len=self.max_seq_len,
                                             video=self.video, images=self.image_options[source])
                except BadSample as exc:
                    if exc.reason != "corrupt_image" or limit is None:
                        raise
        except (BadSample, OSError, KeyError, TypeError, AttributeError, ValueError):
            return None  # rendering it will count the skip and pick the stand-in; its cost here is 0

    def __getitem__(self, position: int) -> Item:
        source, index = self.mixture.locate(position)
        skipped: list[str] = []
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                index = self.mixture.replacement(position, attempt, source)
            try:
                rendered, sample_id = self._render(source, index)
                return Item(rendered, sample_id, source, skipped)
            except BadSample as exc:
                log.warning("skipping sample (%s) at position %d of source %s: %s",
                            exc.reason, position, self.names[source], exc.detail)
                skipped.append(exc.reason)
        raise TooManyBadSamples(
            f"source {self.names[source]!r}: {MAX_ATTEMPTS} consecutive bad samples around position {position} "
            f"({', '.join(sorted(set(skipped)))}); check the data"
        )


class TooManyBadSamples(RuntimeError):
    """The share of unusable samples passed ``data.max_bad_fraction``."""


def check_bad_fraction(*, bad: int, read: int, data: DataConfig) -> None:
    """Raise on every rank alike (callers pass all-reduced counts, so no rank diverges)."""
    if read >= data.bad_check_after and bad > data.max_bad_fraction * read:
        raise TooManyBadSamples(
            f"{bad} of {read} samples read were unusable ({bad / read:.1%}), above "
            f"data.max_bad_fraction={data.max_bad_fraction}; the 'skipping sample' warnings give each reason"
        )


class StepBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of global positions for one rank, from ``start_step`` to ``max_steps``.

    Step ``t`` consumes positions ``[t*G, (t+1)*G)`` with ``G = micro * accum * world``; micro-batch
    ``m`` of rank ``r`` takes ``micro`` consecutive positions at ``t*G + (m*world + r)*micro``.
    """

    def __init__(self, *, rank: int, world_size: int, micro_batch_size: int, grad_accum_steps: int,
                 start_step: int, max_steps: int):
        self.rank, self.world = rank, world_size
        self.micro, self.accum = micro_batch_size, grad_accum_steps
        self.start_step, self.max_steps = start_step, max_steps

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            for m in range(self.accum):
                first = step * self.global_batch + (m * self.world + self.rank) * self.micro
                yield list(range(first, first + self.micro))

    def __len__(self) -> int:
        return (self.max_steps - self.start_step) * self.accum


class BalancedStepBatchSampler(StepBatchSampler):
    """:class:`StepBatchSampler`'s windows, assigned to ranks and micro-batches by estimated cost
    (``data.balance``, :mod:`vlmscale.data.balance`): by the sum of sample costs when micro-batches are
    packed, by padded micro-batch cost (similar lengths grouped) when they are not.

    Each rank probes its own ``micro * accum`` positions of the window (``probe``: position -> (tokens,
    tiles, supervised), zeros for a sample that will be skipped) and the sizes are all-gathered over
    ``group`` (a CPU process group), so a rank reads no more records than it trains on. The gather runs
    where the loader asks for the step's first micro-batch, which every rank does at the same point of its
    loop; the layout is a pure function of the window's positions.
    """

    def __init__(self, *, probe: Callable[[int], tuple[int, int, int]], mode: str, packed: bool, flop_model=None,
                 group=None, **kwargs):
        super().__init__(**kwargs)
        self.probe, self.mode, self.packed, self.flop_model, self.group = probe, mode, packed, flop_model, group

    def window_sizes(self, step: int) -> list[tuple[int, int, int]]:
        share = self.micro * self.accum
        first = step * self.global_batch + self.rank * share
        local = torch.tensor([self.probe(p) for p in range(first, first + share)], dtype=torch.long).reshape(share, 3)
        if self.world > 1:
            parts = [torch.empty_like(local) for _ in range(self.world)]
            torch.distributed.all_gather(parts, local, group=self.group)
            local = torch.cat(parts)
        return [tuple(row) for row in local.tolist()]

    def layout(self, step: int) -> list[list[list[int]]]:
        sizes = self.window_sizes(step)
        shape = dict(world=self.world, accum=self.accum, micro=self.micro)
        if not self.packed:
            return assign_padded(sizes, self.mode, flop_model=self.flop_model, **shape)
        costs = [sample_cost(self.mode, tokens=t, tiles=v, supervised=s, flop_model=self.flop_model) if t else 0.0
                 for t, v, s in sizes]
        return assign(costs, **shape)

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            layout = self.layout(step)
            base = step * self.global_batch
            for m in range(self.accum):
                yield [base + i for i in layout[self.rank][m]]


def probe_sizes(dataset: TrainDataset) -> Callable[[int], tuple[int, int, int]]:
    """``position -> (tokens, tiles, supervised)`` of the sample there ((0, 0, 0) for one that will be skipped)."""
    def sizes(position: int) -> tuple[int, int, int]:
        p = dataset.probe(position)
        return (0, 0, 0) if p is None else (p.tokens, p.tiles, p.supervised)
    return sizes


def _batch_extras(items: list[Item]) -> dict:
    """Tiles (in item order), sample ids and skip counts, shared by both collates."""
    tiles, pool = [], []
    for it in items:
        r = it.rendered
        if r.pixel_values is not None:
            tiles.append(r.pixel_values)
            pool.extend(r.tile_pool)
    skipped: dict[str, int] = {}
    for it in items:
        for reason in it.skipped:
            skipped[reason] = skipped.get(reason, 0) + 1
    return {
        "pixel_values": torch.cat(tiles) if tiles else None,
        "tile_pool": torch.tensor(pool, dtype=torch.long) if tiles else None,
        "sample_ids": [it.sample_id for it in items],
        "skipped": skipped,
        "num_read": len(items) + sum(skipped.values()),
    }


def collate(items: list[Item], *, pad_id: int) -> dict:
    """One sample per row, right-padded to the longest; ``position_ids`` is None (not packed)."""
    longest = max(len(it.rendered.input_ids) for it in items)
    n = len(items)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE, dtype=torch.long)
    attention = torch.zeros((n, longest), dtype=torch.long)
    for i, it in enumerate(items):
        r = it.rendered
        input_ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
        attention[i, : len(r.input_ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "position_ids": None,
            **_batch_extras(items)}


def pack_collate(items: list[Item], *, pad_id: int, max_len: int) -> dict:
    """The micro-batch packed into rows of at most ``max_len`` tokens (``vlmscale.data.packing``).

    Items are reordered row by row and the tiles (and ``sample_ids``) follow that order, so the image
    features still land in their own samples' ``<IMG_CONTEXT>`` slots. ``rows`` lists each row's item
    indices; ``position_ids`` restart at 0 for each sample.
    """
    rows = plan_rows([len(it.rendered.input_ids) for it in items], max_len=max_len)
    sequences = [(it.rendered.input_ids, it.rendered.labels) for it in items]
    placed = [items[i] for row in rows for i in row]
    return {**packed_tensors(sequences, rows, pad_id=pad_id), **_batch_extras(placed), "rows": rows}
