"""data.balance: LPT assignment of a step's window to ranks and micro-batches."""

from __future__ import annotations

import random

import pytest

from vlmscale.data.balance import assign, contiguous, imbalance, sample_cost


def _long_tailed(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.choice([4096.0, 3000.0]) if rng.random() < 0.1 else float(rng.randint(100, 600)) for _ in range(n)]


@pytest.mark.parametrize("world,accum,micro", [(2, 1, 8), (2, 2, 4), (4, 2, 2), (1, 4, 4)])
def test_every_sample_once_and_full_micro_batches(world, accum, micro):
    costs = _long_tailed(world * accum * micro, 0)
    layout = assign(costs, world=world, accum=accum, micro=micro)
    flat = sorted(i for rank in layout for mb in rank for i in mb)
    assert flat == list(range(len(costs)))
    assert len(layout) == world and all(len(rank) == accum for rank in layout)
    assert all(len(mb) == micro for rank in layout for mb in rank)


def test_deterministic_and_balanced_on_a_long_tail():
    worst_before, worst_after = 0.0, 0.0
    for seed in range(20):
        costs = _long_tailed(32, seed)
        layout = assign(costs, world=2, accum=2, micro=8)
        assert layout == assign(list(costs), world=2, accum=2, micro=8)
        worst_before = max(worst_before, imbalance(costs, contiguous(world=2, accum=2, micro=8)))
        worst_after = max(worst_after, imbalance(costs, layout))
    assert worst_after <= 1.10 < worst_before


def test_contiguous_is_the_step_sampler_layout():
    from vlmscale.data.dataset import StepBatchSampler

    world, accum, micro = 2, 3, 2
    for rank in range(world):
        got = list(StepBatchSampler(rank=rank, world_size=world, micro_batch_size=micro, grad_accum_steps=accum,
                                    start_step=0, max_steps=1))
        assert got == contiguous(world=world, accum=accum, micro=micro)[rank]


def test_cost_modes_name_the_field():
    assert sample_cost("tokens", tokens=10, tiles=3, supervised=4) == 10.0
    with pytest.raises(ValueError, match="data.balance"):
        sample_cost("bogus", tokens=1, tiles=0, supervised=0)
    with pytest.raises(ValueError, match="data.balance=flops"):
        sample_cost("flops", tokens=1, tiles=0, supervised=0)
