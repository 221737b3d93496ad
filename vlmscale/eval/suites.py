"""Evaluation suites over a held-out directory in the vlmscale schema.

Each rank scores a disjoint slice (sample ``i`` goes to rank ``i % world``), results are
gathered and scored on every rank, so 1 and N ranks give identical metrics.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

from vlmscale.data.render import render_prompt
from vlmscale.data.shards import ShardDataset
from vlmscale.engine.distributed import DistInfo, all_gather_objects
from vlmscale.eval.generate import generate
from vlmscale.eval.metrics import exact_match, iou, parse_box, pope_scores, yes_no
from vlmscale.model.tokenizer import ProcessorAssets

log = logging.getLogger(__name__)
SUITES = ("vqa", "grounding", "pope")


def _answers(model, assets, data: Path, *, dist: DistInfo, max_samples: int, max_new_tokens: int,
             synced_gpus: bool = False) -> list[tuple[dict, str]]:
    ds = ShardDataset(data)
    n = len(ds) if max_samples <= 0 else min(max_samples, len(ds))
    mine = list(range(dist.rank, n, dist.world_size))
    records, prompts = [], []
    for i in mine:
        ref, members = ds.read(i)
        rec = json.loads(members["json"])
        records.append((i, rec))
        prompts.append(render_prompt(rec["messages"], members, assets))
    preds = generate(model, assets, prompts, max_new_tokens=max_new_tokens, synced_gpus=synced_gpus)
    gathered = all_gather_objects([(i, rec, p) for (i, rec), p in zip(records, preds)])
    rows = sorted((row for part in gathered for row in part), key=lambda r: r[0])
    return [(rec, pred) for _, rec, pred in rows]


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
        out[qtype] = {
            "n": len(hits),
            "accuracy": sum(hits) / len(hits),
            "chance": 1.0 / len(golds[qtype]),
            "majority": golds[qtype].most_common(1)[0][1] / len(hits),
        }
    all_hits = [h for hits in by_type.values() for h in hits]
    out["overall"] = {"n": len(all_hits), "accuracy": sum(all_hits) / max(1, len(all_hits))}
    return out


def score_grounding(rows: list[tuple[dict, str]]) -> dict:
    ious, unparsable = [], 0
    for rec, pred in rows:
        gold = parse_box(rec["answer"])
        box = parse_box(pred)
        if box is None:
            unparsable += 1
            ious.append(0.0)
        else:
            ious.append(iou(box, gold))
    n = len(ious)
    return {"n": n, "acc@0.5": sum(v >= 0.5 for v in ious) / max(1, n), "mean_iou": sum(ious) / max(1, n),
            "unparsable": unparsable}


def score_pope(rows: list[tuple[dict, str]]) -> dict:
    splits: dict[str, list] = defaultdict(list)
    for rec, pred in rows:
        splits[rec.get("split", "all")].append((yes_no(pred), rec["answer"]))
    return {split: pope_scores(pairs) for split, pairs in sorted(splits.items())}


def run_suites(model, assets: ProcessorAssets, heldout: Path, suites: list[str], *, dist: DistInfo,
               max_samples: int = 0, max_new_tokens: int = 24, synced_gpus: bool = False) -> dict:
    results = {}
    scorers = {"vqa": score_vqa, "grounding": score_grounding, "pope": score_pope}
    for suite in suites:
        if suite not in scorers:
            raise ValueError(f"unknown eval suite {suite!r}; known: {sorted(scorers)}")
        data = heldout / suite
        if not data.exists():
            raise ValueError(f"eval suite {suite!r}: {data} does not exist")
        rows = _answers(model, assets, data, dist=dist, max_samples=max_samples, max_new_tokens=max_new_tokens,
                        synced_gpus=synced_gpus)
        results[suite] = scorers[suite](rows)
        results[suite + "_examples"] = [{"q": r["messages"][-1]["content"][-1]["text"], "gold": r["answer"], "pred": p}
                                        for r, p in rows[:8]]
    return results


def format_table(results: dict) -> str:
    lines = []
    if "vqa" in results:
        lines.append(f"{'vqa type':<12}{'n':>6}{'accuracy':>10}{'chance':>9}{'majority':>10}")
        for qtype, r in results["vqa"].items():
            if qtype == "overall":
                continue
            lines.append(f"{qtype:<12}{r['n']:>6}{r['accuracy']:>10.3f}{r['chance']:>9.3f}{r['majority']:>10.3f}")
        o = results["vqa"]["overall"]
        lines.append(f"{'overall':<12}{o['n']:>6}{o['accuracy']:>10.3f}")
    if "grounding" in results:
        g = results["grounding"]
        lines.append(f"grounding   n={g['n']} acc@0.5={g['acc@0.5']:.3f} mean_iou={g['mean_iou']:.3f} unparsable={g['unparsable']}")
    if "pope" in results:
        lines.append(f"{'pope split':<12}{'n':>6}{'acc':>7}{'prec':>7}{'rec':>7}{'f1':>7}{'yes%':>7}")
        for split, r in results["pope"].items():
            lines.append(f"{split:<12}{r['n']:>6}{r['accuracy']:>7.3f}{r['precision']:>7.3f}{r['recall']:>7.3f}{r['f1']:>7.3f}{r['yes_ratio']:>7.3f}")
    return "\n".join(lines)
