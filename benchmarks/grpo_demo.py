"""GRPO on the demo, from the demo SFT export: held-out accuracy before and after, and the reward curve.

    PYTHONPATH=. python benchmarks/grpo_demo.py --sft runs/sft-demo/hf --data data/demo [--steps 150] [--lr 5e-5]

1. ``vlmscale eval vqa,grounding,pope`` on the SFT export (the whole held-out split);
2. ``deepspeed --num_gpus 2 recipes/grpo.py`` from it: the recipe's defaults (VQA, grounding and multi-image
   prompts, exact-match + IoU rewards, G = 8) with ``--steps`` and ``--lr``; no in-run eval;
3. the same ``vlmscale eval`` on GRPO's export, and ``vlmscale eval compare``;
4. from the run's rollout log: per task, the share of groups with any reward variance (a group whose
   completions all score the same teaches nothing).

Writes ``benchmarks/results/grpo_demo.json`` and the reward curve ``docs/grpo_reward.png``. The whole run
(both evals included) should fit in 20 minutes on a 2-core CPU at the default step count.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
SUITES = "vqa,grounding,pope"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def evaluate(model: Path, data: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "vlmscale.cli", "eval", SUITES, "--model", str(model), "--data", str(data / "heldout"),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def grpo(sft: Path, data: Path, out: Path, *, steps: int, lr: float, port: int, extra: list[str]) -> None:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(REPO / "recipes" / "grpo.py"),
           f"model.init_from={sft}", f"data.demo_dir={data}", f"output_dir={out}", f"train.max_steps={steps}",
           f"optim.lr={lr}", "eval.at_end=false", "resume=never", *extra]
    with open(out.parent / f"{out.name}.log", "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"GRPO failed ({proc.returncode}); see {out.parent / f'{out.name}.log'}")


def variance_by_task(rollouts: Path) -> dict[str, dict[str, float]]:
    """Per task (from the sample id; VQA by its answer's kind), groups seen, share with any reward variance,
    mean reward."""
    from vlmscale.demo_vocab import COLOURS, COLUMNS, SHAPES

    kinds = {**{c: "colour" for c in COLOURS}, **{c: "position" for c in COLUMNS}, **{s: "shape" for s in SHAPES},
             "yes": "yes/no", "no": "yes/no"}
    seen, varied, reward = collections.Counter(), collections.Counter(), collections.defaultdict(float)
    for f in sorted(rollouts.glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            for g in json.loads(line)["groups"]:
                task = g["id"].split("-")[1] if g["id"].count("-") >= 2 else "?"
                if task == "vqa":
                    ref = str(g["reference"]).strip().lower()
                    task = "vqa/" + kinds.get(ref, "count" if ref.isdigit() else "other")
                r = g["rewards"]
                seen[task] += 1
                varied[task] += max(r) > min(r)
                reward[task] += sum(r) / len(r)
    return {t: {"groups": seen[t], "with_variance": varied[t] / seen[t], "mean_reward": reward[t] / seen[t]}
            for t in sorted(seen)}


def flat(result: dict, prefix: str = "") -> dict[str, float]:
    """``vlmscale eval``'s nested result as ``suite/split/metric`` -> value (numbers only)."""
    out: dict[str, float] = {}
    for k, v in result.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def plot(rows: list[dict], path: Path, window: int = 10, title: str = "GRPO on the demo") -> None:
    """Reward per step (grey) and its running mean over ``window`` steps (blue); PIL only."""
    from PIL import Image, ImageDraw

    steps = [r["step"] for r in rows]
    reward = [r["reward"] for r in rows]
    smooth = [sum(reward[max(0, i - window + 1):i + 1]) / len(reward[max(0, i - window + 1):i + 1])
              for i in range(len(reward))]
    w, h, pad = 640, 320, 44
    lo, hi = min(reward), max(reward)
    hi = hi if hi > lo else lo + 1e-6
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xy = lambda s, v: (pad + (w - 2 * pad) * (s - steps[0]) / max(steps[-1] - steps[0], 1),  # noqa: E731
                       h - pad - (h - 2 * pad) * (v - lo) / (hi - lo))
    d.line((pad, h - pad, w - pad, h - pad), fill="black")
    d.line((pad, pad, pad, h - pad), fill="black")
    d.line([xy(s, v) for s, v in zip(steps, reward)], fill=(180, 180, 180), width=1)
    d.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(40, 90, 200), width=3)
    d.text((pad, 10), f"{title}: mean reward per step (grey), {window}-step running mean (blue)", fill="black")
    d.text((4, pad - 6), f"{hi:.2f}", fill="black")
    d.text((4, h - pad - 6), f"{lo:.2f}", fill="black")
    d.text((pad, h - pad + 8), f"step {steps[0]}", fill="black")
    d.text((w - pad - 50, h - pad + 8), f"step {steps[-1]}", fill="black")
    img.save(path)


def main() -> int:
    from vlmscale.precision import cpu_bf16

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", type=Path, required=True, help="the demo SFT export (<output_dir>/hf)")
    ap.add_argument("--data", type=Path, required=True, help="the demo data directory")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "grpo-demo")
    ap.add_argument("--port", type=int, default=int(os.environ.get("MASTER_PORT", 29771)))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra override for recipes/grpo.py, e.g. grpo.temperature=0.7 (repeatable)")
    ap.add_argument("--name", default="grpo_demo",
                    help="results/<name>.json and the curve docs/<name>_reward.png (grpo_demo: docs/grpo_reward.png)")
    ap.add_argument("--report-only", action="store_true", help="tables and plot from an earlier run in --work")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.report_only:
        before, after = (json.loads((args.work / f).read_text()) for f in ("eval-sft.json", "eval-grpo.json"))
        t1 = t2 = t3 = t0
    else:
        before = evaluate(args.sft, args.data, args.work / "eval-sft.json")
        t1 = time.time()
        grpo(args.sft.resolve(), args.data.resolve(), args.work / "run", steps=args.steps, lr=args.lr, port=args.port,
             extra=args.set)
        t2 = time.time()
        after = evaluate(args.work / "run" / "hf", args.data, args.work / "eval-grpo.json")
        t3 = time.time()
    before, after = flat(before), flat(after)
    rows = [json.loads(line) for line in (args.work / "run" / "metrics.jsonl").read_text().splitlines()
            if '"reward"' in line]
    plot(rows, REPO / "docs" / ("grpo_reward.png" if args.name == "grpo_demo" else f"{args.name}_reward.png"))
    keys = sorted(k for k in before if k.endswith(("/accuracy", "/acc@0.5", "/f1", "/yes_ratio")))
    print(f"CPU: {cpu_bf16()[1]}; {args.steps} GRPO steps, lr {args.lr}")
    print(f"{'metric':<36} {'SFT':>7} {'GRPO':>7} {'change':>7}")
    for k in keys:
        print(f"{k:<36} {before[k]:>7.3f} {after[k]:>7.3f} {after[k] - before[k]:>+7.3f}")
    by_task = variance_by_task(args.work / "run" / "rollouts")
    print("rollout groups per task: share with reward variance, mean reward")
    for t, v in by_task.items():
        print(f"  {t:<10} {v['groups']:>5} groups  {v['with_variance']:.2f}  {v['mean_reward']:.3f}")
    first, last = rows[:10], rows[-10:]
    timing = {"eval_sft_s": t1 - t0, "grpo_s": t2 - t1, "eval_grpo_s": t3 - t2, "total_s": t3 - t0}
    if args.report_only:  # the run's own wall times, from its log's first and last lines
        timing = json.loads((args.work / "timing.json").read_text()) if (args.work / "timing.json").is_file() else {}
    else:
        (args.work / "timing.json").write_text(json.dumps(timing))
    print(f"reward: first 10 steps {sum(r['reward'] for r in first) / len(first):.3f}, last 10 "
          f"{sum(r['reward'] for r in last) / len(last):.3f}; time {timing}")
    out = {"cpu": cpu_bf16()[1], "steps": args.steps, "lr": args.lr, "overrides": args.set, "before": {k: before[k] for k in keys},
           "after": {k: after[k] for k in keys}, "rollouts_by_task": by_task, "timing_s": timing,
           "reward_per_step": [r["reward"] for r in rows]}
    (REPO / "benchmarks" / "results" / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
