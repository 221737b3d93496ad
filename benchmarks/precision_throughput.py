"""Demo SFT tokens/s with train.precision=auto, fp32 and bf16, side by side on this machine (2 CPU ranks).

    PYTHONPATH=. python benchmarks/precision_throughput.py [--steps 40] [--out benchmarks/results/precision_throughput.json]

Each run is the README's first command shortened to ``--steps`` optimizer steps (no evaluation, no
export); the figure is tokens/s of the last logged window (the first window holds start-up). It
prints what ``auto`` picked and why, each precision's tokens/s and MFU, and auto's ratio to the faster
of fp32 and bf16 (issue #14's acceptance: at least 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(precision: str, *, steps: int, demo: Path, out: Path, port: int) -> dict:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           str(REPO / "recipes" / "sft.py"), f"output_dir={out}", f"data.demo_dir={demo}", f"train.precision={precision}",
           f"train.max_steps={steps}", f"train.log_every_steps={max(steps // 4, 1)}", "checkpoint.export=false",
           f"checkpoint.every_steps={steps * 10}", "eval.at_end=false", "eval.every_steps=0"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"{precision}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "tokens_per_s" in r]
    chosen = next((line.split("precision: ", 1)[1] for line in proc.stderr.splitlines() if "precision: " in line), "?")
    return {"precision": precision, "chosen": chosen, "tokens_per_s": rows[-1]["tokens_per_s"], "mfu": rows[-1]["mfu"],
            "loss": rows[-1]["loss"], "seconds": round(time.time() - t0, 1)}


def main() -> int:
    from vlmscale.data.demo import generate_demo
    from vlmscale.precision import cpu_bf16, cpu_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--demo", type=Path, help="an existing demo data dir (default: a fresh small one)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "precision_throughput.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="precision-bench-"))
    demo = args.demo
    if demo is None:
        demo = work / "demo"
        generate_demo(demo, num_train_scenes=600, num_heldout_scenes=8, seed=0)
    port = int(os.environ.get("MASTER_PORT", "29640"))
    results = [run(p, steps=args.steps, demo=demo, out=work / p, port=port + i) for i, p in enumerate(("auto", "fp32", "bf16"))]
    by = {r["precision"]: r for r in results}
    faster = max(by["fp32"]["tokens_per_s"], by["bf16"]["tokens_per_s"])
    ratio = by["auto"]["tokens_per_s"] / faster
    native, why = cpu_bf16()
    print(f"CPU: {cpu_model()} ({why})")
    print(f"{'precision':<10} {'tokens/s':>10} {'MFU':>7} {'loss':>7} {'wall s':>7}  chosen")
    for r in results:
        print(f"{r['precision']:<10} {r['tokens_per_s']:>10.0f} {r['mfu']:>7.1%} {r['loss']:>7.3f} {r['seconds']:>7.0f}  {r['chosen']}")
    print(f"auto / faster of fp32 and bf16: {ratio:.2f} (acceptance: >= 0.8); bf16 / fp32: "
          f"{by['bf16']['tokens_per_s'] / by['fp32']['tokens_per_s']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu_model(), "native_bf16": native, "why": why, "steps": args.steps,
                                    "runs": results, "auto_over_faster": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
