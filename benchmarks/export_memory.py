"""Rank 0's peak host memory during an HF export under ZeRO-3: streaming shards vs the whole state dict.

Builds an InternVL model from config (random weights, already partitioned; default about 150 MB in
bf16) on 2 CPU ranks, then exports it twice:

- ``streaming``: ``vlmscale.train.step.export_hf`` (gathers module by module, writes shards of at
  most ``--shard-size``);
- ``baseline``: the previous path, the consolidated 16-bit state dict on rank 0
  (``engine._zero3_consolidated_16bit_state_dict``) then ``save_pretrained``.

Peak RSS is the kernel's high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs`` just before
each export, minus the RSS at that moment: the memory the export itself added. The streaming export is
measured first, so memory the allocator keeps from it can only flatter the baseline. Rank 0 then loads
the sharded export with stock transformers and checks every tensor against the baseline's.

    PYTHONPATH=. nice -n 10 deepspeed --num_gpus 2 benchmarks/export_memory.py [--shard-size 8MB] [--layers 24]
    vlmscale model init --spec internvl2-1b --out /tmp/1b && \
        PYTHONPATH=. deepspeed --num_gpus 2 benchmarks/export_memory.py --model-dir /tmp/1b --shard-size 500MB --name export_memory_1b

``--model-dir`` loads a saved model instead (partitioned, through ``model.init_from``'s path) and also
reports the load seconds and each rank's peak RSS after loading.

Prints both figures and writes ``benchmarks/results/export_memory.json`` (``--name``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _reset_peak() -> int:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shard-size", default="8MB")
    ap.add_argument("--layers", type=int, default=24, help="LLM layers (hidden 512, untied embeddings)")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--model-dir", help="export this saved model instead of building one")
    ap.add_argument("--out", default="/tmp/vlmscale-bench-export")
    ap.add_argument("--name", default="export_memory", help="results file: benchmarks/results/NAME.json")
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForImageTextToText, InternVLConfig, InternVLForConditionalGeneration, Qwen2Config

    from vlmscale.config import SFTConfig, load_config
    from vlmscale.config.deepspeed import build_ds_config
    from vlmscale.config.schema import ModelConfig
    from vlmscale.distributed.group import all_reduce_sum, barrier, init_distributed, shutdown
    from vlmscale.train.setup import build_partitioned
    from vlmscale.train.step import export_hf
    from vlmscale.distributed.zero import frozen_engine, gathered_state_dict, zero3_model_scope
    from vlmscale.model.build import preset_assets, preset_config
    from vlmscale.model.shards import hf_weights
    from vlmscale.config.load import parse_size

    dist = init_distributed()
    out = Path(args.out)
    if dist.is_main:
        shutil.rmtree(out, ignore_errors=True)
    barrier()
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny"])
    ds_config = build_ds_config(cfg, world_size=dist.world_size)
    load_s, loaded_peaks = None, None
    if args.model_dir:
        t0 = time.perf_counter()
        model, assets = build_partitioned(ModelConfig(init_from=args.model_dir), ds_config=ds_config, max_tiles=None,
                                          dtype=torch.bfloat16)
        barrier()
        load_s = time.perf_counter() - t0
        peaks = [0.0] * dist.world_size
        peaks[dist.rank] = float(_status("VmHWM"))
        loaded_peaks = all_reduce_sum(peaks)
    else:
        assets = preset_assets("demo")
        demo = preset_config("demo", vocab_size=len(assets.tokenizer), image_token_id=assets.token_id("<IMG_CONTEXT>"),
                             pad_token_id=assets.tokenizer.pad_token_id, eos_token_id=assets.tokenizer.eos_token_id)
        text = Qwen2Config(hidden_size=512, num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                           intermediate_size=1408, vocab_size=args.vocab, tie_word_embeddings=False)
        config = InternVLConfig(vision_config=demo.vision_config.to_dict(), text_config=text.to_dict(),
                                image_token_id=demo.image_token_id, image_seq_length=demo.image_seq_length,
                                tie_word_embeddings=False)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        with zero3_model_scope(ds_config):
            model = InternVLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    engine = frozen_engine(model, ds_config)
    model_bytes = sum(p.ds_numel for p in model.parameters()) * 2

    barrier()
    before = _reset_peak()
    t0 = time.perf_counter()
    export_hf(engine, assets=assets, out_dir=out / "streaming", meta={}, shard_size=args.shard_size)
    streaming_s = time.perf_counter() - t0
    streaming_peak = _status("VmHWM") - before

    barrier()
    before = _reset_peak()
    t0 = time.perf_counter()
    state = gathered_state_dict(engine)
    if dist.is_main:  # as export_hf did: without the load-time key renamings, which double prefixes here
        loaded_with, model._weight_conversions = getattr(model, "_weight_conversions", None), None
        model.save_pretrained(out / "baseline", state_dict=state)
        model._weight_conversions = loaded_with
    barrier()
    baseline_s = time.perf_counter() - t0
    baseline_peak = _status("VmHWM") - before
    del state

    if dist.is_main:
        files = sorted((out / "streaming").glob("model-*.safetensors"))
        result = {
            "cpu": "Intel Xeon (family 6 model 167), 2 cores shared with other jobs",
            "ranks": dist.world_size, "model_bytes": model_bytes, "shard_size": parse_size(args.shard_size),
            "shards": len(files), "streaming_peak_bytes": streaming_peak, "baseline_peak_bytes": baseline_peak,
            "streaming_s": streaming_s, "baseline_s": baseline_s,
            "model_dir": args.model_dir, "load_s": load_s, "rank_peak_rss_after_load_bytes": loaded_peaks,
        }
        if load_s is not None:
            print(f"load (partitioned, model.init_from path) {load_s:.1f}s; peak RSS per rank after loading: "
                  + ", ".join(f"{b / 1e9:.2f} GB" for b in loaded_peaks))
        print(f"model {model_bytes / 1e6:.1f} MB bf16, shard size {args.shard_size}: {len(files)} shards")
        print(f"rank 0 peak RSS added by the export: streaming {streaming_peak / 1e6:.1f} MB ({streaming_s:.1f}s), "
              f"whole state dict {baseline_peak / 1e6:.1f} MB ({baseline_s:.1f}s)")
        t0 = time.perf_counter()
        stock = AutoModelForImageTextToText.from_pretrained(out / "streaming", dtype=torch.bfloat16)
        result["stock_load_s"] = time.perf_counter() - t0
        reference = hf_weights(out / "baseline")
        for name, value in stock.state_dict().items():
            assert torch.equal(value, reference[name].load()), name
        print(f"stock transformers loads the sharded export ({result['stock_load_s']:.1f}s); every tensor equals "
              "the whole-state-dict export")
        results = REPO / "benchmarks" / "results"
        results.mkdir(parents=True, exist_ok=True)
        (results / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    barrier()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
