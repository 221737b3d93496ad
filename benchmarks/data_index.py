"""The persistent shard index at scale: a rank's memory per sample and its start-up time.

Writes two text-only datasets of 100 shards each (``--small`` and ``--large`` samples, default 2k and
200k), indexes them once, then "relaunches" each in a fresh process the way a rank starts: open the
sources (memory-mapping the index), build the ``TrainDataset`` mixture and render the first
``--reads`` positions. It reports each process's peak RSS and start-up time and the two acceptance
figures: peak RSS per sample above the small run (bar: <= 100 bytes) and the large relaunch's start-up
time minus the small one's (bar: <= 10 s). Also the one-off parallel index build of the large set.

    PYTHONPATH=. python benchmarks/data_index.py [--large 200000] [--dir /tmp/vlmscale-index-bench]

Prints a table and writes ``benchmarks/results/data_index.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUM_SHARDS = 100

_LAUNCH = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from vlmscale.config import SFTConfig, load_config
from vlmscale.data.dataset import TrainDataset, open_sources
from vlmscale.model.build import preset_assets
path, reads = sys.argv[1], int(sys.argv[2])
imported = time.perf_counter()
cfg = load_config(SFTConfig, overrides=["model.preset=tiny", f"data.sources=[{{name: t, path: '{path}', weight: 1}}]"])
assets = preset_assets("tiny")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
sources = open_sources(cfg.data)
ds = TrainDataset(sources=sources, names=["t"], weights=[1.0], assets=assets, max_seq_len=512, seed=0)
ids = [ds[p].sample_id for p in range(reads)]
ready = time.perf_counter()
print(json.dumps({"samples": len(sources[0]), "start_s": ready - t1, "import_s": imported - t0,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rss_before_data_kib": base}))
"""


def write_text_shards(path: Path, n: int) -> float:
    from vlmscale.data.shards import ShardWriter

    t0 = time.perf_counter()
    per_shard = -(-n // NUM_SHARDS)
    w = ShardWriter(path, max_count=per_shard)
    for i in range(n):
        record = {"id": f"t{i}", "messages": [{"role": "user", "content": f"What is {i % 97} plus {i % 13}?"},
                                              {"role": "assistant", "content": str(i % 97 + i % 13)}]}
        w.write(f"s{i:09d}", {"json": json.dumps(record).encode()})
    w.close()
    return time.perf_counter() - t0


def launch(path: Path, reads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, str(path), str(reads)], capture_output=True, text=True,
                          cwd=REPO, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=2_000)
    ap.add_argument("--large", type=int, default=200_000)
    ap.add_argument("--reads", type=int, default=64, help="positions rendered after start-up")
    ap.add_argument("--dir", default="/tmp/vlmscale-index-bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated shards")
    args = ap.parse_args()
    from vlmscale.data.shards import ShardDataset

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    result = {"num_shards": NUM_SHARDS, "runs": {}}
    for name, n in (("small", args.small), ("large", args.large)):
        write_s = write_text_shards(root / name, n)
        t0 = time.perf_counter()
        ShardDataset(root / name)  # first launch: builds the index in parallel
        build_s = time.perf_counter() - t0
        launch(root / name, args.reads)  # warm the page cache like a relaunch on the same node
        run = launch(root / name, args.reads)
        run.update(write_s=write_s, index_build_s=build_s)
        result["runs"][name] = run
    small, large = result["runs"]["small"], result["runs"]["large"]
    extra = large["samples"] - small["samples"]
    result["peak_rss_bytes_per_sample_above_small"] = (large["peak_rss_kib"] - small["peak_rss_kib"]) * 1024 / extra
    result["relaunch_start_s_above_small"] = large["start_s"] - small["start_s"]
    index_bytes = sum(p.stat().st_size for p in (root / "large").glob("*.npy"))
    result["index_bytes_per_sample_on_disk"] = index_bytes / large["samples"]
    print(f"{'run':<8} {'samples':>9} {'index build s':>14} {'relaunch start s':>17} {'peak RSS MiB':>13}")
    for name, r in result["runs"].items():
        print(f"{name:<8} {r['samples']:>9} {r['index_build_s']:>14.2f} {r['start_s']:>17.2f} {r['peak_rss_kib'] / 1024:>13.1f}")
    print(f"peak RSS per sample above the small run: {result['peak_rss_bytes_per_sample_above_small']:.1f} bytes (bar 100)")
    print(f"relaunch start-up above the small run: {result['relaunch_start_s_above_small']:.2f} s (bar 10)")
    print(f"index on disk: {result['index_bytes_per_sample_on_disk']:.1f} bytes per sample")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_index.json").write_text(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
