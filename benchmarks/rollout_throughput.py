"""Rollout throughput: generated tokens/s of the previous decoder (equal-length batches only,
``eval.generate_legacy``) and the batched one (left padding, ``eval.generate.rollout``), greedy, on one
process, with the outputs checked identical row by row.

Shape: the demo preset, batch 16 of unequal-length held-out prompts of the demo dataset (``--preset tiny``
for a quick look). Weights are random
but spread out (std 0.3), so greedy decoding does not collapse onto one token and rows finish at
different steps; ``max_new_tokens`` bounds every row.

    python benchmarks/rollout_throughput.py [--data data/demo] [--max-new-tokens 24] [--repeats 1]

Prints a table and writes benchmarks/results/rollout_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from vlmscale.config import SFTConfig, load_config
from vlmscale.data.demo import ensure_demo
from vlmscale.data.render import render_prompt
from vlmscale.data.shards import ShardDataset
from vlmscale.eval import generate_legacy
from vlmscale.eval.generate import rollout
from vlmscale.model.build import build_model, load_weights_plain

def cpu_info() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    return {"model_name": name, "avx512_bf16": "avx512_bf16" in flags, "amx": any(f.startswith("amx") for f in flags),
            "threads": torch.get_num_threads()}


def prompts_for(assets, data: Path, n: int):
    out = []
    for suite in ("vqa", "pope", "captions", "grounding", "text"):
        ds = ShardDataset(data / "heldout" / suite)
        for i in range(min(len(ds), -(-n // 5))):
            _, members = ds.read(i)
            out.append(render_prompt(json.loads(members["json"])["messages"][:1], members, assets))
    return out[:n]


def build(overrides: list[str]):
    torch.manual_seed(0)
    cfg = load_config(SFTConfig, overrides=overrides)
    model, assets = build_model(cfg.model, max_tiles=2, dtype=torch.float32, load_weights=load_weights_plain)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval(), assets, sum(p.numel() for p in model.parameters())


def measure(name: str, overrides: list[str], data: Path, *, batch: int, max_new_tokens: int, repeats: int) -> dict:
    model, assets, params = build(overrides)
    prompts = prompts_for(assets, data, batch)
    lengths = sorted(len(p.input_ids) for p in prompts)
    times = {"before": [], "after": []}
    for _ in range(repeats):  # interleaved, so a busy machine slows both alike
        t = time.perf_counter()
        old = generate_legacy.generate(model, assets, prompts, max_new_tokens=max_new_tokens, batch_size=batch,
                                       return_ids=True)
        times["before"].append(time.perf_counter() - t)
        t = time.perf_counter()
        new = rollout(model, assets, prompts, max_new_tokens=max_new_tokens, batch_size=batch)
        times["after"].append(time.perf_counter() - t)
    tokens = sum(len(v) for v in new.tokens.values())
    identical = new.tokens == old
    before, after = min(times["before"]), min(times["after"])
    return {"shape": name, "parameters": params, "batch": batch, "prompt_lengths": lengths,
            "distinct_lengths": len(set(lengths)), "max_new_tokens": max_new_tokens, "generated_tokens": tokens,
            "before_s": before, "after_s": after, "before_tok_s": tokens / before, "after_tok_s": tokens / after,
            "speedup": before / after, "identical_greedy": identical, "forwards_after": new.forwards}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--out", default="benchmarks/results/rollout_throughput.json")
    args = ap.parse_args()
    data = ensure_demo(args.data)
    rows = [measure(args.preset, [f"model.preset={args.preset}"], data, batch=args.batch,
                    max_new_tokens=args.max_new_tokens, repeats=args.repeats)]
    cpu = cpu_info()
    print(f"CPU: {cpu['model_name']} (avx512_bf16={cpu['avx512_bf16']}, amx={cpu['amx']}, torch threads={cpu['threads']})")
    print(f"{'shape':<10}{'params':>10}{'lengths':>9}{'tokens':>8}{'before tok/s':>14}{'after tok/s':>13}{'speedup':>9}{'identical':>11}")
    for r in rows:
        print(f"{r['shape']:<10}{r['parameters']:>10}{r['distinct_lengths']:>9}{r['generated_tokens']:>8}"
              f"{r['before_tok_s']:>14.1f}{r['after_tok_s']:>13.1f}{r['speedup']:>8.2f}x{str(r['identical_greedy']):>11}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu, "rows": rows, "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
