"""The forgetting study: what each anti-forgetting remedy buys on the demo.

From one starting model that already knows the demo's text-only tasks (a short text-only SFT,
"textstart"), several SFT variants train on the image tasks for the same number of steps and are
scored side by side: held-out text-only loss (retention), vision-encoder drift, VQA accuracy.

    python benchmarks/forgetting_study.py                       # all variants, 2 ranks
    python benchmarks/forgetting_study.py --variants plain,reblend --steps 600

Writes ``<out>/study.json``, the table in ``docs/forgetting.md`` (between the STUDY markers) and
``docs/forgetting.png``. Each run is an ordinary recipe launch, so any of them can be re-run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEXT_ONLY = "data.sources=[{name: text, path: 'demo:train/text', weight: 1, text_only: true}]"

# variant -> (description, overrides on top of the common SFT overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "plain": ("image tasks only, LLM trained (no remedy)", ["data.text_fraction=0.0"]),
    "reblend": ("text-only re-blend 20% (VILA)", ["data.text_fraction=0.2"]),
    "vision_unfrozen": ("no remedy, encoder layers 2-3 unfrozen at lr/10",
                        ["data.text_fraction=0.0", "policy.vision.trainable=true", "policy.vision.layers=2-3",
                         "policy.vision.lr=6e-5"]),
    "frozen_llm": ("LLM frozen (projector only)", ["data.text_fraction=0.0", "policy.llm.trainable=false",
                                                   "policy.projector.lr=1e-3"]),
    # EWC on the LLM with the Fisher of textstart on its text data ({fisher} is filled in)
    "ewc_1e3": ("EWC λ=1e3 on the LLM", ["data.text_fraction=0.0", "regularizer.ewc.weight=1e3",
                                         "regularizer.ewc.path={fisher}"]),
    "ewc_1e5": ("EWC λ=1e5 on the LLM", ["data.text_fraction=0.0", "regularizer.ewc.weight=1e5",
                                         "regularizer.ewc.path={fisher}"]),
}


def run(cmd: list[str], log: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}); see {log}")


def launch(recipe: str, overrides: list[str], *, nproc: int, log: Path) -> None:
    run([str(BIN / "deepspeed"), "--num_gpus", str(nproc), f"recipes/{recipe}.py", *overrides], log)


def scores(out: Path) -> dict:
    start = json.loads((out / "eval" / "start.json").read_text())
    final = json.loads((out / "eval" / "final.json").read_text())
    vqa = final["vqa"]
    return {
        "text_loss_start": start["text"]["loss"], "text_loss_end": final["text"]["loss"],
        "text_loss_increase": final["text"]["loss"] - start["text"]["loss"],
        "drift_cosine": final["drift"]["cosine"], "vqa_overall": vqa["overall"]["accuracy"],
        "vqa_colour": vqa["colour"]["accuracy"], "pope_adversarial_f1": final["pope"]["adversarial"]["f1"],
    }


def table(rows: dict[str, dict], steps: int) -> str:
    head = ("| variant | what | text loss start → end (Δ) | encoder drift (cosine) | VQA overall | colour | POPE adv. F1 |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    for name, r in rows.items():
        lines.append(f"| `{name}` | {r['what']} | {r['text_loss_start']:.3f} → {r['text_loss_end']:.3f} "
                     f"({r['text_loss_increase']:+.3f}) | {r['drift_cosine']:.4f} | {r['vqa_overall']:.3f} | "
                     f"{r['vqa_colour']:.3f} | {r['pope_adversarial_f1']:.3f} |")
    return head + "\n".join(lines) + f"\n\nEvery variant: {steps} SFT steps from the same `textstart` model, 2 CPU ranks, ZeRO-3.\n"


def plot(rows: dict[str, dict], path: Path) -> None:
    """A bar chart of the text-loss increase per variant (PIL only; no plotting dependency)."""
    from PIL import Image, ImageDraw

    w, h, pad = 120 * len(rows) + 80, 320, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    values = [r["text_loss_increase"] for r in rows.values()]
    top = max(max(values), 1e-6)
    zero = h - pad
    d.line((pad, zero, w - 10, zero), fill="black")
    d.text((pad, 8), "held-out text-only loss increase after SFT (lower = less forgetting)", fill="black")
    for i, (name, v) in enumerate(zip(rows, values)):
        x = pad + 20 + i * 120
        bar = int((h - 2 * pad - 20) * max(v, 0) / top)
        d.rectangle((x, zero - bar, x + 60, zero), fill=(70, 110, 200))
        d.text((x, zero + 6), name[:16], fill="black")
        d.text((x, zero - bar - 14), f"{v:+.3f}", fill="black")
    img.save(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=600, help="SFT steps per variant")
    ap.add_argument("--textstart-steps", type=int, default=300)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every run")
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    start = out / "textstart"
    if not (start / "hf" / "config.json").is_file():
        launch("sft", [f"output_dir={start}", TEXT_ONLY, f"train.max_steps={args.textstart_steps}",
                       "eval.suites=[text]", *args.extra], nproc=args.nproc, log=out / "textstart.log")

    fisher = out / "fisher"
    wanted = args.variants.split(",")
    if any(name.startswith("ewc") for name in wanted) and not (fisher / "ewc.json").is_file():
        run([str(BIN / "deepspeed"), "--num_gpus", str(args.nproc), "--no_local_rank", "--module", "vlmscale.cli",
             "ewc", "fisher", "--model", str(start / "hf"), "--data", str(REPO / "data" / "demo" / "train" / "text"),
             "--out", str(fisher), "--samples", "256", "--params", "llm"], out / "fisher.log")

    rows: dict[str, dict] = {}
    common = [f"model.init_from={start / 'hf'}", f"train.max_steps={args.steps}", "eval.at_start=true",
              "eval.suites=[vqa,pope,text,drift]", "checkpoint.every_steps=1000000"]
    for name in wanted:
        what, overrides = VARIANTS[name]
        overrides = [o.replace("{fisher}", str(fisher)) for o in overrides]
        run_dir = out / name
        if not (run_dir / "eval" / "final.json").is_file():
            launch("sft", [f"output_dir={run_dir}", *common, *overrides, *args.extra], nproc=args.nproc,
                   log=out / f"{name}.log")
        rows[name] = {"what": what, "overrides": overrides, **scores(run_dir)}
        print(name, json.dumps(rows[name]), flush=True)

    (out / "study.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2))
    doc = REPO / "docs" / "forgetting.md"
    text = doc.read_text() if doc.exists() else "# Forgetting\n\n<!-- STUDY -->\n<!-- /STUDY -->\n"
    begin, end = "<!-- STUDY -->", "<!-- /STUDY -->"
    if begin not in text:
        text += f"\n## Study\n\n{begin}\n{end}\n"
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    doc.write_text(pre + begin + "\n" + table(rows, args.steps) + end + post)
    plot(rows, REPO / "docs" / "forgetting.png")
    print(table(rows, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
