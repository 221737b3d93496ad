import io

import pytest
from PIL import Image

from tests.helpers import template_ids
from vlmscale.constants import IGNORE, IM_END, IMG_CONTEXT
from vlmscale.data.render import BadSample, render_prompt, render_sample


def _png(w=64, h=64, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _conv(*turns, image="img0.png"):
    msgs = []
    for i, (q, a) in enumerate(turns):
        content = [{"type": "image", "image": image}, {"type": "text", "text": q}] if i == 0 and image else [{"type": "text", "text": q}]
        msgs.append({"role": "user", "content": content})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return {"messages": msgs}


@pytest.mark.parametrize("answer", ["red", " two words", "yes\nand more", "<box>[1, 2, 3, 4]</box>"])
def test_render_matches_chat_template_and_processor(demo_assets, answer):
    rec = _conv(("What colour is the circle?", answer), ("And the square?", "blue"))
    r = render_sample(rec, {"img0.png": _png()}, demo_assets, max_seq_len=4096)
    assert r.input_ids == template_ids(demo_assets, rec, [1])


def test_labels_only_on_assistant_content_and_end(demo_assets):
    rec = _conv(("Q one?", "alpha"), ("Q two?", "beta"))
    r = render_sample(rec, {"img0.png": _png()}, demo_assets, max_seq_len=4096)
    tok = demo_assets.tokenizer
    supervised = [t for t, l in zip(r.input_ids, r.labels) if l != IGNORE]
    assert tok.decode(supervised) == f"alpha{IM_END}beta{IM_END}"
    assert all(l == IGNORE or l == t for t, l in zip(r.input_ids, r.labels))


@pytest.mark.parametrize("size,expected_tiles", [((64, 64), 1), ((128, 64), 3), ((256, 64), 5), ((64, 128), 3), ((640, 32), 5)])
def test_tiles_and_placeholder_count(demo_assets, size, expected_tiles):
    # demo preset: 48px tiles, max 4 tiles; >1 tile adds a thumbnail
    rec = _conv(("Q?", "A"))
    r = render_sample(rec, {"img0.png": _png(*size)}, demo_assets, max_seq_len=4096)
    assert r.tiles_per_image == [expected_tiles]
    size = demo_assets.image_size
    assert r.pixel_values.shape == (expected_tiles, 3, size, size)
    ctx = demo_assets.token_id(IMG_CONTEXT)
    assert r.input_ids.count(ctx) == expected_tiles * demo_assets.image_seq_length


def test_multi_image_blocks_stay_in_place(demo_assets):
    rec = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "A: "}, {"type": "image", "image": "a.png"},
                                     {"type": "text", "text": "B: "}, {"type": "image", "image": "b.png"},
                                     {"type": "text", "text": "same?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]}]}
    r = render_sample(rec, {"a.png": _png(), "b.png": _png(128, 64)}, demo_assets, max_seq_len=4096)
    assert r.tiles_per_image == [1, 3]
    text = demo_assets.tokenizer.decode(r.input_ids)
    assert text.index("A: ") < text.index("<img>") < text.index("B: ") < text.rindex("<img>") < text.index("same?")


def test_string_content_with_placeholders_equals_parts(demo_assets):
    parts = _conv(("What is it?", "a cat"))
    llava = {"messages": [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "a cat"}],
             "images": ["img0.png"]}
    m = {"img0.png": _png()}
    assert render_sample(parts, m, demo_assets, max_seq_len=4096).input_ids == render_sample(llava, m, demo_assets, max_seq_len=4096).input_ids


def test_document_supervises_text_not_images(demo_assets):
    rec = {"document": [{"type": "text", "text": "Look: "}, {"type": "image", "image": "img0.png"}, {"type": "text", "text": "a red box."}]}
    r = render_sample(rec, {"img0.png": _png()}, demo_assets, max_seq_len=4096)
    supervised = [t for t, l in zip(r.input_ids, r.labels) if l != IGNORE]
    assert demo_assets.tokenizer.decode(supervised) == f"Look: a red box.{IM_END}"


@pytest.mark.parametrize("record,members,reason", [
    (_conv(("Q?", "A")), {"img0.png": b"not an image"}, "corrupt_image"),
    (_conv(("Q?", "A")), {}, "missing_image"),
    ({"messages": [{"role": "user", "content": "<image> <image> Q?"}, {"role": "assistant", "content": "A"}], "images": ["img0.png"]},
     {"img0.png": _png()}, "placeholder_mismatch"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}], "images": ["img0.png"]},
     {"img0.png": _png()}, "placeholder_mismatch"),
    ({"messages": [{"role": "user", "content": "Q?"}]}, {}, "no_assistant_turn"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "word " * 600}]}, {}, "too_long"),
    ({"messages": [{"role": "robot", "content": "Q?"}]}, {}, "bad_schema"),
])
def test_bad_samples_raise_with_reason(demo_assets, record, members, reason):
    with pytest.raises(BadSample) as err:
        render_sample(record, members, demo_assets, max_seq_len=512)
    assert err.value.reason == reason


def test_prompt_is_training_prefix(demo_assets):
    rec = _conv(("What colour?", "red"))
    m = {"img0.png": _png()}
    full = render_sample(rec, m, demo_assets, max_seq_len=4096).input_ids
    prompt = render_prompt(rec["messages"][:1], m, demo_assets).input_ids
    assert full[: len(prompt)] == prompt
