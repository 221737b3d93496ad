"""Sequence packing: several samples per row, each attending only to itself.

The buffer is one rank's micro-batch: the ``train.micro_batch_size`` positions that
:class:`~vlmscale.data.dataset.StepBatchSampler` gives it. Its rendered samples are placed by
first-fit decreasing into the fewest rows that ``data.max_seq_len`` allows, and the row length is then
shrunk to the smallest at which first-fit decreasing still fits them in that many rows, so the rows
come out about equally full instead of a last row padded out to the full length. The packing is a
pure function of the micro-batch, so what a rank trains at step ``t`` still depends only on
(seed, ``t``, rank): a resumed run needs no packer state.

Inside a row, each sample's ``position_ids`` restart at 0 (the padding tail is one more segment), and
the forward turns them into a block-diagonal causal mask (``vlmscale.model.forward``). The first label
of every sample is ignored: unpacked, nothing predicts a sample's first token; packed, the previous
sample's last token would.
"""

from __future__ import annotations

import math

import torch

from vlmscale.constants import IGNORE


def first_fit_decreasing(lengths: list[int], *, capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total length <= ``capacity``.

    Longest first (ties by index), each into the first bin with room; bins keep their items in
    placement order. Deterministic.
    """
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a row of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def plan_rows(lengths: list[int], *, max_len: int) -> list[list[int]]:
    """Rows for one buffer: as few as first-fit decreasing needs at ``max_len``, each as short as possible.

    The row count is fixed by FFD at ``max_len``; the capacity is then bisected down towards
    ``ceil(total / rows)`` keeping only capacities at which FFD still needs no more rows.
    """
    rows = len(first_fit_decreasing(lengths, capacity=max_len))
    lo = max(max(lengths), math.ceil(sum(lengths) / rows)) - 1  # infeasible or unknown
    hi = max_len  # feasible
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(first_fit_decreasing(lengths, capacity=mid)) <= rows:
            hi = mid
        else:
            lo = mid
    return first_fit_decreasing(lengths, capacity=hi)


def packed_tensors(sequences: list[tuple[list[int], list[int]]], rows: list[list[int]], *,
                   pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``attention_mask`` (1 = real token) and ``position_ids`` for ``rows``
    of (input_ids, labels) sequences, right-padded to the longest row."""
    width = max(sum(len(sequences[i][0]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ids, lab = sequences[i]
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            labels[r, start:end] = torch.tensor(lab)
            labels[r, start] = IGNORE
            attention[r, start:end] = 1
            position_ids[r, start:end] = torch.arange(len(ids))
            start = end
        position_ids[r, start:] = torch.arange(width - start)  # the padding tail is its own segment
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "position_ids": position_ids}
