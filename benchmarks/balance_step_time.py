"""data.balance on a long-tailed mix, measured: step time and per-rank imbalance, none vs tokens vs flops,
2 CPU ranks under ZeRO-3, in one run.

The mix (written as shards here, from a fixed seed; demo tokenizer and preset): 85% short samples
(5-30 answer words, a 1- or 2-tile image or none), 10% long answers (250-400 words, one tile), 5%
many-tile images (a wide image cut into 6 tiles + thumbnail, short answer). Every mode trains the same
positions in the same steps; only their placement on ranks and micro-batches differs.

Figures per mode, over the steps after ``--warmup``: wall time per step (the run's own ``step_time_s``),
``rank_flops_imbalance`` (the busiest rank's FLOPs over the mean, from the FLOP model, on the batches
each rank actually trained) and ``rank_busy_imbalance`` (the same for measured process CPU time per
rank: on CPU, time waiting at a collective costs none).

    PYTHONPATH=. python benchmarks/balance_step_time.py [--steps 30] [--warmup 5] [--micro 4] [--accum 2]

Both micro-batch forms run: packed (``data.packing=true``: cost adds up over samples, so LPT spreads them)
and padded (every row padded to the longest: similar lengths are grouped, then micro-batches balanced).

Prints a table and writes ``benchmarks/results/balance_step_time.json``. ``MASTER_PORT`` moves the ports.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
PORT = int(os.environ.get("MASTER_PORT", 29741))
MODES = ("none", "tokens", "flops")


def _png(w: int, h: int, rng: random.Random) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_mix(out: Path, n: int, seed: int = 0) -> dict:
    from vlmscale.data.shards import ShardWriter
    from vlmscale.demo_vocab import COLOURS, SHAPES, WORDS

    vocab = list(COLOURS) + list(SHAPES) + list(WORDS)
    rng = random.Random(seed)
    writer = ShardWriter(out, max_count=500)
    kinds = {"short": 0, "long": 0, "many_tiles": 0}
    for i in range(n):
        u = rng.random()
        kind = "long" if u < 0.10 else "many_tiles" if u < 0.15 else "short"
        kinds[kind] += 1
        words = rng.randint(250, 400) if kind == "long" else rng.randint(5, 30)
        answer = " ".join(rng.choice(vocab) for _ in range(words))
        members, content = {}, []
        if kind == "many_tiles":
            members["img.png"] = _png(48 * 6, 48, rng)  # 6 x 1 grid + thumbnail
        elif kind == "long" or rng.random() < 0.8:
            members["img.png"] = _png(48 * rng.choice([1, 2]), 48, rng)  # 1 tile, or 2 + thumbnail
        if members:
            content.append({"type": "image", "image": "img.png"})
        content.append({"type": "text", "text": "Describe it."})
        record = {"id": f"lt-{i}", "messages": [{"role": "user", "content": content},
                                                  {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
        writer.write(f"lt{i:06d}", {"json": json.dumps(record).encode(), **members})
    writer.close()
    return kinds


def run(mode: str, packing: bool, data: Path, work: Path, *, steps: int, micro: int, accum: int, port: int) -> list[dict]:
    name = f"{mode}-{'packed' if packing else 'padded'}"
    out = work / name
    config = work / f"{name}.yaml"
    config.write_text(json.dumps({"data": {"sources": [{"name": "longtail", "path": str(data), "weight": 1.0}]}}))
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(REPO / "recipes" / "sft.py"),
           "--config", str(config), f"output_dir={out}", "model.preset=demo", f"data.balance={mode}",
           "data.max_seq_len=2048", f"train.max_steps={steps}", f"train.micro_batch_size={micro}",
           f"train.grad_accum_steps={accum}", f"data.packing={str(packing).lower()}",
           "train.log_every_steps=1", "checkpoint.every_steps=100000", "checkpoint.export=false",
           "eval.at_end=false", "eval.every_steps=0", "resume=never", "data.num_workers=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(work / f"{name}.log", "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}); see {work / f'{name}.log'}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step_time_s"' in line]


def main() -> int:
    from vlmscale.precision import cpu_bf16

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "balance_step_time.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="balance-"))
    kinds = write_mix(work / "data", args.samples)
    results: dict[str, dict] = {}
    k = 0
    for packing in (True, False):
        for mode in MODES:
            t0 = time.time()
            rows = [r for r in run(mode, packing, work / "data", work, steps=args.steps, micro=args.micro,
                                   accum=args.accum, port=PORT + k) if r["step"] > args.warmup]
            k += 1
            results[f"{mode}, {'packed' if packing else 'padded'}"] = {
                "packing": packing, "balance": mode,
                "step_time_s": statistics.mean(r["step_time_s"] for r in rows),
                "rank_flops_imbalance": statistics.mean(r["rank_flops_imbalance"] for r in rows),
                "rank_busy_imbalance": statistics.mean(r["rank_busy_imbalance"] for r in rows),
                "rank_busy_s_max": statistics.mean(r["rank_busy_s_max"] for r in rows),
                "real_token_fraction": statistics.mean(r["real_token_fraction"] for r in rows),
                "loss_last": rows[-1]["loss"], "wall_s": time.time() - t0, "steps_timed": len(rows),
            }
    print(f"\n2 ranks, micro {args.micro} x accum {args.accum}, steps {args.warmup + 1}..{args.steps}; "
          f"mix {kinds} of {args.samples}")
    print(f"CPU: {cpu_bf16()[1]}")
    print(f"{'balance':>16} {'step s':>7} {'vs none':>8} {'FLOPs max/mean':>15} {'busy max/mean':>14} "
          f"{'busy max s':>11} {'real tokens':>12}")
    for name, r in results.items():
        base = results[f"none, {'packed' if r['packing'] else 'padded'}"]["step_time_s"]
        r["speedup_vs_none"] = base / r["step_time_s"]
        print(f"{name:>16} {r['step_time_s']:>7.3f} {r['speedup_vs_none']:>7.2f}x {r['rank_flops_imbalance']:>15.3f} "
              f"{r['rank_busy_imbalance']:>14.3f} {r['rank_busy_s_max']:>11.3f} {r['real_token_fraction']:>12.3f}")
    args.out.write_text(json.dumps({"cpu": cpu_bf16()[1], "world": 2, "micro": args.micro, "accum": args.accum,
                                    "steps": args.steps, "warmup": args.warmup, "mix": kinds, "results": results},
                                   indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
