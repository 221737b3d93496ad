"""Balanced global batches: a step's window of samples assigned to ranks and micro-batches by cost.

A step reads the ``G = micro * accum * world`` positions ``[t*G, (t+1)*G)`` (``StepBatchSampler``).
Unbalanced, rank ``r``'s micro-batch ``m`` takes ``micro`` consecutive positions; with a long-tailed mix
(a few 4k-token answers or 12-tile images among short ones) one rank then carries most of the step's
compute while the others wait at the gradient all-reduce. :func:`assign` instead spreads the window by
estimated cost with deterministic greedy LPT (longest processing time first): samples in decreasing
cost (ties by window index) each go to the rank with the least cost so far that still has room for
``micro * accum`` samples; then, within each rank, the same to its ``accum`` micro-batches of ``micro``
samples. Each greedy pass is followed by swaps of one sample between the heaviest and the lightest bin
while a swap narrows their gap (the fixed sample count per bin leaves LPT up to one sample off). Every sample of the window is trained exactly once in that step, every micro-batch keeps
``micro`` samples, and the assignment is a pure function of the window's costs (so of its positions):
a resumed run, or one on another world size, trains the same samples in the same step.

That is for packed micro-batches (``data.packing=true``), whose cost is the sum of their samples'. An
unpacked micro-batch is padded to its longest row, so spreading long samples would pad every rank to them:
:func:`assign_padded` instead groups samples of similar length into micro-batches and balances those.

Costs (:func:`sample_cost`): ``tokens`` = the LLM sequence length (image tokens included); ``flops`` =
the sample's forward + backward FLOPs from :class:`vlmscale.train.flops.FlopModel` (LLM tokens,
attention's quadratic term, supervised positions for the head, and each vision tile's encoder FLOPs).
"""

from __future__ import annotations

from typing import Sequence

from vlmscale.config.schema import BALANCE_MODES


def _need(flop_model) -> None:
    if flop_model is None:
        raise ValueError("data.balance=flops needs the model's FlopModel (vlmscale.train.flops); use tokens")


def sample_cost(mode: str, *, tokens: int, tiles: int, supervised: int, flop_model=None) -> float:
    """Estimated compute of one sample under ``data.balance=mode``."""
    if mode == "tokens":
        return float(tokens)
    if mode == "flops":
        _need(flop_model)
        return flop_model.count(tiles=tiles, seq_lens=[tokens], head_tokens=supervised)["total"]
    raise ValueError(f"data.balance={mode!r}: expected one of {', '.join(BALANCE_MODES)}")


def _lpt(costs: Sequence[float], items: Sequence[int], *, bins: int, capacity: int) -> list[list[int]]:
    """``items`` into ``bins`` bins of exactly ``capacity`` items, greedily by decreasing cost; each bin's
    items come back in window order."""
    load = [0.0] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in sorted(items, key=lambda i: (-costs[i], i)):
        b = min((b for b in range(bins) if len(out[b]) < capacity), key=lambda b: (load[b], b))
        out[b].append(i)
        load[b] += costs[i]
    _refine(costs, out, load)
    return [sorted(b) for b in out]


def _refine(costs: Sequence[float], out: list[list[int]], load: list[float], rounds: int = 64) -> None:
    """Swap one item of the heaviest bin with one of the lightest while that lowers the heavier of the two
    (LPT alone leaves a gap of up to one item when every bin must take exactly ``capacity`` items)."""
    for _ in range(rounds):
        hi = max(range(len(out)), key=lambda b: (load[b], -b))
        lo = min(range(len(out)), key=lambda b: (load[b], b))
        gap = load[hi] - load[lo]
        best, pick = gap, None
        for a in out[hi]:
            for b in out[lo]:
                d = costs[a] - costs[b]
                if 0 < d < gap and abs(gap - 2 * d) < best:  # the two bins end |gap - 2d| apart
                    best, pick = abs(gap - 2 * d), (a, b)
        if pick is None:
            return
        a, b = pick
        out[hi][out[hi].index(a)], out[lo][out[lo].index(b)] = b, a
        d = costs[a] - costs[b]
        load[hi] -= d
        load[lo] += d


def assign(costs: Sequence[float], *, world: int, accum: int, micro: int) -> list[list[list[int]]]:
    """``out[rank][m]``: the window indices (0..G-1) of rank ``rank``'s micro-batch ``m``."""
    if len(costs) != world * accum * micro:
        raise ValueError(f"{len(costs)} costs for a window of {world} x {accum} x {micro} samples")
    ranks = _lpt(costs, range(len(costs)), bins=world, capacity=accum * micro)
    return [_lpt(costs, r, bins=accum, capacity=micro) for r in ranks]


def padded_batch_cost(mode: str, members: Sequence[tuple[int, int, int]], flop_model=None) -> float:
    """Compute of one unpacked micro-batch: every row is padded to its longest, and padding is computed too.
    ``members``: (tokens, tiles, supervised) per sample."""
    longest = max(t for t, _, _ in members)
    if mode == "tokens":
        return float(longest * len(members))
    _need(flop_model)
    return flop_model.count(tiles=sum(v for _, v, _ in members), seq_lens=[longest] * len(members),
                            head_tokens=sum(s for _, _, s in members))["total"]


def assign_padded(sizes: Sequence[tuple[int, int, int]], mode: str, *, world: int, accum: int, micro: int,
                  flop_model=None) -> list[list[list[int]]]:
    """:func:`assign` for unpacked micro-batches, whose cost is set by their longest row: the window sorted by
    length (ties by index) is cut into ``world * accum`` micro-batches of ``micro`` similar-length samples (the
    least padding), which then go to ranks by LPT on their padded cost, ``accum`` per rank."""
    if len(sizes) != world * accum * micro:
        raise ValueError(f"{len(sizes)} samples for a window of {world} x {accum} x {micro}")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0], i))
    batches = [sorted(order[b * micro:(b + 1) * micro]) for b in range(world * accum)]
    costs = [padded_batch_cost(mode, [sizes[i] for i in b], flop_model) for b in batches]
    ranks = _lpt(costs, range(len(batches)), bins=world, capacity=accum)
    return [[batches[b] for b in r] for r in ranks]


def contiguous(*, world: int, accum: int, micro: int) -> list[list[list[int]]]:
    """The unbalanced layout (``data.balance=none``): ``StepBatchSampler``'s consecutive positions."""
    return [[list(range((m * world + r) * micro, (m * world + r + 1) * micro)) for m in range(accum)]
            for r in range(world)]


def imbalance(costs: Sequence[float], layout: list[list[list[int]]]) -> float:
    """max / mean of the per-rank estimated cost (1.0 = perfectly even)."""
    per_rank = [sum(costs[i] for mb in rank for i in mb) for rank in layout]
    mean = sum(per_rank) / len(per_rank)
    return max(per_rank) / mean if mean > 0 else 1.0
