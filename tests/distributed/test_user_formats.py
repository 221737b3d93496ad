"""Users' formats end to end: ShareGPT (multi-image, an mp4, a blank JSONL line), OpenAI content lists,
an InternVL meta file (per-source max_tiles), an HF parquet dataset and a source of decoding hazards,
converted and trained on together under the real 2-rank launcher; the export loads in stock
transformers. Then the resume guard: a changed source weight exits 2, the override resumes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests import user_formats as uf
from tests.helpers import REPO, launch, metrics
from vlmscale.data import convert as cv

pytestmark = pytest.mark.distributed
HAZARDS = {"bad-bomb": "decompression_bomb", "bad-truncated": "corrupt_image"}  # the rest convert and train


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    pytest.importorskip("av")
    pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("formats")
    # the CLI for one format (progress bar, summary, --image-root alias), the functions for the others
    proc = subprocess.run([sys.executable, "-m", "vlmscale.cli", "data", "convert", "sharegpt",
                           "--json", str(uf.sharegpt_file(root, n=8, video=True)), "--image-root", str(root / "media"),
                           "--out", str(root / "sharegpt"), "--workers", "2", "--video-frames", "4"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"written": 11, "skipped/missing_image": 1, "skipped/unreadable_video": 1}
    assert "samples/s" in proc.stderr or " samples" in proc.stderr  # the tqdm bar
    cv.convert_openai(uf.openai_file(root, n=6), image_root=root / "media", out_dir=root / "openai")
    internvl = cv.convert_internvl(uf.internvl_meta(root, n=6), out_dir=root / "internvl")["sources"]
    cv.convert_hf(uf.hf_parquet(root, n=6), out_dir=root / "hf_shards")
    cv.convert_sharegpt(uf.bad_input_file(root, n_good=4), image_root=root / "bad_media", out_dir=root / "bad")
    listed = [{"name": "sharegpt", "path": str(root / "sharegpt"), "weight": 1.0},
              {"name": "openai", "path": str(root / "openai"), "weight": 0.5},
              *[{**s, "weight": s["weight"] / 12} for s in internvl],  # 6 and 3 samples' worth -> 0.5, 0.25
              {"name": "hf", "path": str(root / "hf_shards"), "weight": 0.5},
              {"name": "bad", "path": str(root / "bad"), "weight": 3.0}]  # ~half: every hazard is read
    assert internvl[0]["max_tiles"] == 2
    return root, listed


def _sources_override(listed) -> str:
    return "data.sources=" + yaml.safe_dump(listed, default_flow_style=True, width=10**6).strip()


def _overrides(out, demo_dir, listed, *extra):
    return [f"output_dir={out}", "model.preset=tiny", f"data.demo_dir={demo_dir}", _sources_override(listed),
            "train.micro_batch_size=4", "train.log_every_steps=1", "train.log_sample_ids=true",
            "checkpoint.every_steps=4", "data.max_bad_fraction=0.5", "eval.at_end=false", *extra]


def test_converted_formats_train_export_and_guard_the_mixture(sources, demo_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    root, listed = sources
    out = tmp_path / "run"
    proc = launch("sft", *_overrides(out, demo_dir, listed, "train.max_steps=6"))
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert rows[-1]["samples"] == 6 * 4 * 2  # bad samples were replaced, every step full
    trained = {i for rank in (0, 1) for line in (out / "samples" / f"rank-{rank:05d}.jsonl").read_text().splitlines()
               for i in json.loads(line)["ids"]}
    counted = {k.split("/", 1)[1] for k in rows[-1] if k.startswith("skipped/")}
    assert set(HAZARDS.values()) <= counted, counted
    for reason in HAZARDS.values():
        assert f"skipping sample ({reason})" in proc.stderr
    # every other hazard (CMYK, 16-bit, palette + transparency, animated GIF, EXIF, 3 large photos) trained
    assert {"bad-cmyk", "bad-grey16", "bad-palette", "bad-animated", "bad-exif", "bad-large3"} <= trained, trained
    assert {"sg-video", "sg-multi", "oa-trl"} & trained and any(i.startswith("hf") for i in trained)
    AutoModelForImageTextToText.from_pretrained(out / "hf")  # the export loads in stock transformers

    # the resume guard: another weight for one source -> exit 2 naming it; the override resumes
    changed = [{**s, "weight": 3.0} if s["name"] == "openai" else s for s in listed]
    proc = launch("sft", *_overrides(out, demo_dir, changed, "train.max_steps=8"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "source 'openai' weight share" in proc.stderr and "resume_allow_data_change=true" in proc.stderr
    proc = launch("sft", *_overrides(out, demo_dir, changed, "train.max_steps=8", "resume_allow_data_change=true"))
    assert "resumed from" in proc.stderr
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 9))
