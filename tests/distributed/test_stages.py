"""Stage recipes on 2 ranks under ZeRO-3: align -> pretrain chained; frozen means bitwise frozen."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import launch, metrics

pytestmark = pytest.mark.distributed


def _params(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return {n: p.detach().clone() for n, p in AutoModelForImageTextToText.from_pretrained(path).named_parameters()}


def _check(before, after, trainable) -> None:
    assert before.keys() == after.keys()
    for name, w0 in before.items():
        changed = not torch.equal(w0, after[name])
        assert changed == trainable(name), f"{name}: changed={changed}"


def _stage(recipe, out, demo_dir, init_from, *extra):
    return launch(recipe, f"output_dir={out}", f"data.demo_dir={demo_dir}", f"model.init_from={init_from}",
                  "train.max_steps=4", "train.micro_batch_size=4", "train.log_every_steps=1", "checkpoint.every_steps=4",
                  "optim.lr=1e-2", "policy.projector.lr=1e-2", "optim.warmup_steps=1", "eval.final_max_samples=8", "eval.max_new_tokens=4", *extra)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, demo_dir, start_model):
    root = tmp_path_factory.mktemp("chain")
    _stage("align", root / "align", demo_dir, start_model)
    _stage("pretrain", root / "pretrain", demo_dir, root / "align" / "hf")
    return root


def test_align_trains_only_the_projector(chain, start_model):
    _check(_params(start_model), _params(chain / "align" / "hf"),
           trainable=lambda n: n.startswith("model.multi_modal_projector."))


def test_pretrain_starts_from_align_and_keeps_the_encoder(chain):
    _check(_params(chain / "align" / "hf"), _params(chain / "pretrain" / "hf"),
           trainable=lambda n: not n.startswith("model.vision_tower."))


def test_stage_outputs_and_eval(chain):
    for stage in ("align", "pretrain"):
        out = chain / stage
        rows = [r for r in metrics(out) if "loss" in r]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert (out / "checkpoints" / "step-00000004" / "COMMITTED").is_file()
        final = [r for r in metrics(out) if "eval/caption/loss" in r]
        assert final and final[-1]["step"] == 4
    # align scores its starting model too (eval.at_start) and its caption loss falls
    evals = {r["step"]: r["eval/caption/loss"] for r in metrics(chain / "align") if "eval/caption/loss" in r}
    assert sorted(evals) == [0, 4] and evals[4] < evals[0]


def test_lora_under_zero3_merges_into_a_stock_export(tmp_path, demo_dir, start_model):
    import json
    import subprocess
    import sys

    from tests.helpers import REPO
    from vlmscale.data.shards import ShardDataset

    out = tmp_path / "lora"
    _stage("sft", out, demo_dir, start_model, "lora.enabled=true", "lora.r=4", "policy.vision.trainable=false",
           "eval.at_end=false")
    before, after = _params(start_model), _params(out / "hf")
    # merged adapters change the adapted LLM projections; the encoder and the norms stay as they were
    _check(before, after, trainable=lambda n: n.startswith("model.multi_modal_projector.") or (
        n.startswith("model.language_model.layers.") and n.endswith("_proj.weight")))
    _, members = ShardDataset(demo_dir / "heldout" / "vqa").read(0)
    (tmp_path / "q.png").write_bytes(members["img0.png"])
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "hf_generate.py"), str(out / "hf"), str(tmp_path / "q.png"),
                           "What colour is the circle?"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["new_tokens"] >= 1


def test_video_trains_under_zero3_within_budget(tmp_path, demo_dir, start_model):
    """Video clips mixed with single images on 2 ranks: trains, loss falls, the video suite scores."""
    out = tmp_path / "video"
    sources = "data.sources=[{name: video, path: 'demo:train/video', weight: 1}, {name: vqa, path: 'demo:train/vqa', weight: 1}]"
    _stage("sft", out, demo_dir, start_model, sources, "data.video.max_frames=6", "data.video.pool=2",
           "data.video.token_budget=80", "train.max_steps=6", "eval.suites=[video]")
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["bad_samples"] == 0 for r in rows)  # no clip was over budget or skipped
    assert rows[-1]["loss"] < rows[0]["loss"]
    final = [r for r in metrics(out) if "eval/video/video/n" in r]
    assert final and final[-1]["eval/video/video/n"] == 8
