"""Data pipeline samples/s (one rank's loader, as training builds it) vs the rate training consumes them.

Reads the demo SFT mixture through the same ``TrainDataset`` + ``StepBatchSampler`` + collate the
recipe uses (rank 0 of 2), with 0 and with ``data.num_workers`` loader workers, and times
``--micro-batches`` micro-batches after the first. The consumption rate is one rank's samples per
second of training, from a vlmscale run's metrics (``--metrics``, e.g. the ``sft_throughput`` run), whose
``data_wait_fraction`` is also reported (the acceptance bar is < 5% of step time on the demo).

    PYTHONPATH=. nice -n 10 python benchmarks/data_pipeline.py --metrics /tmp/vlmscale-bench-sft/vlmscale/metrics.jsonl

Prints a table and writes ``benchmarks/results/data_pipeline.json``. While training runs, the loader
shares the CPU with it, so the rate here is an upper bound of what it delivers then.

``--photos N`` also times one loader worker (one process) on real-size photos: N JPEGs of 1-4k px
made here, rendered at 448-px tiles with up to 12 tiles (InternVL's layout) as uint8 tiles, the way
training's workers produce them, with and without ``Image.draft``; samples/s per worker tells how
many ``data.num_workers`` a GPU node needs.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from vlmscale.config import SFTConfig, load_config
from vlmscale.data.dataset import StepBatchSampler, TrainDataset, collate, open_sources
from vlmscale.model.build import preset_assets

REPO = Path(__file__).resolve().parents[1]


def loader_rate(cfg, *, num_workers: int, micro_batches: int) -> float:
    assets = preset_assets(cfg.model.preset, max_tiles=cfg.data.max_tiles)
    dataset = TrainDataset(sources=open_sources(cfg.data), names=[s.name or s.path for s in cfg.data.sources],
                           weights=cfg.data.mixture_weights(), assets=assets, max_seq_len=cfg.data.max_seq_len,
                           seed=cfg.train.seed, video=cfg.data.video)
    sampler = StepBatchSampler(rank=0, world_size=2, micro_batch_size=cfg.train.micro_batch_size, grad_accum_steps=1,
                               start_step=0, max_steps=micro_batches + 1)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         collate_fn=functools.partial(collate, pad_id=assets.tokenizer.pad_token_id),
                                         prefetch_factor=4 if num_workers else None)
    it = iter(loader)
    next(it)  # worker start-up
    t0, samples = time.perf_counter(), 0
    for b in it:
        samples += len(b["sample_ids"])
    return samples / (time.perf_counter() - t0)


def make_photos(n: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (smooth gradients + blocky noise, quality 90) of 1000-4000 px on the long side."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        long = int(rng.integers(1000, 4001))
        short = int(long * rng.choice([0.5, 0.5625, 0.75, 1.0]))
        w, h = (long, short) if i % 3 else (short, long)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
        noise = rng.normal(0, 14, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32).repeat(8, 0).repeat(8, 1)[:h, :w]
        buf = io.BytesIO()
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def photo_rate(photos: list[bytes], *, draft: bool) -> dict:
    """Samples/s of one process rendering single-photo samples at 448-px tiles, 12 tiles, uint8 out."""
    import dataclasses

    from vlmscale.data import render
    from vlmscale.model.tokenizer import make_image_processor

    assets = dataclasses.replace(preset_assets("demo", max_tiles=12),
                                 image_processor=make_image_processor(image_size=448, max_tiles=12), image_seq_length=256)
    options = render.ImageOptions(max_tiles=12, raw=True)
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img0.jpg"},
                                                        {"type": "text", "text": "Describe the photo."}]},
                           {"role": "assistant", "content": "A gradient."}]}
    decode = render.decode_image
    if not draft:
        render.decode_image = lambda data, **kw: decode(data)
    try:
        t0, tiles = time.perf_counter(), 0
        for data in photos:
            out = render.render_sample(record, {"img0.jpg": data}, assets, max_seq_len=1 << 16, images=options)
            tiles += int(out.pixel_values.shape[0])
        seconds = time.perf_counter() - t0
    finally:
        render.decode_image = decode
    return {"samples_per_s": len(photos) / seconds, "tiles_per_sample": tiles / len(photos),
            "mb_per_sample_uint8": tiles * 3 * 448 * 448 / len(photos) / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--micro-batches", type=int, default=30)
    ap.add_argument("--metrics", default=None, help="a vlmscale run's metrics.jsonl (one row per step) for the consumption rate")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--photos", type=int, default=0, help="also time one worker on this many 1-4k px JPEGs (448-px tiles, 12 tiles)")
    args = ap.parse_args()
    cfg = load_config(SFTConfig, overrides=[])
    result = {"config": {"micro_batch": cfg.train.micro_batch_size, "num_workers": cfg.data.num_workers,
                         "micro_batches": args.micro_batches}, "loader_samples_per_s": {}}
    for workers in sorted({0, cfg.data.num_workers}) if args.micro_batches else []:  # --micro-batches 0: photos only
        result["loader_samples_per_s"][workers] = loader_rate(cfg, num_workers=workers, micro_batches=args.micro_batches)
    print(f"{'loader (rank 0 of 2)':<28} {'samples/s':>10}")
    for workers, rate in result["loader_samples_per_s"].items():
        print(f"{f'{workers} workers':<28} {rate:>10.1f}")
    if args.metrics:
        rows = [json.loads(x) for x in Path(args.metrics).read_text().splitlines() if x.strip()]
        rows = [r for r in rows if "tokens_per_s" in r][args.warmup:]
        seconds, samples, waits = 0.0, 0, []
        all_rows = [json.loads(x) for x in Path(args.metrics).read_text().splitlines() if x.strip()]
        prev = {r["step"]: r for r in all_rows if "tokens" in r}
        for r in rows:
            before = prev.get(r["step"] - 1, {"tokens": 0, "samples": 0})
            seconds += (r["tokens"] - before["tokens"]) / r["tokens_per_s"]
            samples += r["samples"] - before["samples"]
            waits.append(r["data_wait_fraction"])
        world = 2
        consumed = samples / seconds / world
        result["training_consumes_samples_per_s_per_rank"] = consumed
        result["data_wait_fraction_mean"] = sum(waits) / len(waits)
        result["data_wait_fraction_max"] = max(waits)
        best = max(result["loader_samples_per_s"].values())
        result["headroom"] = best / consumed
        print(f"{'training consumes (per rank)':<28} {consumed:>10.1f}")
        print(f"loader headroom {best / consumed:.1f}x; data wait {100 * result['data_wait_fraction_mean']:.2f}% of step time "
              f"(max {100 * result['data_wait_fraction_max']:.2f}%)")
    if args.photos:
        photos = make_photos(args.photos)
        result["photos"] = {"count": args.photos, "draft": photo_rate(photos, draft=True),
                            "no_draft": photo_rate(photos, draft=False)}
        for name in ("draft", "no_draft"):
            r = result["photos"][name]
            print(f"{'1 worker, photos, ' + name:<28} {r['samples_per_s']:>10.2f}  ({r['tiles_per_sample']:.1f} tiles/sample, "
                  f"{r['mb_per_sample_uint8']:.1f} MB uint8 per sample through IPC, 4x that as float32)")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "data_pipeline.json"
    if not args.micro_batches and path.is_file():  # photos only: keep the recorded loader figures
        result = {**json.loads(path.read_text()), "photos": result["photos"]}
    path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
