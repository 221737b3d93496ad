"""Packed vs unpacked per-sample losses on a real model, in fp32 and bf16 (the tolerance docs/data.md states).

    python benchmarks/packing_equivalence.py --model runs/sft-demo/hf --samples 48 \
        --out benchmarks/results/packing_equivalence.json

Each sample's mean loss over its supervised tokens is computed alone (one unpadded row) and inside
packed rows (``pack_collate``, ``max_seq_len`` tokens per row); the table gives the largest absolute
difference per dtype and attention implementation, and, as a control, the difference when the packed
rows get a plain causal mask instead of the block-diagonal one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vlmscale.config import SFTConfig, load_config
from vlmscale.data.dataset import TrainDataset, collate, open_sources, pack_collate
from vlmscale.model import forward
from vlmscale.model.build import load_pretrained
from vlmscale.model.forward import token_losses, vlm_logits


def _causal_only(position_ids: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    n = position_ids.shape[-1]
    allowed = torch.ones((n, n), dtype=torch.bool).tril()
    mask = torch.zeros((n, n), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.expand(position_ids.shape[0], 1, n, n)


def per_sample_losses(model, items, *, pad: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alone, packed) mean loss per sample, over the tokens a sample supervises after its first."""
    batch = pack_collate(items, pad_id=pad, max_len=max_len)
    with torch.no_grad():
        packed = token_losses(vlm_logits(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         pixel_values=batch["pixel_values"], tile_pool=batch["tile_pool"],
                                         position_ids=batch["position_ids"], packed=True), batch["labels"])
        alone, inside = [], []
        for r, row in enumerate(batch["rows"]):
            start = 0
            for i in row:
                b = collate([items[i]], pad_id=pad)
                ref = token_losses(vlm_logits(model, input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                              pixel_values=b["pixel_values"], tile_pool=b["tile_pool"]), b["labels"])[0]
                n = b["input_ids"].shape[1]
                sup = int((b["labels"][0, 1:] != -100).sum())
                alone.append(ref.sum() / sup)
                inside.append(packed[r, start:start + n - 1].sum() / sup)
                start += n
    return torch.stack(alone).float(), torch.stack(inside).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an HF-format InternVL export, e.g. <output_dir>/hf")
    parser.add_argument("--demo-dir", default="data/demo")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/packing_equivalence.json")
    args = parser.parse_args()
    cfg = load_config(SFTConfig, overrides=[f"data.demo_dir={args.demo_dir}"])
    results = []
    for attn in ("sdpa", "eager"):
        for dtype in (torch.float32, torch.bfloat16):
            model_cfg = load_config(SFTConfig, overrides=[f"model.attn_implementation={attn}"]).model
            model, assets = load_pretrained(args.model, max_tiles=cfg.data.max_tiles, dtype=dtype, cfg=model_cfg)
            model.eval()
            dataset = TrainDataset(sources=open_sources(cfg.data), names=[s.name for s in cfg.data.sources],
                                   weights=cfg.data.mixture_weights(), assets=assets, max_seq_len=args.max_seq_len,
                                   seed=cfg.train.seed, video=cfg.data.video)
            items = [dataset[p] for p in range(args.samples)]
            pad = assets.tokenizer.pad_token_id
            alone, inside = per_sample_losses(model, items, pad=pad, max_len=args.max_seq_len)
            isolated = forward.packed_attention_mask
            forward.packed_attention_mask = _causal_only
            try:
                _, mixed = per_sample_losses(model, items, pad=pad, max_len=args.max_seq_len)
            finally:
                forward.packed_attention_mask = isolated
            leaked = (mixed - alone).abs()
            results.append({"attn": attn, "dtype": str(dtype).removeprefix("torch."),
                            "mean_loss": float(alone.mean()), "max_abs_diff": float((inside - alone).abs().max()),
                            "no_isolation_median_abs_diff": float(leaked[leaked > 0].median()) if bool((leaked > 0).any()) else 0.0})
    print(f"{args.samples} samples of the demo SFT mixture, model {args.model}, rows of {args.max_seq_len}")
    print(f"{'attn':<6} {'dtype':<9} {'mean loss':>9} {'max |packed - alone|':>21} {'no isolation (median)':>22}")
    for r in results:
        print(f"{r['attn']:<6} {r['dtype']:<9} {r['mean_loss']:>9.4f} {r['max_abs_diff']:>21.2e} "
              f"{r['no_isolation_median_abs_diff']:>22.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "samples": args.samples, "max_seq_len": args.max_seq_len,
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
