"""The lock-step dealing every collective evaluation loop shares (vlmscale.distributed.group.dealt_rounds)."""

from vlmscale.distributed.group import dealt_rounds


def test_every_item_dealt_once_and_rounds_equal_on_every_rank():
    for n in range(0, 12):
        for world in (1, 2, 3, 4):
            per_rank = [dealt_rounds(n, rank=r, world_size=world) for r in range(world)]
            assert len({len(d) for d in per_rank}) == 1  # the same number of rounds on every rank
            got = sorted(i for d in per_rank for i in d if i is not None)
            assert got == list(range(n))
            for d in per_rank:  # placeholders only at the end
                assert all(i is None for i in d[d.index(None):]) if None in d else True


def test_round_robin_order():
    assert dealt_rounds(5, rank=0, world_size=2) == [0, 2, 4]
    assert dealt_rounds(5, rank=1, world_size=2) == [1, 3, None]
    assert dealt_rounds(0, rank=0, world_size=2) == []
