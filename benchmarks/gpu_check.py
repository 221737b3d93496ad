"""The prepared GPU check: every stage on one GPU under NCCL, then one throughput run at a realistic shape.

    python benchmarks/gpu_check.py --wheels WHEEL_DIR [--out DIR] [--steps 4] [--skip-throughput]
    python benchmarks/gpu_check.py --dry-run --wheels WHEEL_DIR     # parse, find wheels, check the device

Made for a GPU box with no network that has torch, transformers, peft and torchvision but not deepspeed
or webdataset: what is missing is installed from the wheels in ``--wheels`` (build them on a machine
with network access, ``pip wheel --no-deps deepspeed webdataset`` plus anything they need that the box
lacks) into ``OUT/site``, which is put on ``PYTHONPATH`` for every launched run. vlmscale itself runs
from this checkout.

Items, each printed as one ``CHECK <item> ok|FAIL ...`` line at the end (world size 1, NCCL, precision
``auto``):

- ``sft``: a few steps of the tiny preset with periodic eval, a checkpoint, a relaunch that resumes from
  it to a longer horizon, the export and the final eval;
- ``hf``: the export loaded and generating in stock transformers (``tests/hf_generate.py``, no vlmscale);
- ``align``, ``reward``, ``dpo``, ``ppo``: a few steps each from the sft export (ppo scored by the reward
  export), each with a checkpoint and an export;
- ``throughput``: an InternVL2-1B-shaped model (InternViT-300M-like encoder, 448-px tiles, 256 tokens a
  tile, Qwen2-0.5B-like LLM, random weights) trained on packed rows of 4096 tokens with sdpa (or
  flash-attention 2 where installed): tokens/s, TFLOP/s and MFU of the last logged window.

The whole check is sized for under 10 minutes on one H100/H200. ``--cpu`` runs the same items on this
machine's CPU (gloo, 1 rank, a smaller throughput shape) to check the script itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDED = {"deepspeed": "deepspeed", "webdataset": "webdataset"}  # import name -> wheel name prefix


def find_wheels(directory: Path | None) -> dict[str, Path]:
    """The wheels in ``directory`` by normalised project name (``deepspeed-0.19.8-py3-none-any.whl`` -> deepspeed)."""
    if directory is None:
        return {}
    if not directory.is_dir():
        print(f"error: --wheels {directory}: no such directory", file=sys.stderr)
        raise SystemExit(2)
    return {p.name.split("-")[0].lower().replace("_", "-"): p for p in sorted(directory.glob("*.whl"))}


def missing_modules() -> list[str]:
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def install(wheels: dict[str, Path], site: Path) -> list[str]:
    """Install every given wheel into ``site`` (no index, no dependency resolution); return their names."""
    if not wheels:
        return []
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
           "--target", str(site), *map(str, wheels.values())]
    subprocess.run(cmd, check=True)
    return sorted(wheels)


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


class Check:
    def __init__(self, out: Path, env: dict[str, str], *, cpu: bool):
        self.out, self.env, self.cpu = out, env, cpu
        self.results: list[tuple[str, bool, str]] = []
        self.port = 29700

    def run(self, args: list[str], *, log: str, timeout: int = 600) -> subprocess.CompletedProcess:
        self.port += 1
        with open(self.out / f"{log}.log", "w") as f:
            return subprocess.run(args, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)

    def recipe(self, stage: str, name: str, *overrides: str, log: str | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
               str(self.port + 1), str(REPO / "recipes" / f"{stage}.py"), f"output_dir={self.out / name}", *overrides]
        return self.run(cmd, log=log or name, timeout=timeout)

    def item(self, name: str, fn) -> None:
        t0 = time.time()
        try:
            detail = fn()
            self.results.append((name, True, f"{time.time() - t0:.0f}s {detail}"))
        except Exception as exc:  # one failing item must not hide the others' results
            self.results.append((name, False, f"{time.time() - t0:.0f}s {exc}"))
        status = "ok" if self.results[-1][1] else "FAIL"
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {status} {self.results[-1][2]}", flush=True)


def _rows(run_dir: Path) -> list[dict]:
    """The training rows of ``metrics.jsonl`` (evaluation rows left out)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in rows if not any(k.startswith("eval/") for k in r)]


def _ok(proc: subprocess.CompletedProcess, log: Path) -> None:
    if proc.returncode != 0:
        tail = log.read_text()[-1500:] if log.is_file() else ""
        raise RuntimeError(f"exit {proc.returncode}; log {log}:\n{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, help="directory of wheels for what the box lacks (deepspeed, webdataset, ...)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/vlmscale-gpu-check"), help="work and log directory")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per stage (the sft resume adds 2)")
    ap.add_argument("--throughput-steps", type=int, default=30)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="parse, find wheels, check the device; run nothing")
    ap.add_argument("--cpu", action="store_true", help="run the items on this CPU (gloo) to check the script itself")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (a checkpoint at step 2, then a resume)")

    wheels = find_wheels(args.wheels)
    missing = missing_modules()
    needed = {name: path for name, path in wheels.items() if name in {NEEDED[m] for m in missing}} if missing else {}
    unfilled = [m for m in missing if NEEDED[m] not in wheels]
    print(f"wheels found: {', '.join(sorted(wheels)) or 'none'}; missing modules: {', '.join(missing) or 'none'}")
    if unfilled:
        print(f"error: {', '.join(unfilled)} not importable and no wheel for it in --wheels "
              f"({args.wheels}); build one with `pip wheel --no-deps {' '.join(NEEDED[m] for m in unfilled)}`",
              file=sys.stderr)
        return 2
    name = gpu_name()
    if name is None and not args.cpu:
        print("error: no CUDA device here; this check needs one GPU (use --cpu to exercise the script on a CPU)",
              file=sys.stderr)
        return 2
    print(f"device: {name or 'CPU (--cpu)'}")
    if args.dry_run:
        print(f"dry run: would install {', '.join(needed) or 'nothing'} into {args.out / 'site'} and run "
              "sft, hf, align, reward, dpo, ppo" + ("" if args.skip_throughput else ", throughput"))
        return 0

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    # every given wheel, not only the missing ones: their own dependencies may be among them
    installed = install(wheels if missing else {}, args.out / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(args.out / "site"), str(REPO),
                                                                      os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if args.cpu:
        env.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(os.cpu_count() or 1)})
    print(f"installed from wheels: {', '.join(installed) or 'nothing'}")
    check = Check(args.out, env, cpu=args.cpu)
    out, steps = args.out, args.steps
    demo, start = out / "demo", out / "start"
    common = [f"data.demo_dir={demo}", "train.log_every_steps=1", "checkpoint.every_steps=2", "eval.max_samples=8",
              "eval.final_max_samples=16", "eval.max_new_tokens=8", "optim.warmup_steps=1", "train.micro_batch_size=4"]

    def prepare():
        cli = [sys.executable, "-m", "vlmscale.cli"]
        _ok(check.run([*cli, "data", "demo", "--out", str(demo), "--train-scenes", "200", "--heldout-scenes", "16"],
                      log="demo"), out / "demo.log")
        _ok(check.run([*cli, "model", "init", "--preset", "tiny", "--out", str(start)], log="init"), out / "init.log")
        return f"demo data and a tiny model in {out}"

    def sft():
        run = out / "sft"
        first = check.recipe("sft", "sft", f"model.init_from={start}", *common, f"train.max_steps={steps}",
                             "eval.every_steps=2", "checkpoint.export=false", "eval.at_end=false", log="sft-1")
        _ok(first, out / "sft-1.log")
        again = check.recipe("sft", "sft", f"model.init_from={start}", *common, f"train.max_steps={steps + 2}",
                             "eval.every_steps=2", log="sft-2")
        _ok(again, out / "sft-2.log")
        log = (out / "sft-2.log").read_text()
        if f"resumed from step-{steps:08d}" not in log:
            raise RuntimeError("the relaunch did not resume from the checkpoint")
        precision = next((line.split("precision: ")[1][:60] for line in log.splitlines() if "precision: " in line), "?")
        final = json.loads((run / "eval.json").read_text())
        last = _rows(run)[-1]
        return (f"precision {precision}; resumed at step {steps}; loss {last.get('loss', float('nan')):.3f}; "
                f"final eval keys {len(final)}; export {sorted(p.name for p in (run / 'hf').iterdir())[:3]}...")

    def hf():
        from PIL import Image

        image = out / "probe.png"
        Image.new("RGB", (48, 48), (200, 30, 30)).save(image)
        proc = check.run([sys.executable, str(REPO / "tests" / "hf_generate.py"), str(out / "sft" / "hf"), str(image),
                          "What colour is the image?"], log="hf")
        _ok(proc, out / "hf.log")
        return (out / "hf.log").read_text().strip().splitlines()[-1][:120]

    def stage(name: str, *extra: str):
        def fn():
            proc = check.recipe(name, name, f"model.init_from={out / 'sft' / 'hf'}", *common, f"train.max_steps={steps}",
                                "eval.at_end=false", *extra)
            _ok(proc, out / f"{name}.log")
            rows = _rows(out / name)
            hf_dir = out / name / "hf"
            if not (hf_dir / "config.json").is_file():
                raise RuntimeError(f"no export in {hf_dir}")
            keys = [k for k in ("loss", "reward", "accuracy", "kl") if k in rows[-1]]
            return f"{len(rows)} rows; last " + ", ".join(f"{k} {rows[-1][k]:.3f}" for k in keys)
        return fn

    def throughput():
        model = out / "model-1b"
        cli = [sys.executable, "-m", "vlmscale.cli"]
        if args.cpu:  # the script's own check: the tiny preset at the same settings
            model = start
        else:
            _ok(check.run([*cli, "model", "init", "--spec", "internvl2-1b", "--out", str(model)], log="init-1b"),
                out / "init-1b.log")
        flash = importlib.util.find_spec("flash_attn") is not None
        proc = check.recipe(
            "sft", "throughput", f"model.init_from={model}", f"data.demo_dir={demo}", "data.packing=true",
            "data.max_seq_len=4096", "data.max_tiles=1", "train.micro_batch_size=16", "train.grad_accum_steps=1",
            f"train.max_steps={args.throughput_steps}", f"train.log_every_steps={max(args.throughput_steps // 3, 1)}",
            "train.activation_checkpointing=true", "checkpoint.every_steps=100000", "checkpoint.export=false",
            "eval.at_end=false", "eval.every_steps=0", "policy.vision.trainable=true",
            f"model.attn_implementation={'flash_attention_2' if flash else 'sdpa'}", timeout=900)
        _ok(proc, out / "throughput.log")
        last = _rows(out / "throughput")[-1]
        return (f"{'flash_attention_2' if flash else 'sdpa'}: {last['tokens_per_s']:.0f} tokens/s, "
                f"{last['tflops']:.1f} TFLOP/s, MFU {last['mfu']:.1%} (last window of {args.throughput_steps} steps)")

    check.item("prepare", prepare)
    check.item("sft", sft)
    if check.results[-1][1]:
        check.item("hf", hf)
        check.item("align", stage("align"))
        check.item("reward", stage("reward"))
        check.item("dpo", stage("dpo", "eval.at_start=false"))
        if check.results[-2][1]:  # ppo needs the reward export
            check.item("ppo", stage("ppo", f"ppo.reward_model={out / 'reward' / 'hf'}", "ppo.rollout_batch_size=4",
                                    "ppo.max_new_tokens=8"))
    if not args.skip_throughput:
        check.item("throughput", throughput)
    print(f"\n== vlmscale GPU check on {name or 'CPU'} ({time.strftime('%Y-%m-%d %H:%M')}) ==")
    for item, ok, detail in check.results:
        print(f"CHECK {item:<10} {'ok  ' if ok else 'FAIL'} {detail.splitlines()[0]}")
    (out / "summary.json").write_text(json.dumps([{"item": i, "ok": ok, "detail": d} for i, ok, d in check.results],
                                                 indent=2))
    return 0 if all(ok for _, ok, _ in check.results) else 1


if __name__ == "__main__":
    sys.exit(main())
