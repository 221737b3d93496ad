"""Chunked loss (train.loss_chunk_tokens) on/off at the InternVL2-1B head shape: peak memory and time.

    PYTHONPATH=. python benchmarks/chunked_loss.py [--tokens 2048 4096] [--out benchmarks/results/chunked_loss.json]
    PYTHONPATH=. python benchmarks/chunked_loss.py --whole-model --tokens 4096 --out benchmarks/results/chunked_loss_1b_model.json

The only part of a step the chunking changes is the LM head + cross-entropy over the supervised
positions (``vlmscale.model.forward.supervised_loss_sum``), so this runs exactly that, forward and
backward, at the InternVL2-1B LLM's shape (hidden 896, Qwen2 vocab 151,655, from
``vlmscale.model.specs``; random weights, bf16 like training) on ``tokens`` supervised positions (a
2k-4k-token answer). Each case runs in its own process; the peak is the growth of the process's peak
RSS over what it held before the loss (weights, hidden states and their gradient buffers allocated
up front), i.e. what the loss itself needs at its peak. Also measured: this CPU's bf16 vs fp32 matmul
speed (the head's matmul shape).

``--whole-model`` runs a whole training forward and backward of the InternVL2-1B shape instead (built
from ``spec_config("internvl2-1b")`` with random bf16 weights: 448-px InternViT-300M-like encoder,
frozen as the default policy has it; the LLM and projector trained; LLM activation checkpointing and
SDPA attention as a long-answer run would set them), through ``vlm_hidden`` and ``supervised_loss_sum``
as ``train_step`` calls them, on one image tile (256 image tokens), a short prompt and a
``tokens``-token answer. The peak is the growth of peak RSS over the built model, so it holds every
activation, the gradients and the loss: the difference between chunk 0 and chunk N is what chunking
saves at that shape.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))


def cpu_info() -> dict:
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), []))
    return {"model_name": name, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "amx_tile": "amx_tile" in flags}


def matmul_speed(n: int = 1024, k: int = 896, m: int = 8192, reps: int = 3) -> dict:
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)
        a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        out[f"{name}_gflops"] = round(2 * n * k * m * reps / (time.perf_counter() - t0) / 1e9, 1)
    out["bf16_over_fp32"] = round(out["bf16_gflops"] / out["fp32_gflops"], 2)
    out["shape"] = [n, k, m]
    return out


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case(tokens: int, chunk: int) -> dict:
    import torch

    from vlmscale.model.forward import enable_chunked_loss, supervised_loss_sum
    from vlmscale.model.specs import spec_config

    llm = spec_config("internvl2-1b").text_config
    hidden_size, vocab = llm.hidden_size, llm.vocab_size
    torch.manual_seed(0)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(hidden_size, vocab, bias=False, dtype=torch.bfloat16)

    model = Holder()
    enable_chunked_loss(model, chunk)
    hidden = torch.randn(1, tokens + 1, hidden_size, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens + 1))
    # gradient buffers exist before the measurement (a training step has them too)
    model.lm_head.weight.grad = torch.zeros_like(model.lm_head.weight)
    hidden.grad = torch.zeros_like(hidden)
    before = _rss_peak_mb()
    t0 = time.perf_counter()
    loss = supervised_loss_sum(model, hidden, labels)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return {"tokens": tokens, "chunk": chunk, "hidden": hidden_size, "vocab": vocab, "loss": float(loss),
            "forward_s": round(t1 - t0, 2), "backward_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
            "peak_mb": round(_rss_peak_mb() - before, 1),
            "logits_fp32_mb": round(tokens * vocab * 4 / 2**20, 1),
            "grad_w_norm": float(model.lm_head.weight.grad.float().norm())}


def whole_model_case(tokens: int, chunk: int) -> dict:
    import torch
    from transformers import InternVLForConditionalGeneration

    from vlmscale.model.checkpointing import enable_activation_checkpointing
    from vlmscale.model.forward import enable_chunked_loss, supervised_loss_sum, vlm_hidden
    from vlmscale.model.specs import spec_config

    torch.manual_seed(0)
    config = spec_config("internvl2-1b")
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    config.image_token_id = config.text_config.vocab_size - 1  # the spec has no tokenizer; any id inside the table
    model = InternVLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.model.vision_tower.requires_grad_(False)
    enable_activation_checkpointing(model, llm=True, vision=False)
    enable_chunked_loss(model, chunk)
    model.train()
    vocab = config.text_config.vocab_size
    image_tokens = (config.vision_config.image_size[0] // config.vision_config.patch_size[0]) ** 2 // 4  # pixel shuffle 0.5
    prompt = 24
    ids = torch.randint(1000, vocab - 1000, (1, image_tokens + prompt + tokens + 1))
    ids[0, :image_tokens] = config.image_token_id
    labels = torch.full_like(ids, -100)
    labels[0, -(tokens + 1):] = ids[0, -(tokens + 1):]  # ``tokens`` supervised next-token targets
    pixels = torch.randn(1, 3, *config.vision_config.image_size, dtype=torch.bfloat16)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = _rss_peak_mb()
    t0 = time.perf_counter()
    hidden = vlm_hidden(model, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    loss = supervised_loss_sum(model, hidden, labels)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return {"tokens": tokens, "chunk": chunk, "whole_model": "internvl2-1b", "trained_params": trained,
            "sequence": int(ids.shape[1]), "hidden": config.text_config.hidden_size, "vocab": vocab,
            "loss": float(loss.detach()), "forward_s": round(t1 - t0, 2), "backward_s": round(t2 - t1, 2),
            "total_s": round(t2 - t0, 2), "peak_mb": round(_rss_peak_mb() - before, 1),
            "logits_fp32_mb": round(tokens * vocab * 4 / 2**20, 1), "grad_w_norm": float(model.lm_head.weight.grad.float().norm())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--chunk", type=int, default=2048, help="chunk for the 'on' runs (train.loss_chunk_tokens' default)")
    ap.add_argument("--whole-model", action="store_true", help="a whole InternVL2-1B-shape training step, not the head alone")
    ap.add_argument("--case", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS / "chunked_loss.json")
    args = ap.parse_args()
    if args.case:
        print(json.dumps((whole_model_case if args.whole_model else case)(*args.case)))
        return 0
    rows = []
    for tokens in args.tokens:
        for chunk in (0, min(args.chunk, tokens // 2)):
            proc = subprocess.run([sys.executable, __file__, "--case", str(tokens), str(chunk),
                                   *(["--whole-model"] if args.whole_model else [])], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"case tokens={tokens} chunk={chunk} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    result = {"cpu": cpu_info(), "matmul": matmul_speed(), "cases": rows,
              "machine": f"{platform.node()} ({cpu_info()['model_name']})",
              "mode": "whole InternVL2-1B-shape step" if args.whole_model else "LM head + cross-entropy at the 1B head shape"}
    print(f"\nCPU: {result['cpu']}\nmatmul {result['matmul']}")
    print(f"{'tokens':>7} {'chunk':>6} {'peak MB':>9} {'logits MB':>10} {'fwd s':>7} {'bwd s':>7} {'total s':>8} {'loss':>10}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['chunk']:>6} {r['peak_mb']:>9} {r['logits_fp32_mb']:>10} {r['forward_s']:>7} "
              f"{r['backward_s']:>7} {r['total_s']:>8} {r['loss']:>10.2f}")
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
