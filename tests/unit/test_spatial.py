"""Layout questions of the demo data and the spatial eval suite."""

import json
import random

from vlmscale.data.demo import spatial_questions
from vlmscale.data.shards import ShardDataset
from vlmscale.demo_vocab import Obj
from vlmscale.eval.suites import format_table, run_suites


def _obj(colour: str, shape: str, row: int, col: int) -> Obj:
    return Obj(colour, shape, row, col, (col * 16 + 2, row * 16 + 2, col * 16 + 14, row * 16 + 14))


def test_order_reads_columns_left_to_right():
    scene = [_obj("red", "circle", 0, 2), _obj("blue", "square", 2, 0), _obj("green", "triangle", 1, 1)]
    qs = {t: (q, a) for t, q, a in spatial_questions(scene, random.Random(0))}
    assert qs["order"] == ("Name the objects from left to right.", "blue square, green triangle, red circle")
    q, a = qs["relative"]
    first, second = q.split(" object")[0].split()[-1], q.split("of the ")[1].split()[0]
    cols = {o.colour: o.col for o in scene}
    assert a == ("left" if cols[first] < cols[second] else "right")


def test_no_layout_question_when_ambiguous():
    same_column = [_obj("red", "circle", 0, 1), _obj("blue", "square", 2, 1)]
    assert spatial_questions(same_column, random.Random(0)) == []
    shared = [_obj("red", "circle", 0, 1), _obj("blue", "square", 2, 1), _obj("green", "circle", 1, 0)]
    assert [t for t, _, _ in spatial_questions(shared, random.Random(0))] == ["relative"]  # no order: a column is shared


def test_demo_has_spatial_sources(demo_dir):
    train = [json.loads(ShardDataset(demo_dir / "train" / "spatial").read(i)[1]["json"]) for i in range(20)]
    assert all(len(r["messages"]) >= 2 for r in train)
    heldout = ShardDataset(demo_dir / "heldout" / "spatial")
    types = {json.loads(heldout.read(i)[1]["json"])["qtype"] for i in range(len(heldout))}
    assert types == {"order", "relative"}


def test_spatial_suite_scores_per_type(demo_dir):
    import torch

    from vlmscale.config import SFTConfig, load_config
    from vlmscale.model.build import build_model, load_weights_plain

    torch.manual_seed(0)
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny"])
    model, assets = build_model(cfg.model, max_tiles=4, dtype=torch.float32, load_weights=load_weights_plain)
    out = run_suites(model, assets, demo_dir / "heldout", ["spatial"], max_samples=6, max_new_tokens=4)
    assert set(out["spatial"]) - {"overall"} <= {"order", "relative"}
    assert out["spatial"]["overall"]["n"] == 6
    assert "spatial type" in format_table(out)

