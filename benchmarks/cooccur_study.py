"""Hallucination on the co-occurrence demo: SFT learns the prior, then DPO and GRPO each try to undo it.

    PYTHONPATH=. python benchmarks/cooccur_study.py [--work runs/cooccur-study] [--grpo-steps 80] [--only sft,dpo,grpo]

1. ``vlmscale data demo --variant cooccur --out data/cooccur`` unless it is there (the configs read it there);
2. ``recipes/sft.py --config recipes/configs/sft_cooccur.yaml`` (the demo preset from scratch on the variant's
   captions and VQA, whose captions name an anchor's partner ~97% of the time);
3. from that export: ``recipes/dpo.py --config recipes/configs/dpo_cooccur.yaml`` (caption pairs: chosen = the
   true caption, rejected = the caption with the partner; dense weighting 5); ``dpo_cooccur_probe.yaml`` (yes/no
   pairs from ``train/probe`` by ``vlmscale data convert yes-no-pairs``: chosen = the true answer); and
   ``recipes/grpo.py --config recipes/configs/grpo_cooccur.yaml`` (yes/no exact match on ``train/probe``);
4. ``vlmscale eval pope`` on all three exports over the held-out scenes (each holds an anchor *without* its
   partner; the adversarial split's negatives ask about that partner).

Prints, per model and POPE split, F1, accuracy and yes-ratio beside the truth's yes-share, the gap
(random F1 - adversarial F1) and the share of the SFT gap each later stage closes. Writes
``benchmarks/results/<name>.json`` and GRPO's reward curve ``docs/<name>_grpo_reward.png``. A stage whose export is already in ``--work`` is not re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
STAGES = {"sft": ("sft.py", "sft_cooccur.yaml"), "dpo": ("dpo.py", "dpo_cooccur.yaml"),
          "dpo_probe": ("dpo.py", "dpo_cooccur_probe.yaml"), "grpo": ("grpo.py", "grpo_cooccur.yaml")}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str], log: Path) -> float:
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return time.time() - t


def train(stage: str, work: Path, port: int, extra: list[str]) -> float:
    """The stage's recipe with its config (whose data paths are relative to the repository root)."""
    recipe, config = STAGES[stage]
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(REPO / "recipes" / recipe),
           "--config", str(REPO / "recipes" / "configs" / config), f"output_dir={work / stage}",
           "eval.at_end=false", "eval.at_start=false", "resume=never"]
    if stage != "sft":
        cmd.append(f"model.init_from={work / 'sft' / 'hf'}")
    return _run(cmd + extra, work / f"{stage}.log")


def evaluate(model: Path, data: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "vlmscale.cli", "eval", "pope", "--model", str(model), "--data", str(data / "heldout"),
           "--out", str(out)]
    _run(cmd, out.with_suffix(".log"))
    return json.loads(out.read_text())["pope"]


def truth_yes_share(data: Path) -> dict[str, float]:
    from vlmscale.data.shards import ShardDataset

    ds = ShardDataset(data / "heldout" / "pope")
    by: dict[str, list[int]] = {}
    for i in range(len(ds)):
        rec = json.loads(ds.read(i)[1]["json"])
        by.setdefault(rec["split"], []).append(rec["answer"] == "yes")
    return {s: sum(v) / len(v) for s, v in by.items()}


def main() -> int:
    from vlmscale.precision import cpu_bf16

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "cooccur-study")
    ap.add_argument("--only", default=",".join(STAGES), help="stages to train and score (comma-separated)")
    ap.add_argument("--sft-steps", type=int, default=None, help="train.max_steps for SFT (default: the config's)")
    ap.add_argument("--dpo-steps", type=int, default=None)
    ap.add_argument("--grpo-steps", type=int, default=80)
    ap.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                    help="an extra override for one stage, e.g. grpo:optim.lr=2e-5 (repeatable)")
    ap.add_argument("--name", default="cooccur_study", help="result file benchmarks/results/<name>.json")
    ap.add_argument("--port", type=int, default=int(os.environ.get("MASTER_PORT", 29781)))
    args = ap.parse_args()
    args.work = args.work.resolve()
    args.data = REPO / "data" / "cooccur"  # where the configs read it
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.data / "demo.json").is_file():
        subprocess.run([sys.executable, "-m", "vlmscale.cli", "data", "demo", "--variant", "cooccur", "--out",
                        str(args.data)], cwd=REPO, env=_env(), check=True)
    steps = {"sft": args.sft_steps, "dpo": args.dpo_steps, "dpo_probe": args.dpo_steps, "grpo": args.grpo_steps}
    timing: dict[str, float] = {}
    results: dict[str, dict] = {}
    pairs = args.data / "train" / "probe_pairs"
    if "dpo_probe" in args.only.split(",") and not pairs.is_dir():
        _run([sys.executable, "-m", "vlmscale.cli", "data", "convert", "yes-no-pairs", "--shards",
              str(args.data / "train" / "probe"), "--out", str(pairs)], args.work / "probe_pairs.log")
    for stage in [s for s in STAGES if s in args.only.split(",")]:
        if not (args.work / stage / "hf" / "config.json").is_file():
            extra = [kv.split(":", 1)[1] for kv in args.set if kv.startswith(f"{stage}:")]
            if steps[stage]:
                extra.append(f"train.max_steps={steps[stage]}")
            print(f"training {stage} ...", flush=True)
            timing[f"{stage}_train_s"] = train(stage, args.work, args.port, extra)
        t = time.time()
        results[stage] = evaluate(args.work / stage / "hf", args.data, args.work / f"eval-{stage}.json")
        timing[f"{stage}_eval_s"] = time.time() - t
    grpo_metrics = args.work / "grpo" / "metrics.jsonl"
    reward_curve = []
    if "grpo" in results and grpo_metrics.is_file():
        from benchmarks.grpo_demo import plot

        rows = [json.loads(line) for line in grpo_metrics.read_text().splitlines() if '"reward"' in line]
        reward_curve = [r["reward"] for r in rows]
        plot(rows, REPO / "docs" / f"{args.name}_grpo_reward.png", title="GRPO on the cooccur probes")
    truth = truth_yes_share(args.data)
    cpu = cpu_bf16()[1]
    print(f"CPU: {cpu}")
    print(f"{'model':<10}{'split':<13}{'f1':>7}{'acc':>7}{'yes%':>7}{'truth':>7}")
    summary: dict[str, dict] = {}
    for stage, pope in results.items():
        for split in ("random", "popular", "adversarial"):
            r = pope[split]
            print(f"{stage:<10}{split:<13}{r['f1']:>7.3f}{r['accuracy']:>7.3f}{r['yes_ratio']:>7.3f}{truth[split]:>7.3f}")
        summary[stage] = {"gap_f1": pope["random"]["f1"] - pope["adversarial"]["f1"],
                          "adversarial_yes_ratio": pope["adversarial"]["yes_ratio"]}
    if "sft" in summary:
        gap0 = summary["sft"]["gap_f1"]
        for stage, s in summary.items():
            s["gap_closed"] = (1 - s["gap_f1"] / gap0) if gap0 > 0 else None
            s["adversarial_f1_change"] = results[stage]["adversarial"]["f1"] - results["sft"]["adversarial"]["f1"]
            s["random_f1_change"] = results[stage]["random"]["f1"] - results["sft"]["random"]["f1"]
            closed = "n/a (no SFT gap)" if s["gap_closed"] is None else f"{s['gap_closed']:+.2f}"
            # a smaller gap counts only if the random split held: saying "no" to everything also closes it
            print(f"{stage:<10} random - adversarial F1 gap {s['gap_f1']:+.3f}; share of SFT's gap closed {closed}; "
                  f"F1 change adversarial {s['adversarial_f1_change']:+.3f}, random {s['random_f1_change']:+.3f}")
    print(f"time {json.dumps({k: round(v) for k, v in timing.items()})}")
    out = {"cpu": cpu, "truth_yes_share": truth, "pope": results, "summary": summary, "timing_s": timing,
           "steps": steps, "overrides": args.set, "grpo_reward_per_step": reward_curve}
    (REPO / "benchmarks" / "results" / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
