"""LLaMA-Factory as a second peer: the same exported model and samples, trained by ``llamafactory-cli``.

LLaMA-Factory trains InternVL checkpoints in the Hugging Face layout through its ``intern_vl`` template.
This script gives it what ``benchmarks/sft_throughput.py`` gives vlmscale and TRL:

- the same model (an HF export, e.g. the demo preset's), vision encoder frozen, projector + LLM trained;
- the same samples in the same order: the demo SFT mixture's first ``steps x micro x 2`` positions,
  converted to LLaMA-Factory's ShareGPT format with the images written out as files;
- the same ZeRO-3 JSON (``ds_configs/zero3.json`` filled as vlmscale fills it), global batch, AdamW
  without decay, learning rate, warmup + cosine schedule to 5% and gradient clipping, 2 CPU ranks
  (``FORCE_TORCHRUN=1 NPROC_PER_NODE=2``), the precision ``auto`` picks.

LLaMA-Factory's pins differ from ours (it needs torchvision and torchaudio, and transformers <= 5.6),
so it gets its own virtual environment (``--venv``), never our dependencies. PyPI's torchvision only
imports here beside torch 2.9.1 (docs/performance.md), so that venv takes torch 2.9.1, torchvision
0.24.1 and torchaudio 2.9, then ``llamafactory`` and DeepSpeed.

    PYTHONPATH=. python benchmarks/llamafactory_peer.py --model /tmp/vlmscale-bench-sft/model [--steps 40]

Prints per-step seconds and losses, and writes ``benchmarks/results/llamafactory_peer.json``; where a
stage fails (install, data, launch), the JSON records the stage, the command and the tail of its log.
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
sys.path.insert(0, str(REPO / "benchmarks"))
RESULT = REPO / "benchmarks" / "results" / "llamafactory_peer.json"
PIP = ["torch==2.9.1", "torchvision==0.24.1", "torchaudio==2.9.*"]
LF = ["llamafactory==0.9.5", "deepspeed==0.19.8"]


class Failed(Exception):
    def __init__(self, stage: str, cmd: list[str], tail: str):
        super().__init__(stage)
        self.stage, self.cmd, self.tail = stage, cmd, tail


def _run(stage: str, cmd: list[str], log: Path, **kw) -> None:
    print(f"[{stage}] {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if proc.returncode != 0:
        raise Failed(stage, cmd, log.read_text(errors="replace")[-6000:])


def make_venv(venv: Path, work: Path) -> Path:
    py = venv / "bin" / "python"
    if not (venv / "bin" / "llamafactory-cli").exists():
        if not py.exists():
            _run("venv", [sys.executable, "-m", "venv", str(venv)], work / "venv.log")
        _run("install torch", [str(py), "-m", "pip", "install", "-q", *PIP], work / "pip-torch.log")
        _run("install llamafactory", [str(py), "-m", "pip", "install", "-q", *LF], work / "pip-lf.log")
    return py


def write_samples(out: Path, n: int, seed: int) -> list[str]:
    """The demo mixture's positions 0..n-1, as vlmscale reads them, in ShareGPT form with image files."""
    from vlmscale.config import SFTConfig, load_config
    from vlmscale.data.dataset import open_sources
    from vlmscale.data.mixture import Mixture

    cfg = load_config(SFTConfig, overrides=[f"train.seed={seed}"])
    sources = open_sources(cfg.data)
    mixture = Mixture(sizes=[len(s) for s in sources], weights=cfg.data.mixture_weights(), seed=seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, ids = [], []
    for pos in range(n):
        source, index = mixture.locate(pos)
        _, members = sources[source].read(index)
        record = json.loads(members["json"])
        paths, messages = [], []
        for msg in record["messages"]:
            content = msg["content"]
            if isinstance(content, str):
                text = content
            else:
                text = ""
                for part in content:
                    if part["type"] == "text":
                        text += part["text"]
                    elif part["type"] == "image":
                        dest = images / f"{pos:06d}-{len(paths)}{Path(part['image']).suffix or '.png'}"
                        dest.write_bytes(members[part["image"]])
                        paths.append(str(dest))
                        text += "<image>"
                    else:
                        raise ValueError(f"position {pos}: content part {part['type']!r} has no ShareGPT form here")
            messages.append({"role": msg["role"], "content": text})
        rows.append({"messages": messages, "images": paths})
        ids.append(str(record.get("id", pos)))
    (out / "demo_sft.json").write_text(json.dumps(rows))
    (out / "dataset_info.json").write_text(json.dumps({"demo_sft": {
        "file_name": "demo_sft.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}))
    return ids


def _supervised(model: str, ids: list[str], steps: int) -> list[int]:
    """Each global step's supervised tokens as vlmscale counts them (the same samples as sft_throughput's
    steps: positions step x 32 ... in order), so tokens/s compares like with like across the peers."""
    from sft_throughput import MICRO, SEED, WORLD

    from vlmscale.config import SFTConfig, load_config
    from vlmscale.data.dataset import TrainDataset, collate, open_sources
    from vlmscale.model.forward import num_supervised
    from vlmscale.model.tokenizer import ProcessorAssets

    cfg = load_config(SFTConfig, overrides=[f"model.init_from={model}", f"train.seed={SEED}"])
    config = json.loads((Path(model) / "config.json").read_text())
    assets = ProcessorAssets.load(model, image_seq_length=config["image_seq_length"], max_tiles=cfg.data.max_tiles)
    stream = TrainDataset(sources=open_sources(cfg.data), names=[s.name or s.path for s in cfg.data.sources],
                          weights=cfg.data.mixture_weights(), assets=assets, max_seq_len=cfg.data.max_seq_len,
                          seed=SEED, video=cfg.data.video)
    per = MICRO * WORLD
    out = []
    for step in range(steps):
        items = [stream[i] for i in range(step * per, (step + 1) * per)]
        assert [it.sample_id for it in items] == ids[step * per:(step + 1) * per]
        out.append(num_supervised(collate(items, pad_id=assets.tokenizer.pad_token_id)["labels"]))  # as sft_throughput counts
    return out


def main() -> int:
    from sft_throughput import LR, MICRO, MIN_LR_RATIO, SEED, WARMUP, WORLD

    from vlmscale.config import SFTConfig, load_config
    from vlmscale.config.deepspeed import build_ds_config
    from vlmscale.precision import cpu_bf16, resolve

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the HF export both peers trained (sft_throughput.py's model)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="leading steps left out of the timing")
    ap.add_argument("--venv", default="/tmp/vlmscale-llamafactory-venv")
    ap.add_argument("--work", default="/tmp/vlmscale-bench-llamafactory")
    ap.add_argument("--port", type=int, default=int(os.environ.get("MASTER_PORT", 29731)))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="LLaMA-Factory argument on top of its defaults, e.g. disable_gradient_checkpointing=true")
    ap.add_argument("--name", default="llamafactory_peer", help="results file: benchmarks/results/NAME.json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(SFTConfig, overrides=[f"model.init_from={args.model}", f"train.micro_batch_size={MICRO}"])
    cfg.train.precision = resolve(cfg.train.precision).precision
    result: dict = {"cpu": cpu_bf16()[1], "model": args.model, "steps": args.steps, "micro_batch": MICRO, "ranks": WORLD,
                    "precision": cfg.train.precision, "packages": PIP + LF}
    try:
        make_venv(Path(args.venv), work)
        data = work / "data"
        result["sample_ids"] = write_samples(data, args.steps * MICRO * WORLD, SEED)
        ds = build_ds_config(cfg, world_size=WORLD)
        # transformers builds deepspeed.zero.Init at from_pretrained, before the CPU process group exists, where
        # DeepSpeed takes the world size for 1 and refuses train_batch_size=32 != 16 x 1 x 1; without the field
        # it derives the same global batch (micro x accumulation x world) once the group is up
        ds.pop("train_batch_size", None)
        (work / "zero3.json").write_text(json.dumps(ds))
        out = work / "out"
        train = {
            "model_name_or_path": args.model, "trust_remote_code": False, "stage": "sft", "do_train": True,
            "finetuning_type": "full", "freeze_vision_tower": True, "freeze_multi_modal_projector": False,
            "deepspeed": str(work / "zero3.json"), "dataset": "demo_sft", "dataset_dir": str(data),
            "template": "intern_vl", "cutoff_len": cfg.data.max_seq_len, "overwrite_cache": True,
            "preprocessing_num_workers": 1, "disable_shuffling": True, "output_dir": str(out),
            "overwrite_output_dir": True, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
            "per_device_train_batch_size": MICRO, "gradient_accumulation_steps": 1, "max_steps": args.steps,
            "learning_rate": LR, "weight_decay": 0.0, "lr_scheduler_type": "cosine_with_min_lr",
            "lr_scheduler_kwargs": {"min_lr_rate": MIN_LR_RATIO}, "warmup_steps": WARMUP,
            "max_grad_norm": cfg.optim.max_grad_norm, "bf16": cfg.train.precision == "bf16",
            "fp16": cfg.train.precision == "fp16", "seed": SEED, "dataloader_num_workers": cfg.data.num_workers,
            "plot_loss": False, "use_cpu": True,  # as the TRL side: transformers refuses bf16 on CPU without it
            "ddp_backend": "gloo",  # without it each CPU process trains alone (DeepSpeed then sees world size 1)
        }
        import yaml

        for item in args.set:
            key, _, value = item.partition("=")
            train[key] = yaml.safe_load(value)
        result["train_args"] = train
        (work / "train.yaml").write_text(yaml.safe_dump(train))  # its .json reader fails (json.load on a Path)
        env = {**os.environ, "FORCE_TORCHRUN": "1", "NNODES": "1", "NPROC_PER_NODE": str(WORLD),
               "MASTER_PORT": str(args.port), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "CUDA_VISIBLE_DEVICES": "", "DISABLE_VERSION_CHECK": "0", "PYTHONPATH": "",
               "PATH": f"{Path(args.venv) / 'bin'}:{os.environ['PATH']}"}  # its torchrun
        t0 = time.time()
        _run("train", [str(Path(args.venv) / "bin" / "llamafactory-cli"), "train", str(work / "train.yaml")],
             work / "train.log", env=env, cwd=work)
        result["wall_s"] = time.time() - t0
        rows = [json.loads(ln) for ln in (out / "trainer_log.jsonl").read_text().splitlines() if ln.strip()]
        elapsed = [r["elapsed_time"] for r in rows if "loss" in r]  # "0:01:23"-style strings
        secs = [sum(int(x) * 60 ** i for i, x in enumerate(reversed(e.split(":")))) for e in elapsed]
        result["loss"] = [r["loss"] for r in rows if "loss" in r]
        result["elapsed_s"] = secs
        steady = secs[-1] - secs[args.warmup - 1] if len(secs) > args.warmup else None
        result["s_per_step"] = steady / (len(secs) - args.warmup) if steady else None
        result["status"] = "trained"
        result["supervised"] = _supervised(args.model, result["sample_ids"], args.steps)
        timed = result["supervised"][args.warmup:]
        result["supervised_tokens_per_s"] = sum(timed) / steady if steady else None
        print(f"LLaMA-Factory: {len(secs)} steps in {result['wall_s']:.0f} s wall; "
              f"{result['s_per_step']} s/step after {args.warmup}; last loss {result['loss'][-1]}")
    except Failed as exc:
        result.update(status="failed", stage=exc.stage, command=" ".join(exc.cmd), log_tail=exc.tail)
        print(f"LLaMA-Factory failed at '{exc.stage}': {' '.join(exc.cmd)}\n{exc.tail[-3000:]}")
    ours = REPO / "benchmarks" / "results" / "sft_throughput.json"
    if result.get("supervised_tokens_per_s") and ours.exists():
        summary = json.loads(ours.read_text())["summary"]
        result["against_sft_throughput_json"] = {
            name: summary[name]["supervised_tokens_per_s"] / result["supervised_tokens_per_s"]
            for name in ("vlmscale", "trl", "trl_eager") if name in summary}
        print("supervised tokens/s of benchmarks/results/sft_throughput.json's runs over LLaMA-Factory's: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in result["against_sft_throughput_json"].items()))
    out = RESULT.with_name(f"{args.name}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if result.get("status") == "trained" else 1


if __name__ == "__main__":
    sys.exit(main())
