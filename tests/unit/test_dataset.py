import io
import json

import pytest
from PIL import Image

from vlmscale.data.convert import convert_llava
from vlmscale.data.dataset import TrainDataset, collate
from vlmscale.data.shards import ShardDataset, ShardWriter


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _good(i):
    return {"id": f"good{i}", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "img0.png"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "green"}]}]}


BAD = {
    "corrupt_image": ({"id": "b1", "messages": _good(0)["messages"]}, {"img0.png": b"\x89PNG broken"}),
    "missing_image": ({"id": "b2", "messages": _good(0)["messages"]}, {}),
    "placeholder_mismatch": ({"id": "b3", "messages": [{"role": "user", "content": "<image><image>Q"},
                                                      {"role": "assistant", "content": "A"}], "images": ["img0.png"]},
                             {"img0.png": _png()}),
    "no_assistant_turn": ({"id": "b4", "messages": [{"role": "user", "content": "Q"}]}, {}),
    "too_long": ({"id": "b5", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "x " * 400}]}, {}),
}


@pytest.fixture()
def mixed_shards(tmp_path):
    w = ShardWriter(tmp_path / "mixed", max_count=7)
    for i in range(20):
        members = {"img0.png": _png()}
        w.write(f"good{i:03d}", {"json": json.dumps(_good(i)).encode(), **members})
    for reason, (rec, members) in BAD.items():
        w.write(f"bad-{reason.replace('_', '-')}", {"json": json.dumps(rec).encode(), **members})
    w.write("bad-json", {"json": b"{not json"})
    w.close()
    return tmp_path / "mixed"


def test_bad_samples_are_replaced_and_counted(mixed_shards, tiny_assets):
    src = ShardDataset(mixed_shards)
    assert len(src) == 26
    ds = TrainDataset(sources=[src], names=["mixed"], weights=[1.0], assets=tiny_assets, max_seq_len=256, seed=5)
    items = [ds[p] for p in range(26)]
    reasons = sorted(r for it in items for r in it.skipped)
    assert sorted(set(reasons)) == sorted(list(BAD) + ["bad_json"])
    assert all(it.sample_id.startswith("good") for it in items)
    again = TrainDataset(sources=[ShardDataset(mixed_shards)], names=["mixed"], weights=[1.0], assets=tiny_assets,
                         max_seq_len=256, seed=5)
    assert [again[p].sample_id for p in range(26)] == [it.sample_id for it in items]  # replacement is (seed, position) only
    batch = collate(items[:4], pad_id=tiny_assets.tokenizer.pad_token_id)
    assert batch["num_read"] == 4 + sum(len(it.skipped) for it in items[:4])


def test_convert_llava_roundtrip(tmp_path, tiny_assets):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    data = [
        {"id": "x1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                         {"from": "gpt", "value": "green"}]},
        {"id": "x2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "x3", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(data))
    counts = convert_llava(tmp_path / "llava.json", image_root=root, out_dir=tmp_path / "shards")
    assert counts == {"written": 2, "skipped/missing_image": 1}
    ds = TrainDataset(sources=[ShardDataset(tmp_path / "shards")], names=["llava"], weights=[1.0], assets=tiny_assets,
                      max_seq_len=256, seed=0)
    ids = {ds[p].sample_id for p in range(4)}
    assert ids == {"x1", "x2"}


_DEMO_DIGEST = """
import hashlib, sys, tarfile, pathlib
from vlmscale.data.demo import generate_demo
p = pathlib.Path(sys.argv[1])
generate_demo(p, num_train_scenes=60, num_heldout_scenes=10)
h = hashlib.sha256()
for f in sorted(p.rglob('*.tar')):
    with tarfile.open(f) as t:
        for m in t:
            h.update(m.name.encode()); h.update(t.extractfile(m).read())
print(h.hexdigest())
"""


def test_demo_generation_is_independent_of_hash_seed(tmp_path):
    """The demo data must be a function of its seed alone (sets iterate in PYTHONHASHSEED order)."""
    import os
    import subprocess
    import sys

    digests = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", _DEMO_DIGEST, str(tmp_path / hash_seed)], env=env,
                             capture_output=True, text=True, check=True).stdout
        digests.append(out.strip().splitlines()[-1])
    assert digests[0] == digests[1]


def test_host_state_counts_what_the_optimizer_rewrites_in_host_memory():
    import torch

    from vlmscale.train.setup import host_state_bytes

    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10))  # 110 parameters each
    model[1].requires_grad_(False)
    zero3 = {"zero_optimization": {"stage": 3}}
    assert host_state_bytes(model, zero3, cuda=False) == 110 * (2 + 12) + 110 * 2  # CPU: everything
    assert host_state_bytes(model, zero3, cuda=True) == 0  # GPU: nothing
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert host_state_bytes(model, offload, cuda=True) == 110 * 12  # the trained layer's master + Adam
    both = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}}
    assert host_state_bytes(model, both, cuda=True) == host_state_bytes(model, zero3, cuda=False)


def test_workers_from_the_fork_server_give_the_forked_workers_batches(mixed_shards, tiny_assets):
    import functools

    import torch

    from vlmscale.train.preemption import ignore_stop_signals
    from vlmscale.train.setup import FORKSERVER_ABOVE_BYTES, worker_context

    assert worker_context(FORKSERVER_ABOVE_BYTES) is None  # small models keep the cheaper fork
    ctx = worker_context(FORKSERVER_ABOVE_BYTES + 1)
    assert ctx.get_start_method() == "forkserver"
    ds = TrainDataset(sources=[ShardDataset(mixed_shards)], names=["mixed"], weights=[1.0], assets=tiny_assets,
                      max_seq_len=256, seed=5)
    batches = {}
    for name, context in (("fork", None), ("forkserver", ctx)):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, worker_init_fn=ignore_stop_signals,
                                             collate_fn=functools.partial(collate, pad_id=0),
                                             multiprocessing_context=context)
        batches[name] = [b for _, b in zip(range(3), loader)]
    for a, b in zip(batches["fork"], batches["forkserver"]):
        assert a["sample_ids"] == b["sample_ids"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
