from collections import Counter

import pytest

from vlmscale.data.dataset import StepBatchSampler
from vlmscale.data.mixture import Mixture


def test_same_seed_same_stream_other_seed_differs():
    a = Mixture(sizes=[50, 30, 20], weights=[2, 1, 1], seed=7)
    b = Mixture(sizes=[50, 30, 20], weights=[2, 1, 1], seed=7)
    c = Mixture(sizes=[50, 30, 20], weights=[2, 1, 1], seed=8)
    stream = [a.locate(p) for p in range(3000)]
    assert stream == [b.locate(p) for p in range(3000)]
    assert stream != [c.locate(p) for p in range(3000)]


def test_random_access_equals_sequential():
    m = Mixture(sizes=[13, 7], weights=[1, 3], seed=1)
    seq = [m.locate(p) for p in range(5000)]
    fresh = Mixture(sizes=[13, 7], weights=[1, 3], seed=1)
    for p in (4999, 0, 2500, 1024, 1023):
        assert fresh.locate(p) == seq[p]


def test_proportions_follow_weights_exactly_per_block():
    m = Mixture(sizes=[100, 100, 100], weights=[0.5, 0.3, 0.2], seed=0)
    counts = Counter(m.locate(p)[0] for p in range(1024 * 4))
    assert [counts[i] / (1024 * 4) for i in range(3)] == pytest.approx([0.5, 0.3, 0.2], abs=1e-3)


def test_each_epoch_visits_every_item_once():
    m = Mixture(sizes=[37, 11], weights=[1, 1], seed=3)
    per_source: dict[int, list[int]] = {0: [], 1: []}
    for p in range(2048):
        s, i = m.locate(p)
        per_source[s].append(i)
    for s, size in ((0, 37), (1, 11)):
        items = per_source[s]
        for e in range(len(items) // size):
            assert sorted(items[e * size:(e + 1) * size]) == list(range(size))


def test_ranks_read_disjoint_positions_covering_each_step():
    world, micro, accum, steps = 3, 2, 2, 4
    seen = []
    for rank in range(world):
        sampler = StepBatchSampler(rank=rank, world_size=world, micro_batch_size=micro, grad_accum_steps=accum,
                                   start_step=0, max_steps=steps)
        batches = list(sampler)
        assert len(batches) == steps * accum  # every rank runs the same number of micro-steps
        seen += [p for b in batches for p in b]
    assert sorted(seen) == list(range(steps * world * micro * accum))


def test_resume_sampler_continues_stream():
    full = list(StepBatchSampler(rank=1, world_size=2, micro_batch_size=2, grad_accum_steps=1, start_step=0, max_steps=6))
    tail = list(StepBatchSampler(rank=1, world_size=2, micro_batch_size=2, grad_accum_steps=1, start_step=4, max_steps=6))
    assert tail == full[4:]
