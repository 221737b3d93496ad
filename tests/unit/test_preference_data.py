"""Preference pairs: rendering, changed segments, collation, the RLAIF-V / RLHF-V converter, head export."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from vlmscale.constants import IGNORE
from vlmscale.data.convert import convert_preference
from vlmscale.data.dataset import Item
from vlmscale.data.preference import changed_tokens, pair_collate, render_pair
from vlmscale.data.render import BadSample, render_sample
from vlmscale.data.shards import ShardDataset


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PROMPT = [{"role": "user", "content": [{"type": "image", "image": "img0.png"}, {"type": "text", "text": "Describe the image."}]}]


def _record(**kw) -> dict:
    return {"messages": PROMPT, "chosen": "a red square at the top left.", "rejected": "a blue circle at the top left.", **kw}


def test_pair_renders_each_side_like_an_sft_sample_with_labels_only_on_the_answer(tiny_assets):
    members = {"img0.png": _png()}
    pair = render_pair(_record(), members, tiny_assets, max_seq_len=512)
    for side, text in ((pair.chosen, "a red square at the top left."), (pair.rejected, "a blue circle at the top left.")):
        sft = render_sample({"messages": PROMPT + [{"role": "assistant", "content": text}]}, members, tiny_assets, max_seq_len=512)
        assert side.input_ids == sft.input_ids and side.labels == sft.labels
        supervised = [t for t in side.labels if t != IGNORE]
        assert tiny_assets.tokenizer.decode(supervised).startswith(text)
    tok = tiny_assets.tokenizer
    changed_c = tok.decode([t for t, c in zip(pair.chosen.input_ids, pair.chosen_changed) if c])
    changed_r = tok.decode([t for t, c in zip(pair.rejected.input_ids, pair.rejected_changed) if c])
    assert "red" in changed_c and "square" in changed_c and "top" not in changed_c
    assert "blue" in changed_r and "circle" in changed_r and "left" not in changed_r
    # changed tokens are answer tokens only
    assert all(lab != IGNORE for lab, c in zip(pair.chosen.labels, pair.chosen_changed) if c)


def test_changed_tokens_marks_what_is_not_shared():
    assert changed_tokens([1, 2, 3, 4], [1, 9, 3, 4]) == ([False, True, False, False], [False, True, False, False])
    assert changed_tokens([1, 2], [1, 2, 5]) == ([False, False], [False, False, True])


@pytest.mark.parametrize("bad", [{"chosen": ""}, {"rejected": 3}, {"rejected": "a red square at the top left."},
                                 {"messages": PROMPT + [{"role": "assistant", "content": "x"}]}, {"messages": []}])
def test_malformed_pairs_raise_a_counted_reason(tiny_assets, bad):
    with pytest.raises(BadSample) as err:
        render_pair(_record(**bad), {"img0.png": _png()}, tiny_assets, max_seq_len=512)
    assert err.value.reason == "bad_pair"


def test_pair_collate_puts_chosen_rows_first(tiny_assets):
    members = {"img0.png": _png()}
    a = render_pair(_record(), members, tiny_assets, max_seq_len=512)
    b = render_pair(_record(chosen="a red square.", rejected="nothing at all, just a plain background."), members,
                    tiny_assets, max_seq_len=512)
    batch = pair_collate([Item(a, "a", 0, ["corrupt_image"]), Item(b, "b", 0, [])], pad_id=tiny_assets.tokenizer.pad_token_id)
    assert batch["sample_ids"] == ["a", "b"] and batch["num_read"] == 3 and batch["skipped"] == {"corrupt_image": 1}
    for row, side in enumerate([a.chosen, b.chosen, a.rejected, b.rejected]):
        n = len(side.input_ids)
        assert batch["input_ids"][row, :n].tolist() == side.input_ids
        assert int(batch["attention_mask"][row].sum()) == n
    assert batch["changed"][0, : len(a.chosen_changed)].tolist() == a.chosen_changed
    assert batch["pixel_values"].shape[0] == 4 * a.chosen.pixel_values.shape[0]


def test_convert_preference_rlaifv_and_rlhfv_records_with_counted_skips(tmp_path, tiny_assets):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png())
    records = [
        {"idx": "rlaif-0", "image_path": "a.png", "question": "What is shown?", "chosen": "A red square.", "rejected": "A dog."},
        {"idx": "rlhfv-1", "image": "a.png", "text": json.dumps({"question": "Describe <image> briefly.",
                                                                 "chosen": "Red.", "rejected": "Blue."})},
        {"idx": "missing", "image_path": "nope.png", "question": "q", "chosen": "a", "rejected": "b"},
        {"idx": "nofield", "image_path": "a.png", "question": "q", "chosen": "a"},
        {"idx": "same", "image_path": "a.png", "question": "q", "chosen": "a", "rejected": "a"},
        "not an object",
    ]
    src = tmp_path / "pairs.json"
    src.write_text(json.dumps(records))
    counts = convert_preference(src, image_root=tmp_path / "imgs", out_dir=tmp_path / "out")
    assert counts == {"written": 2, "skipped/missing_image": 1, "skipped/missing_field": 1,
                      "skipped/identical_answers": 1, "skipped/bad_record": 1}
    data = ShardDataset(tmp_path / "out")
    for i, (question, chosen) in enumerate([("What is shown?", "A red square."), ("briefly.", "Red.")]):
        ref, members = data.read(i)
        record = json.loads(members["json"])
        assert record["chosen"] == chosen and question in record["messages"][0]["content"]
        pair = render_pair(record, members, tiny_assets, max_seq_len=512)
        assert pair.chosen.pixel_values is not None and len(pair.chosen.tiles_per_image) == 1


def test_scalar_head_export_round_trip(tmp_path, tiny_export):
    from vlmscale.model.build import load_pretrained
    from vlmscale.model.heads import HEAD_FILE, ScalarHeadModel, load_scalar_head_model, save_head, split_state

    vlm, assets = load_pretrained(str(tiny_export), max_tiles=None, dtype=torch.float32)
    model = ScalarHeadModel(vlm)
    with torch.no_grad():
        model.score.weight.normal_()
        model.score.bias.fill_(0.25)
    vlm_state, head = split_state(model.state_dict())
    assert set(head) == {"weight", "bias"} and head["weight"].shape == (1, vlm.config.text_config.hidden_size)
    vlm.save_pretrained(tmp_path, state_dict=vlm_state)
    assets.save(tmp_path)
    save_head(head, tmp_path)
    assert (tmp_path / HEAD_FILE).is_file()
    loaded, _ = load_scalar_head_model(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded.score.weight, model.score.weight) and loaded.score.bias.item() == 0.25
    with pytest.raises(ValueError, match="score head"):
        save_head({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, tmp_path)


def test_reference_cache_fingerprint_changes_with_weights_data_and_layout(tmp_path, demo_dir):
    import os

    from vlmscale.config import DPOConfig, load_config
    from vlmscale.stages.dpo_reference import fingerprint

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    base = [f"model.init_from={tmp_path}", f"data.demo_dir={demo_dir}"]
    fp = fingerprint(load_config(DPOConfig, overrides=base), world_size=2)
    assert fingerprint(load_config(DPOConfig, overrides=base), world_size=2) == fp
    assert fingerprint(load_config(DPOConfig, overrides=base), world_size=1) != fp
    assert fingerprint(load_config(DPOConfig, overrides=[*base, "train.max_steps=7"]), world_size=2) != fp
    assert fingerprint(load_config(DPOConfig, overrides=[*base, "dpo.segment_weight=5"]), world_size=2) != fp
    assert fingerprint(load_config(DPOConfig, overrides=[*base, "dpo.beta=0.5"]), world_size=2) == fp  # beta is not cached
    (tmp_path / "model.safetensors").write_bytes(b"retrained weights")
    assert fingerprint(load_config(DPOConfig, overrides=base), world_size=2) != fp
    shard = sorted((demo_dir / "train" / "pref").glob("*.tar"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    fp2 = fingerprint(load_config(DPOConfig, overrides=base), world_size=2)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns - 10**9))
    assert fp2 != fingerprint(load_config(DPOConfig, overrides=base), world_size=2)


def test_yes_no_pairs_from_conversation_shards(tmp_path, demo_dir, tiny_assets):
    from vlmscale.data.convert import yes_no_pairs

    counts = yes_no_pairs(demo_dir / "train" / "vqa", out_dir=tmp_path / "pairs")
    assert counts["written"] > 0 and counts["written"] == counts["chosen/yes"] + counts["chosen/no"]
    assert counts["written"] + counts["skipped/no_yes_no_turn"] == len(ShardDataset(demo_dir / "train" / "vqa"))
    data = ShardDataset(tmp_path / "pairs")
    for i in range(3):
        _, members = data.read(i)
        record = json.loads(members["json"])
        assert {record["chosen"], record["rejected"]} == {"yes", "no"}
        assert record["messages"][-1]["role"] == "user" and "Is there a" in record["messages"][-1]["content"][-1]["text"]
        render_pair(record, members, tiny_assets, max_seq_len=512)
