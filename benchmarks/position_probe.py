"""Does object position reach the LLM? Linear probes on the demo model's image tokens (issue #20).

For rendered demo scenes, each object sits in one 16-px cell = one image token (3x3 tokens per 48-px
tile). For every object this takes the image token of its own cell at three points of the model, the
vision encoder's output (after pixel shuffle), the projector's output, and optionally the
projector's output with the model's 2-D position cue added (``model.vision_pos_embed``), and fits a
ridge-regression linear probe (one-hot targets, argmax) for the object's column, its row and its
colour, on training scenes, scored on other scenes. Chance is 1/3 for column and row, 1/6 for colour. It also reports each
label's share of the features' variance (between-class / total): how loud the signal is, not only whether
a linear read-out exists.

A high column accuracy means the token that shows an object also says where it is, so the LLM can
read position with the same attention that finds the object; a low one means the LLM has to infer
position from the token's place in the sequence (its RoPE position), which the demo's small LLM
does not learn in a short run.

    python benchmarks/position_probe.py                      # the demo preset as SFT builds it (seed 1234)
    python benchmarks/position_probe.py --model runs/sft-demo/hf
    python benchmarks/position_probe.py --position-scale 0   # the same encoder without its sin-cos table
"""

from __future__ import annotations

import argparse
import io
import json
import random

import torch
from PIL import Image

from vlmscale.config.schema import ModelConfig
from vlmscale.data.demo import render_scene
from vlmscale.demo_vocab import COLOURS, sample_scene


def variance_share(x, y) -> float:
    """Share of the features' total variance that lies between the classes of ``y`` (1 = all of it)."""
    total = (x - x.mean(0)).pow(2).sum()
    between = sum((y == c).sum() * (x[y == c].mean(0) - x.mean(0)).pow(2).sum() for c in y.unique())
    return float(between / total)


def _ridge_probe(x_train, y_train, x_test, y_test, classes: int, lam: float = 1e-2) -> float:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xa = torch.cat([(x_train - mu) / sd, torch.ones(len(x_train), 1, dtype=x_train.dtype)], 1)
    xb = torch.cat([(x_test - mu) / sd, torch.ones(len(x_test), 1, dtype=x_test.dtype)], 1)
    target = torch.nn.functional.one_hot(y_train, classes).to(xa.dtype)
    w = torch.linalg.solve(xa.T @ xa + lam * len(xa) * torch.eye(xa.shape[1], dtype=xa.dtype), xa.T @ target)
    return float(((xb @ w).argmax(1) == y_test).float().mean())


@torch.no_grad()
def collect(model, assets, scenes: int, seed: int):
    rng = random.Random(seed)
    inner = model.model
    colours = list(COLOURS)
    feats = {"encoder": [], "projector": []}
    labels = {"column": [], "row": [], "colour": []}
    for _ in range(scenes):
        objs = sample_scene(rng)
        img = Image.open(io.BytesIO(render_scene(objs, rng))).convert("RGB")
        pixels = assets.image_processor(images=[img], return_tensors="pt")["pixel_values"][:1]
        hidden = inner.vision_tower(pixel_values=pixels.to(model.dtype)).last_hidden_state[:, 1:]
        grid = int(hidden.shape[1] ** 0.5)
        shuffled = inner.pixel_shuffle(hidden.reshape(1, grid, grid, -1), scale_factor=model.config.downsample_ratio)
        shuffled = shuffled.reshape(1, -1, shuffled.shape[-1])
        projected = inner.get_image_features(pixel_values=pixels.to(model.dtype), return_dict=True).pooler_output
        side = int(shuffled.shape[1] ** 0.5)
        for o in objs:
            token = o.row * side + o.col
            feats["encoder"].append(shuffled[0, token].float())
            feats["projector"].append(projected[0, token].float())
            labels["column"].append(o.col)
            labels["row"].append(o.row)
            labels["colour"].append(colours.index(o.colour))
    return {k: torch.stack(v).double() for k, v in feats.items()}, {k: torch.tensor(v) for k, v in labels.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="an HF export (default: the demo preset, freshly built)")
    ap.add_argument("--seed", type=int, default=1234, help="model init seed (train.seed)")
    ap.add_argument("--position-scale", type=float, default=None, help="override build.POSITION_SCALE (preset only)")
    ap.add_argument("--train-scenes", type=int, default=600)
    ap.add_argument("--test-scenes", type=int, default=300)
    args = ap.parse_args(argv)

    from vlmscale.model import build

    if args.position_scale is not None:
        build.POSITION_SCALE = args.position_scale
    torch.manual_seed(args.seed)
    if args.model:
        model, assets = build.load_pretrained(args.model, max_tiles=None, dtype=torch.float32)
    else:
        cfg = ModelConfig()
        model, assets = build.build_model(cfg, max_tiles=None, dtype=torch.float32, load_weights=build.load_weights_plain)
    model.eval()
    xa, ya = collect(model, assets, args.train_scenes, seed=1)
    xb, yb = collect(model, assets, args.test_scenes, seed=2)
    out = {}
    for where in xa:
        out[where] = {what: round(_ridge_probe(xa[where], ya[what], xb[where], yb[what], int(ya[what].max()) + 1), 3)
                      for what in ("column", "row", "colour")}
        out[where].update({f"{what}_variance_share": round(variance_share(xa[where], ya[what]), 3)
                           for what in ("column", "row", "colour")})
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
