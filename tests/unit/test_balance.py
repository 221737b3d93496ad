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


# ---------------------------------------------------------------- costs from probes, the balanced sampler


def _image(w: int, h: int, fmt: str = "PNG", exif_rotate: bool = False) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), (90, 140, 200))
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated 90 degrees: width and height swap
        img.save(buf, format="JPEG", exif=exif.tobytes())
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def _probe_cases():
    from tests.unit.test_video import _clip

    one = lambda name, text="What is shown?": {"role": "user", "content": [{"type": "image", "image": name},  # noqa: E731
                                                                            {"type": "text", "text": text}]}
    answer = lambda text: {"role": "assistant", "content": [{"type": "text", "text": text}]}  # noqa: E731
    yield {"messages": [one("a.png"), answer("a red square")]}, {"a.png": _image(64, 64)}
    yield {"messages": [one("a.png"), answer("wide " * 40)]}, {"a.png": _image(900, 200)}  # multi-tile + thumbnail
    yield {"messages": [one("a.jpg"), answer("tall")]}, {"a.jpg": _image(300, 1200, "JPEG")}
    yield {"messages": [one("a.jpg"), answer("rotated")]}, {"a.jpg": _image(1200, 300, exif_rotate=True)}
    yield ({"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"},
                                                      {"type": "text", "text": "Compare."}]}, answer("the left one")]},
           {"a.png": _image(640, 320), "b.png": _image(100, 100)})
    yield {"messages": [{"role": "user", "content": "No image here."}, answer("text only " * 30)]}, {}
    yield _clip(16)


@pytest.mark.parametrize("case", range(7))
def test_probe_gives_the_render_sizes_without_pixels(demo_assets, case):
    from vlmscale.data.render import ImageOptions, probe_sample, render_sample

    record, members = list(_probe_cases())[case]
    for opts in (ImageOptions(max_tiles=6), ImageOptions(max_tiles=12, split_tiles=False), ImageOptions(max_tiles=1)):
        full = render_sample(record, members, demo_assets, max_seq_len=100_000, images=opts)
        probe = probe_sample(record, members, demo_assets, max_seq_len=100_000, images=opts)
        tiles = 0 if full.pixel_values is None else int(full.pixel_values.shape[0])
        assert (probe.tokens, probe.tiles, probe.supervised) == (len(full.input_ids), tiles, full.num_supervised)


def test_probe_reads_past_a_header_beyond_its_first_read(tmp_path, demo_assets):
    import json

    from vlmscale.data.dataset import TrainDataset
    from vlmscale.data.shards import ShardDataset, ShardWriter

    import io

    from PIL import Image

    buf = io.BytesIO()  # a JPEG whose size (SOF) comes after 200 KB of ICC profile: past the probe's first read
    Image.new("RGB", (1500, 700), (9, 9, 9)).save(buf, format="JPEG", icc_profile=b"\0" * 200_000)
    big = buf.getvalue()
    from vlmscale.data.dataset import PROBE_READ_BYTES
    from vlmscale.data.render import BadSample, probe_sample

    assert len(big) > 3 * PROBE_READ_BYTES
    with pytest.raises(BadSample):  # the first read alone does not hold the header
        probe_sample(json.loads(json.dumps(rec_for("a.png"))), {"a.png": big[:PROBE_READ_BYTES]}, demo_assets,
                     max_seq_len=4096)
    writer = ShardWriter(tmp_path / "s")
    rec = rec_for("a.png")
    writer.write("k0", {"json": json.dumps(rec).encode(), "a.png": big})
    writer.write("k1", {"json": b"{not json"})
    writer.close()
    ds = TrainDataset(sources=[ShardDataset(tmp_path / "s")], names=["s"], weights=[1.0], assets=demo_assets,
                      max_seq_len=4096, seed=0)
    probes = {}
    for position in range(8):
        source, index = ds.mixture.locate(position)
        probes[index] = ds.probe(position)
    full = render_sample_sizes(rec, {"a.png": big}, demo_assets)
    assert (probes[0].tokens, probes[0].tiles, probes[0].supervised) == full
    assert probes[1] is None  # bad JSON: cost 0, rendering counts the skip


def rec_for(name):
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": "Hi"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]}


def render_sample_sizes(record, members, assets):
    from vlmscale.data.render import render_sample

    r = render_sample(record, members, assets, max_seq_len=4096)
    return len(r.input_ids), int(r.pixel_values.shape[0]), r.num_supervised


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("world,accum,micro", [(1, 2, 4), (2, 2, 2), (4, 1, 2)])
def test_balanced_sampler_trains_each_position_once_per_step_and_resumes_exactly(world, accum, micro, packed):
    from vlmscale.data.dataset import BalancedStepBatchSampler

    rng = random.Random(1)
    G = world * accum * micro
    sizes = [(rng.choice([5000, 50, 60, 70]), rng.randint(0, 3), 10) for _ in range(10 * G)]

    def sampler(rank, start):
        s = BalancedStepBatchSampler(probe=sizes.__getitem__, mode="tokens", packed=packed, rank=rank,
                                     world_size=world, micro_batch_size=micro, grad_accum_steps=accum,
                                     start_step=start, max_steps=10)
        # one process plays every rank: the gather is each rank's share of the window, concatenated
        s.window_sizes = lambda step: sizes[step * G:(step + 1) * G]
        return s

    per_rank = [list(sampler(r, 0)) for r in range(world)]
    for step in range(10):
        batches = [b for r in range(world) for b in per_rank[r][step * accum:(step + 1) * accum]]
        assert sorted(p for b in batches for p in b) == list(range(step * G, (step + 1) * G))
        assert all(len(b) == micro for b in batches)
    for r in range(world):  # a run resumed at step 4 reads exactly what the uninterrupted run read from there
        assert list(sampler(r, 4)) == per_rank[r][4 * accum:]
    if world > 1 and packed:
        window = [float(t) for t, _, _ in sizes[:G]]
        layout = [[list(b) for b in per_rank[r][:accum]] for r in range(world)]
        assert imbalance(window, layout) <= imbalance(window, contiguous(world=world, accum=accum, micro=micro))


def test_unpacked_batches_group_similar_lengths_and_balance_padded_cost():
    from vlmscale.data.balance import assign_padded, padded_batch_cost

    rng = random.Random(3)
    worse = 0
    for _ in range(50):
        sizes = [(rng.choice([2000, 100, 120, 150, 300]), 0, 5) for _ in range(16)]
        layout = assign_padded(sizes, "tokens", world=2, accum=2, micro=4)
        assert sorted(i for r in layout for b in r for i in b) == list(range(16))
        per_rank = lambda lay: [sum(padded_batch_cost("tokens", [sizes[i] for i in b]) for b in r) for r in lay]  # noqa: E731
        got, before = per_rank(layout), per_rank(contiguous(world=2, accum=2, micro=4))
        assert sum(got) <= sum(before)  # grouping by length never pads more in total
        worse += max(got) > max(before)
    assert worse == 0  # and the busiest rank never carries more padded work than without balancing


def test_balance_is_validated_and_refused_for_pairs():
    from vlmscale.config import DPOConfig, SFTConfig, load_config
    from vlmscale.config.load import ConfigError

    assert load_config(SFTConfig).data.balance == "none"  # opt-in: docs/performance.md, "Balanced global batches"
    assert load_config(SFTConfig, overrides=["data.balance=flops"]).data.balance == "flops"
    with pytest.raises(ConfigError, match="data.balance='bogus'"):
        load_config(SFTConfig, overrides=["data.balance=bogus"])
    with pytest.raises(ConfigError, match="data.balance=tokens: preference"):
        load_config(DPOConfig, overrides=["data.balance=tokens"])


def test_swaps_never_widen_the_greedy_layout():
    from vlmscale.data import balance

    for seed in range(50):
        costs = _long_tailed(32, seed)
        refined = imbalance(costs, assign(costs, world=2, accum=2, micro=8))
        plain = balance._refine
        balance._refine = lambda *a, **k: None
        try:
            greedy = imbalance(costs, assign(costs, world=2, accum=2, micro=8))
        finally:
            balance._refine = plain
        assert refined <= greedy + 1e-12, seed
