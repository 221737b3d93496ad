"""A deterministic weighted mixture addressable by global position.

Position ``p`` of the training stream maps to (source, item) as a pure function of the seed:
positions come in blocks whose per-source counts follow the weights exactly (largest
remainder), shuffled per block; within a source, items follow a fresh permutation each epoch.
So any rank can find sample ``p`` without reading the stream before it, resume is a single
integer, and the same positions give the same samples on any world size.
"""

from __future__ import annotations

import functools

import numpy as np

BLOCK = 1024


def _counts(weights: list[float], block: int) -> list[int]:
    total = sum(weights)
    exact = [w / total * block for w in weights]
    counts = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: block - sum(counts)]:
        counts[i] += 1
    return counts


class Mixture:
    def __init__(self, *, sizes: list[int], weights: list[float], seed: int, block: int = BLOCK):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("a mixture needs one weight per source")
        if any(n <= 0 for n in sizes):
            raise ValueError("every mixture source needs at least one sample")
        self.sizes, self.seed, self.block = list(sizes), seed, block
        self.counts = _counts(list(weights), block)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation): one per source

    @functools.lru_cache(maxsize=8)
    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        assign = np.repeat(np.arange(len(self.counts)), self.counts)
        np.random.default_rng([self.seed, 1, b]).shuffle(assign)
        rank = np.zeros(self.block, dtype=np.int64)
        seen = np.zeros(len(self.counts), dtype=np.int64)
        for i, s in enumerate(assign):
            rank[i] = seen[s]
            seen[s] += 1
        return assign, rank

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s item order of ``source``; only the latest epoch per source is kept (positions
        advance through epochs in order), stored as int32 where it fits: 4 bytes per sample."""
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng([self.seed, 2, source, epoch]).permutation(self.sizes[source])
            if self.sizes[source] < 2**31:
                perm = perm.astype(np.int32)
            self._perms[source] = cached = (epoch, perm)
        return cached[1]

    def locate(self, position: int) -> tuple[int, int]:
        """(source index, item index) of global stream position ``position``."""
        b, off = divmod(position, self.block)
        assign, rank = self._block(b)
        s = int(assign[off])
        k = b * self.counts[s] + int(rank[off])
        epoch, i = divmod(k, self.sizes[s])
        return s, int(self._perm(s, epoch)[i])

    def replacement(self, position: int, attempt: int, source: int) -> int:
        """The item that stands in for a bad sample: depends only on seed, position and attempt."""
        rng = np.random.default_rng([self.seed, 3, position, attempt])
        return int(rng.integers(self.sizes[source]))
