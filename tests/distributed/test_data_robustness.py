"""Bad input during a real run: skipped, counted by reason, logged; too much of it stops the run.

Also: LLaVA JSON converted by `vlmscale data convert llava` trains through a config override.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, launch, metrics
from vlmscale.data.shards import ShardDataset, ShardWriter

pytestmark = pytest.mark.distributed
REASONS = ("corrupt_image", "missing_image", "placeholder_mismatch", "no_assistant_turn", "too_long")


@pytest.fixture(scope="module")
def llava_shards(tmp_path_factory, demo_dir):
    """LLaVA JSON over demo images, with one sample of each kind of bad input mixed in."""
    root = tmp_path_factory.mktemp("llava")
    images = root / "images"
    images.mkdir()
    src = ShardDataset(demo_dir / "train" / "captions")
    items = []
    for i in range(40):
        _, members = src.read(i)
        rec = json.loads(members["json"])
        (images / f"{i}.png").write_bytes(members["img0.png"])
        items.append({"id": f"ok{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": rec["messages"][1]["content"][0]["text"]}]})
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    items += [
        {"id": "bad-corrupt", "image": "corrupt.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "bad-mismatch", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\n<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "bad-noanswer", "image": "1.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]},
        {"id": "bad-long", "image": "2.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "word " * 2000}]},
    ]
    (root / "llava.json").write_text(json.dumps(items))
    proc = subprocess.run([sys.executable, "-m", "vlmscale.cli", "data", "convert", "llava", "--json", str(root / "llava.json"),
                           "--image-root", str(images), "--out", str(root / "shards")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["written"] == 44
    # a missing image member cannot come out of the converter (it checks files); write one directly
    w = ShardWriter(root / "shards" / "extra")
    w.write("missingmember", {"json": json.dumps({"id": "bad-missing", "messages": [
        {"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}], "images": ["img0.png"]}).encode()})
    w.close()
    # mostly bad: 2 good samples, 8 with a missing image member
    w = ShardWriter(root / "mostly_bad")
    for i in range(10):
        _, members = src.read(i)
        if i < 2:
            w.write(f"good{i}", {"json": members["json"], "img0.png": members["img0.png"]})
        else:
            w.write(f"bad{i}", {"json": members["json"]})
    w.close()
    return root / "shards"


def test_llava_trains_and_bad_samples_are_counted(llava_shards, demo_dir, tmp_path):
    out = tmp_path / "run"
    source = f"data.sources=[{{name: llava, path: '{llava_shards}', weight: 1}}]"
    proc = launch("sft", f"output_dir={out}", "model.preset=tiny", f"data.demo_dir={demo_dir}", source,
                  "train.max_steps=6", "train.micro_batch_size=4", "train.log_every_steps=1", "checkpoint.every_steps=100",
                  "data.max_bad_fraction=0.5", "eval.at_end=false")
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    last = rows[-1]
    assert last["samples"] == 6 * 4 * 2  # every step trained a full batch: bad samples were replaced
    counted = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("skipped/")}
    assert set(counted) == set(REASONS), counted  # 45 samples, 48 positions: each bad one read at least once
    assert last["bad_samples"] == sum(counted.values())
    for reason in REASONS:
        assert f"skipping sample ({reason})" in proc.stderr


def test_too_many_bad_samples_stop_the_run(llava_shards, demo_dir, tmp_path):
    out = tmp_path / "run"
    mostly_bad = llava_shards.parent / "mostly_bad"
    source = f"data.sources=[{{name: mostly_bad, path: '{mostly_bad}', weight: 1}}]"
    proc = launch("sft", f"output_dir={out}", "model.preset=tiny", f"data.demo_dir={demo_dir}", source,
                  "train.max_steps=20", "train.micro_batch_size=4", "checkpoint.every_steps=100",
                  "data.max_bad_fraction=0.2", "data.bad_check_after=16", "eval.at_end=false", check=False)
    assert proc.returncode != 0
    assert "above data.max_bad_fraction=0.2" in proc.stderr
