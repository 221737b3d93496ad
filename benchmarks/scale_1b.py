"""The InternVL2-1B shape on 2 CPU ranks under ZeRO-3: SFT steps, a checkpoint save, a resume, the
offline universal conversion, a sharded export and a stock-transformers load, each phase's measured
per-rank peak RSS beside ``vlmscale plan``'s prediction for the same run.

    vlmscale model init --spec internvl2-1b --out /tmp/1b      # once, about 80 s (random weights)
    PYTHONPATH=. python benchmarks/scale_1b.py --model-dir /tmp/1b [--steps 2] [--resume-steps 1] \
        [--out /tmp/scale-1b] [override ...]

What runs, in order (every launch is ``deepspeed --num_gpus 2 recipes/sft.py``, the user's command):

1. ``vlmscale plan --json`` for the run's overrides: the per-rank peak of tensor memory it predicts.
2. A run of ``--steps`` SFT steps that saves a checkpoint at its end (no export, no eval).
3. A relaunch to ``--steps + --resume-steps``: it resumes from that checkpoint (its log gives the bytes
   each rank read), trains, saves again and exports safetensors shards of ``--shard-size``.
4. ``vlmscale ckpt convert OUT --to universal --workers 2`` on the newest checkpoint: seconds per GB.
5. Stock ``transformers`` loads the export (``AutoModelForImageTextToText``) in one process.

Peak RSS: a sampler reads every rank's ``VmRSS`` (``/proc/PID/status``) every 0.25 s; each phase's
peak is the largest sample between the phase's log lines (build and load, steps, save, export). The
plan counts tensor bytes, RSS also counts libraries, the Python heap and allocator caches, so the two
sit side by side as a bound, not as the same quantity (docs/plan.md).

Prints a table and writes ``benchmarks/results/scale_1b.json`` (``--name``). ``MASTER_PORT`` moves the port.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
PORT = int(os.environ.get("MASTER_PORT", 29761))

# the run the plan line in docs/plan.md describes: the sft policy (encoder frozen, projector + LLM trained),
# LLM activation checkpointing, one packed 1024-token row per micro-batch
DEFAULT_OVERRIDES = ["data.max_seq_len=1024", "train.micro_batch_size=1", "train.grad_accum_steps=1",
                     "train.activation_checkpointing.llm=true"]
STAMP = re.compile(r"\[(\d\d):(\d\d):(\d\d) rank(\d+) ([\w.]+)\] (.*)$")


class RSSSampler(threading.Thread):
    """Every rank process's VmRSS, sampled: [(wall time, rank, bytes)]."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval, self.samples, self.stop = interval, [], threading.Event()

    @staticmethod
    def _ranks() -> dict[int, int]:
        found = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                if not any(c.endswith(b"recipes/sft.py") for c in cmd):
                    continue
                env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
                if b"LOCAL_RANK" in env:
                    found[int(proc.name)] = int(env[b"LOCAL_RANK"])
            except (OSError, ValueError):
                continue
        return found

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.time()
            for pid, rank in self._ranks().items():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            self.samples.append((now, rank, int(line.split()[1]) * 1024))
                except OSError:
                    pass
            self.stop.wait(self.interval)


def _log_events(log: Path, day_start: float) -> list[tuple[float, int, str]]:
    """(wall time, rank, message) of every vlmscale log line; log stamps are HH:MM:SS local time."""
    events = []
    for line in log.read_text(errors="replace").replace("\r", "\n").splitlines():
        m = STAMP.search(line)  # also after a progress bar on the same line
        if m:
            h, mi, s, rank = (int(g) for g in m.groups()[:4])
            events.append((day_start + h * 3600 + mi * 60 + s, rank, m.group(6)))
    return events


def _first(events, needle: str, rank: int | None = 0) -> tuple[float, str] | None:
    for t, r, msg in events:
        if needle in msg and (rank is None or r == rank):
            return t, msg
    return None


def _peak(samples, t0: float, t1: float) -> dict[int, float]:
    out: dict[int, float] = {}
    for t, rank, rss in samples:
        if t0 - 0.5 <= t <= t1 + 1.0:  # log stamps are whole seconds
            out[rank] = max(out.get(rank, 0.0), rss)
    return out


def _launch(name: str, overrides: list[str], out_dir: Path, log_dir: Path) -> tuple[int, float, Path, list]:
    log = log_dir / f"{name}.log"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(PORT), str(REPO / "recipes" / "sft.py"),
           f"output_dir={out_dir}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    sampler = RSSSampler()
    sampler.start()
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    sampler.stop.set()
    sampler.join()
    print(f"[{name}] exit {rc} in {wall:.0f}s (log {log})", flush=True)
    return rc, wall, log, sampler.samples


def _phases(log: Path, samples, t_start: float, t_end: float) -> dict:
    """Each phase's wall span and per-rank peak RSS, cut at the run's log lines."""
    local = time.localtime(t_start)
    day_start = time.mktime((local.tm_year, local.tm_mon, local.tm_mday, 0, 0, 0, 0, 0, -1))
    ev = _log_events(log, day_start)
    marks = {
        "first_step": _first(ev, "MFU peak"),  # logged right before the first step
        "save": _first(ev, "committed in"),
        "load": _first(ev, "loading "),
        "exported": _first(ev, "exported "),
    }
    t_first = marks["first_step"][0] if marks["first_step"] else t_start
    phases = {"build_and_load": (t_start, t_first)}
    committed = marks["save"]
    if committed:
        save_s = float(re.search(r"committed in ([\d.]+)s", committed[1]).group(1))
        phases["steps"] = (t_first, committed[0] - save_s)
        phases["save"] = (committed[0] - save_s, committed[0])
    if marks["exported"]:
        export_s = float(re.search(r"in ([\d.]+)s", marks["exported"][1]).group(1))
        phases["export"] = (marks["exported"][0] - export_s, marks["exported"][0])
    out = {name: {"span_s": round(t1 - t0, 1),
                  "peak_rss_bytes": {str(r): v for r, v in sorted(_peak(samples, t0, t1).items())}}
           for name, (t0, t1) in phases.items()}
    out["whole_run_peak_rss_bytes"] = {str(r): v for r, v in sorted(_peak(samples, t_start, t_end).items())}
    out["log"] = {k: v[1] for k, v in marks.items() if v}
    if committed:
        out["save_s"] = save_s
    if marks["exported"]:
        out["export_s"] = export_s
        out["export_line"] = marks["exported"][1]
    if marks["load"]:
        out["load_line"] = marks["load"][1]
        resumed = _first(ev, "resumed from")
        built = _first(ev, "building the model from")
        if resumed and built:
            out["resume_build_and_load_s"] = resumed[0] - built[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="an HF InternVL directory (vlmscale model init --spec internvl2-1b)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--resume-steps", type=int, default=1)
    ap.add_argument("--shard-size", default="500MB")
    ap.add_argument("--out", default="/tmp/vlmscale-scale-1b")
    ap.add_argument("--name", default="scale_1b")
    ap.add_argument("--skip-convert", action="store_true")
    ap.add_argument("overrides", nargs="*", help="run-config overrides (default: the docs/plan.md run)")
    args = ap.parse_args()

    from vlmscale.precision import cpu_bf16, cpu_model

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    logs = out / "logs"
    logs.mkdir()
    run_dir = out / "run"
    overrides = [*DEFAULT_OVERRIDES, *args.overrides]
    common = [f"model.init_from={args.model_dir}", *overrides, "eval.every_steps=0", "eval.at_end=false",
              "train.log_every_steps=1", "checkpoint.keep_last=1",
              f"checkpoint.export_shard_size={args.shard_size}", "optim.warmup_steps=1"]
    result: dict = {"cpu": cpu_model(), "cpu_bf16": cpu_bf16()[1], "cores": os.cpu_count(), "ranks": 2,
                    "model_dir": args.model_dir, "overrides": overrides, "steps": args.steps,
                    "resume_steps": args.resume_steps}

    # 1. the plan's prediction for this run
    plan_json = out / "plan.json"
    plan_cmd = [str(BIN / "vlmscale"), "plan", "--model", args.model_dir, "--nodes", "1", "--gpus-per-node", "2",
                "--gpu-mem", "24", "--reserve", "0", "--device", "cpu", "--json", str(plan_json), *overrides]
    subprocess.run(plan_cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    result["plan_cmd"] = " ".join(["vlmscale", *plan_cmd[1:]])
    result["plan"] = json.loads(plan_json.read_text())
    result["plan_phase_bytes"] = _plan_phases(result["plan"])

    # 2. steps, then a save
    t0 = time.time()
    rc, wall, log, samples = _launch("train", [*common, f"train.max_steps={args.steps}",
                                               f"checkpoint.every_steps={args.steps}", "checkpoint.export=false",
                                               "resume=never"], run_dir, logs)
    if rc != 0:
        print(f"training run failed (exit {rc}); see {log}")
        return 1
    result["train"] = {"wall_s": wall, **_phases(log, samples, t0, t0 + wall)}
    result["train"]["step_time_s"] = _step_times(run_dir)
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    size = sum(f.stat().st_size for f in (run_dir / "checkpoints" / tags[-1]).rglob("*") if f.is_file())
    result["checkpoint_bytes"] = size

    # 3. resume, train, save, export
    total = args.steps + args.resume_steps
    t0 = time.time()
    rc, wall, log, samples = _launch("resume", [*common, f"train.max_steps={total}", f"checkpoint.every_steps={total}",
                                                "checkpoint.export=true"], run_dir, logs)
    if rc != 0:
        print(f"resumed run failed (exit {rc}); see {log}")
        return 1
    result["resume"] = {"wall_s": wall, **_phases(log, samples, t0, t0 + wall)}
    result["resume"]["step_time_s"] = _step_times(run_dir)[args.steps:]

    # 4. offline universal conversion of the newest checkpoint
    if not args.skip_convert:
        t0 = time.time()
        conv = subprocess.run([str(BIN / "vlmscale"), "ckpt", "convert", str(run_dir), "--to", "universal",
                               "--workers", "2"], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        (logs / "convert.log").write_text(conv.stdout + conv.stderr)
        line = next((ln for ln in (conv.stdout + conv.stderr).splitlines() if "universal" in ln and " in " in ln), "")
        result["convert"] = {"rc": conv.returncode, "wall_s": time.time() - t0, "line": line.strip()}
        m = re.search(r"([\d.]+) GB\) to a universal checkpoint in ([\d.]+)s", line)
        if m:
            result["convert"].update(gb=float(m.group(1)), seconds=float(m.group(2)),
                                     seconds_per_gb=float(m.group(2)) / max(float(m.group(1)), 1e-9))

    # 5. stock transformers loads the export
    probe = ("import time, torch, transformers as T; t0 = time.perf_counter(); "
             f"m = T.AutoModelForImageTextToText.from_pretrained({str(run_dir / 'hf')!r}, dtype=torch.bfloat16); "
             "n = sum(p.numel() for p in m.parameters()); "
             "import resource; print(f'LOADED {time.perf_counter() - t0:.2f} {n} '"
             "f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}')")
    t0 = time.time()
    hf = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    line = next((ln for ln in hf.stdout.splitlines() if ln.startswith("LOADED")), None)
    result["hf_load"] = {"rc": hf.returncode, "wall_s": time.time() - t0,
                         "shards": len(list((run_dir / "hf").glob("model-*.safetensors")))}
    if line:
        _, secs, n, rss = line.split()
        result["hf_load"].update(seconds=float(secs), parameters=int(n), peak_rss_bytes=int(rss))
    else:
        result["hf_load"]["stderr_tail"] = hf.stderr[-2000:]

    _report(result)
    dest = REPO / "benchmarks" / "results" / f"{args.name}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {dest}")
    return 0


def _step_times(run_dir: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r["step_time_s"] for r in rows if "step_time_s" in r and "loss" in r]


def _report(r: dict) -> None:
    gib = 1024 ** 3
    plan = r["plan"]
    print(f"\nInternVL2-1B shape, 2 ranks, ZeRO-3 on CPU ({r['cpu']}; {r['cpu_bf16']}), {r['cores']} cores")
    print(f"plan: {r['plan_cmd']}")
    print(f"plan per rank (GiB of tensors): peak {_plan_peak(plan) / gib:.2f}; "
          + ", ".join(f"{k} {v / gib:.2f}" for k, v in _plan_phases(plan).items()))
    print(f"{'phase':<28}{'span s':>9}{'rank 0 GiB':>12}{'rank 1 GiB':>12}")
    for run in ("train", "resume"):
        for phase in ("build_and_load", "steps", "save", "export"):
            p = r[run].get(phase)
            if not p:
                continue
            peaks = p["peak_rss_bytes"]
            print(f"{run + ' ' + phase:<28}{p['span_s']:>9.1f}{peaks.get('0', 0) / gib:>12.2f}{peaks.get('1', 0) / gib:>12.2f}")
    print(f"step time s: {r['train']['step_time_s']} then {r['resume']['step_time_s']}")
    print(f"checkpoint {r['checkpoint_bytes'] / 1e9:.2f} GB; save {r['train'].get('save_s')} s; "
          f"resume: {r['resume'].get('load_line', '?')}")
    if "convert" in r:
        print(f"convert: {r['convert'].get('line') or r['convert']}")
    print(f"export: {r['resume'].get('export_line', '?')}")
    print(f"stock transformers load: {r['hf_load']}")


def _plan_peak(plan: dict) -> float:
    return float(plan["configured"]["peak_gpu_gib"]) * 1024 ** 3


def _plan_phases(plan: dict) -> dict[str, float]:
    """The plan's per-rank tensor bytes in each phase: standing terms plus that phase's."""
    terms = plan["configured"]["terms"]
    standing = sum(t["nbytes"] for t in terms if t["phase"] == "standing")
    phases = {t["phase"] for t in terms} - {"standing"}
    return {"standing": standing, **{ph: standing + sum(t["nbytes"] for t in terms if t["phase"] == ph)
                                     for ph in sorted(phases)}}

if __name__ == "__main__":
    sys.exit(main())
