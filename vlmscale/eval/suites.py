"""Evaluation suites over a held-out directory in the vlmscale schema.

Suites: ``vqa`` (exact match per question type), ``spatial`` (the same, on layout questions: objects
read left to right, relative position), ``grounding`` (box IoU), ``pope`` (yes/no object
probes per negative type), ``text`` (text-only loss and perplexity), ``drift`` (vision-encoder
feature cosine to a reference). Work is dealt to ranks in world-size-independent batches and
results are combined in sample order, so 1 and N ranks give identical metrics; every function
here is collective when a process group exists.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path

import torch

from vlmscale.config.schema import EVAL_SUITES, VideoConfig
from vlmscale.data.dataset import Item, collate
from vlmscale.data.render import Rendered, render_prompt, render_sample
from vlmscale.data.shards import ShardDataset
from vlmscale.distributed.group import all_gather_objects, dealt_rounds, model_device
from vlmscale.eval.generate import DEFAULT_GATHER_MAX_BYTES, VCDConfig, generate
from vlmscale.eval.metrics import exact_match, iou, parse_box, pope_scores, yes_no
from vlmscale.model.forward import token_losses, vlm_logits
from vlmscale.model.tokenizer import ProcessorAssets

log = logging.getLogger(__name__)
GENERATIVE = ("vqa", "spatial", "video", "grounding", "pope")
LOSS_SUITES = ("text", "caption")  # held-out supervised-token loss: text-only / image captions
SUITES = EVAL_SUITES
assert set(SUITES) == set(GENERATIVE + LOSS_SUITES + ("drift",))
SUITE_DATA = {"caption": "captions", "drift": "captions"}  # suite -> held-out folder, when not its own name


def _records(data: Path, max_samples: int) -> list[tuple[dict, dict[str, bytes]]]:
    ds = ShardDataset(data)
    n = len(ds) if max_samples <= 0 else min(max_samples, len(ds))
    out = []
    for i in range(n):
        _, members = ds.read(i)
        out.append((json.loads(members["json"]), members))
    return out


def _merge(part: dict[int, object]) -> dict[int, object]:
    merged: dict[int, object] = {}
    for d in all_gather_objects(part):
        merged.update(d)
    return merged


# ------------------------------------------------------------------ generative suites


def answer_all(model, assets, records, *, rank: int, world_size: int, max_new_tokens: int,
               vcd: VCDConfig | None, video: VideoConfig | None = None,
               gather_max_bytes: int | None = DEFAULT_GATHER_MAX_BYTES) -> list[str]:
    prompts = [render_prompt(rec["messages"], members, assets, video) for rec, members in records]
    mine = generate(model, assets, prompts, max_new_tokens=max_new_tokens, rank=rank, world_size=world_size, vcd=vcd,
                    gather_max_bytes=gather_max_bytes)
    merged = _merge(mine)
    return [merged[i] for i in range(len(prompts))]


def score_vqa(rows: list[tuple[dict, str]]) -> dict:
    by_type: dict[str, list[bool]] = defaultdict(list)
    golds: dict[str, Counter] = defaultdict(Counter)
    for rec, pred in rows:
        qtype = rec.get("qtype", "all")
        by_type[qtype].append(exact_match(pred, rec["answer"]))
        golds[qtype][rec["answer"]] += 1
    out = {}
    for qtype in sorted(by_type):
        hits = by_type[qtype]
        out[qtype] = {"n": len(hits), "accuracy": sum(hits) / len(hits), "chance": 1.0 / len(golds[qtype]),
                      "majority": golds[qtype].most_common(1)[0][1] / len(hits)}
    all_hits = [h for hits in by_type.values() for h in hits]
    out["overall"] = {"n": len(all_hits), "accuracy": sum(all_hits) / max(1, len(all_hits))}
    return out


def score_grounding(rows: list[tuple[dict, str]]) -> dict:
    ious, unparsable = [], 0
    for rec, pred in rows:
        box = parse_box(pred)
        if box is None:
            unparsable += 1
            ious.append(0.0)
        else:
            ious.append(iou(box, parse_box(rec["answer"])))
    n = len(ious)
    return {"n": n, "acc@0.5": sum(v >= 0.5 for v in ious) / max(1, n), "mean_iou": sum(ious) / max(1, n),
            "unparsable": unparsable}


def score_pope(rows: list[tuple[dict, str]]) -> dict:
    splits: dict[str, list] = defaultdict(list)
    for rec, pred in rows:
        splits[rec.get("split", "all")].append((yes_no(pred), rec["answer"]))
    return {split: pope_scores(pairs) for split, pairs in sorted(splits.items())}


SCORERS = {"vqa": score_vqa, "spatial": score_vqa, "video": score_vqa, "grounding": score_grounding, "pope": score_pope}


# ------------------------------------------------------------------ text retention


@torch.no_grad()
def text_loss(model, assets, records, *, rank: int, world_size: int, batch_size: int = 16) -> dict:
    """Mean supervised-token loss and perplexity of held-out conversations (``text``: text-only; ``caption``: with images)."""
    was_training = model.training
    model.eval()
    rendered = [render_sample(rec, members, assets, max_seq_len=1 << 20) for rec, members in records]
    batches = [list(range(i, min(i + batch_size, len(rendered)))) for i in range(0, len(rendered), batch_size)]
    pad = assets.tokenizer.pad_token_id
    dev = model_device(model)
    mine: dict[int, tuple[float, int]] = {}
    for b in dealt_rounds(len(batches), rank=rank, world_size=world_size):
        idx = batches[b] if b is not None else [0]  # placeholder keeps collectives in step
        batch = collate([Item(rendered[i], str(i), 0, []) for i in idx], pad_id=pad)
        pixels = batch["pixel_values"]
        logits = vlm_logits(model, input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                            pixel_values=None if pixels is None else pixels.to(dev), tile_pool=batch["tile_pool"])
        losses = token_losses(logits, batch["labels"].to(dev)).double()
        if b is not None:
            mine[b] = (float(losses.sum()), int((batch["labels"][:, 1:] != -100).sum()))
    merged = _merge(mine)
    total = sum(merged[b][0] for b in range(len(batches)))
    count = sum(merged[b][1] for b in range(len(batches)))
    model.train(was_training)
    loss = total / max(count, 1)
    return {"n": len(rendered), "tokens": count, "loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# ------------------------------------------------------------------ encoder drift


@torch.no_grad()
def encoder_features(model, assets, records, *, rank: int, world_size: int, batch_size: int = 16) -> dict[int, torch.Tensor]:
    """This rank's share of per-image vision-encoder patch features (first image of each record)."""
    was_training = model.training
    model.eval()
    images: list[Rendered] = []
    for rec, members in records:
        first = next(p for m in rec["messages"] for p in (m["content"] if isinstance(m["content"], list) else [])
                     if p.get("type") == "image")
        images.append(render_prompt([{"role": "user", "content": [first]}], members, assets))
    batches = [list(range(i, min(i + batch_size, len(images)))) for i in range(0, len(images), batch_size)]
    tower = model.model.vision_tower
    dtype = next(model.model.multi_modal_projector.parameters()).dtype
    size = model.config.vision_config.image_size
    dev = model_device(model)
    feats: dict[int, torch.Tensor] = {}
    for b in dealt_rounds(len(batches), rank=rank, world_size=world_size):
        if b is not None:
            pixels = torch.cat([images[i].pixel_values[-1:] for i in batches[b]])  # whole-image tile (thumbnail if tiled)
        else:  # placeholder keeps collectives in step
            pixels = torch.zeros(1, 3, size[0], size[1])
        hidden = tower(pixel_values=pixels.to(device=dev, dtype=dtype), return_dict=True).last_hidden_state[:, 1:].float()
        if b is not None:
            for row, i in enumerate(batches[b]):
                feats[i] = hidden[row].to(device="cpu", dtype=torch.bfloat16)  # kept (and saved) on the CPU
    model.train(was_training)
    return feats


def drift(current: dict[int, torch.Tensor], reference: dict[int, torch.Tensor]) -> dict:
    """Mean patch-wise cosine similarity between current and reference features (1.0 = no drift)."""
    if current.keys() != reference.keys():
        raise ValueError("drift: reference features were computed on different images or another world size")
    mine = {i: float(torch.nn.functional.cosine_similarity(current[i].float(), reference[i].float(), dim=-1).mean())
            for i in current}
    merged = _merge(mine)
    values = [merged[i] for i in sorted(merged)]
    return {"n": len(values), "cosine": sum(values) / max(1, len(values)), "min_cosine": min(values) if values else 0.0}


# ------------------------------------------------------------------ entry points


def drift_reference(model, assets, heldout: Path, *, max_samples: int, rank: int, world_size: int) -> dict:
    """Reference encoder features for the drift suite: ``{"n_records": N, "features": {index: tensor}}``."""
    records = _records(heldout / SUITE_DATA["drift"], max_samples)
    feats = encoder_features(model, assets, records, rank=rank, world_size=world_size)
    return {"n_records": len(records), "features": feats}


def run_suites(model, assets: ProcessorAssets, heldout: Path, suites: list[str], *, rank: int = 0, world_size: int = 1,
               max_samples: int = 0, max_new_tokens: int = 24, vcd: VCDConfig | None = None,
               reference: dict | None = None, video: VideoConfig | None = None,
               gather_max_bytes: int | None = DEFAULT_GATHER_MAX_BYTES) -> dict:
    """Run ``suites``; drift compares with ``reference`` (from :func:`drift_reference`) on the same images."""
    results: dict = {}
    for suite in suites:
        if suite not in SUITES:
            raise ValueError(f"unknown eval suite {suite!r}; known: {list(SUITES)}")
        data = heldout / SUITE_DATA.get(suite, suite)
        if not data.exists():
            raise ValueError(f"eval suite {suite!r}: {data} does not exist")
        if suite == "drift":
            if reference is None:
                raise ValueError("the drift suite needs a reference model (--reference DIR, or eval during training)")
            records = _records(data, reference["n_records"])
        else:
            records = _records(data, max_samples)
        if suite in GENERATIVE:
            preds = answer_all(model, assets, records, rank=rank, world_size=world_size,
                               max_new_tokens=max_new_tokens, vcd=vcd, video=video, gather_max_bytes=gather_max_bytes)
            rows = [(rec, p) for (rec, _), p in zip(records, preds)]
            results[suite] = SCORERS[suite](rows)
            results[suite + "_examples"] = [
                {"q": rec["messages"][-1]["content"][-1]["text"], "gold": rec["answer"], "pred": p} for rec, p in rows[:8]]
        elif suite in LOSS_SUITES:
            results[suite] = text_loss(model, assets, records, rank=rank, world_size=world_size)
        else:
            current = encoder_features(model, assets, records, rank=rank, world_size=world_size)
            results["drift"] = drift(current, reference["features"])
    return results


def flatten(results: dict, prefix: str = "eval") -> dict[str, float]:
    """``{"eval/vqa/colour/accuracy": 0.9, ...}`` for metrics.jsonl and tensorboard."""
    flat: dict[str, float] = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            flat[path] = float(node)

    for suite, value in results.items():
        if not suite.endswith("_examples"):
            walk(value, f"{prefix}/{suite}")
    return flat


def format_table(results: dict) -> str:
    lines = []
    for suite in ("vqa", "spatial", "video"):
        if suite not in results:
            continue
        lines.append(f"{suite + ' type':<12}{'n':>6}{'accuracy':>10}{'chance':>9}{'majority':>10}")
        for qtype, r in results[suite].items():
            if qtype != "overall":
                lines.append(f"{qtype:<12}{r['n']:>6}{r['accuracy']:>10.3f}{r['chance']:>9.3f}{r['majority']:>10.3f}")
        if len(results[suite]) > 2:
            o = results[suite]["overall"]
            lines.append(f"{'overall':<12}{o['n']:>6}{o['accuracy']:>10.3f}")
    if "grounding" in results:
        g = results["grounding"]
        lines.append(f"grounding   n={g['n']} acc@0.5={g['acc@0.5']:.3f} mean_iou={g['mean_iou']:.3f} unparsable={g['unparsable']}")
    if "pope" in results:
        lines.append(f"{'pope split':<12}{'n':>6}{'acc':>7}{'prec':>7}{'rec':>7}{'f1':>7}{'yes%':>7}")
        for split, r in results["pope"].items():
            lines.append(f"{split:<12}{r['n']:>6}{r['accuracy']:>7.3f}{r['precision']:>7.3f}{r['recall']:>7.3f}"
                         f"{r['f1']:>7.3f}{r['yes_ratio']:>7.3f}")
    for suite in LOSS_SUITES:
        if suite in results:
            t = results[suite]
            lines.append(f"{suite:<12}n={t['n']} tokens={t['tokens']} loss={t['loss']:.4f} perplexity={t['perplexity']:.3f}")
    if "drift" in results:
        d = results["drift"]
        lines.append(f"drift       n={d['n']} cosine={d['cosine']:.4f} min={d['min_cosine']:.4f}")
    return "\n".join(lines)


def compare(a: dict, b: dict, *, names: tuple[str, str] = ("A", "B")) -> str:
    """Two results side by side with differences (B - A)."""
    fa, fb = flatten(a, ""), flatten(b, "")
    keys = sorted(set(fa) | set(fb))
    width = max([len(k) for k in keys] + [10])
    lines = [f"{'metric':<{width}} {names[0]:>12} {names[1]:>12} {'diff':>10}"]
    for k in keys:
        va, vb = fa.get(k), fb.get(k)
        diff = f"{vb - va:+10.4f}" if va is not None and vb is not None else f"{'':>10}"
        fmt = lambda v: f"{v:12.4f}" if v is not None else f"{'-':>12}"
        lines.append(f"{k.lstrip('/'):<{width}} {fmt(va)} {fmt(vb)} {diff}")
    return "\n".join(lines)
