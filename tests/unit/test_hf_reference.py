"""vlmscale's training forward against transformers' own InternVL forward, inputs built independently.

Our side: ``render_sample`` (tiles from the image processor, tokens and ``<IMG_CONTEXT>`` blocks built in
one pass), ``collate`` / ``pack_collate`` and ``vlm_logits``. Reference side: tiles cut by InternVL's own
``dynamic_preprocess`` (re-implemented here from the public InternVL repository, plain PIL + numpy), token
ids from the exported chat template with each ``<IMG_CONTEXT>`` expanded as ``InternVLProcessor`` does, and
``InternVLForConditionalGeneration.forward`` on one sample at a time (no padding, default position ids).
Every sample of a padded or packed batch must give the reference's logits (fp32, 1e-5): tile and thumbnail
order, the scatter of features into their slots and position ids restarting per packed sample all show.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import template_ids
from vlmscale.config import SFTConfig, load_config
from vlmscale.config.schema import VideoConfig
from vlmscale.constants import IMG_CONTEXT
from vlmscale.data.dataset import Item, collate, pack_collate
from vlmscale.data.render import render_sample
from vlmscale.model.build import build_model, load_weights_plain
from vlmscale.model.forward import vlm_logits

VIDEO = VideoConfig(max_frames=4, pool=1, token_budget=256)  # stock InternVL does not pool frame grids
MAX_TILES = 4


# ---------------------------------------------------------------- InternVL's tiling (github.com/OpenGVLab/InternVL)


def _closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in target_ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def dynamic_preprocess(image: Image.Image, *, max_num: int, image_size: int) -> list[Image.Image]:
    """InternVL's ``dynamic_preprocess(min_num=1, use_thumbnail=True)``: tiles in raster order, thumbnail last."""
    width, height = image.size
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if 1 <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    cols, rows = _closest_aspect_ratio(width / height, ratios, width, height, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.BICUBIC)
    tiles = [resized.crop(((i % cols) * image_size, (i // cols) * image_size,
                           (i % cols + 1) * image_size, (i // cols + 1) * image_size)) for i in range(cols * rows)]
    if len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def _to_tensor(tiles: list[Image.Image], assets) -> torch.Tensor:
    proc = assets.image_processor
    mean, std = np.array(proc.image_mean), np.array(proc.image_std)
    arrays = [((np.asarray(t, dtype=np.float64) / 255.0 - mean) / std).transpose(2, 0, 1) for t in tiles]
    return torch.tensor(np.stack(arrays), dtype=torch.float32)


# ---------------------------------------------------------------- samples


def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _turns(first_user: list[dict], answer: str) -> list[dict]:
    return [{"role": "user", "content": first_user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def _samples() -> dict[str, tuple[dict, dict[str, bytes]]]:
    multi_tile = _turns([{"type": "image", "image": "a.png"}, {"type": "text", "text": "Where is the box?"}],
                        "<box>[120, 562, 300, 999]</box>")
    multi_image = _turns([{"type": "text", "text": "First: "}, {"type": "image", "image": "a.png"},
                          {"type": "text", "text": "Second: "}, {"type": "image", "image": "b.png"},
                          {"type": "text", "text": "Which is wider?"}], "first")
    frames = [f"f{i}.png" for i in range(8)]
    video = _turns([{"type": "video", "frames": frames, "fps": 2}, {"type": "text", "text": "Which way?"}], "left")
    text = _turns([{"type": "text", "text": "What is 12 plus 30?"}], "42")
    return {
        "multi_tile": ({"messages": multi_tile}, {"a.png": _png(96, 40, 1)}),  # 2x1 tiles + thumbnail
        "multi_image": ({"messages": multi_image}, {"a.png": _png(80, 30, 2), "b.png": _png(30, 70, 3)}),
        "video": ({"messages": video}, {name: _png(40, 40, 10 + i) for i, name in enumerate(frames)}),
        "text": ({"messages": text}, {}),
    }


def _reference_inputs(record: dict, members: dict[str, bytes], assets) -> tuple[list[int], torch.Tensor | None]:
    """Token ids and tiles the way stock InternVL builds them, from the record alone."""
    tiles, counts, video_frames = [], [], None
    n_images = sum(part["type"] == "image" for msg in record["messages"] for part in msg["content"])
    max_num = max(1, MAX_TILES // max(n_images, 1))  # InternVL's multi-image rule: the tile budget is shared
    for msg in record["messages"]:
        for part in msg["content"]:
            if part["type"] == "image":
                img = Image.open(io.BytesIO(members[part["image"]])).convert("RGB")
                cut = dynamic_preprocess(img, max_num=max_num, image_size=assets.image_size)
                tiles += cut
                counts.append(len(cut))
            elif part["type"] == "video":
                names = part["frames"]
                n = min(len(names), VIDEO.max_frames)
                picked = [int((k + 0.5) * len(names) / n) for k in range(n)]  # the centre of n equal segments
                video_frames = [(k, i / part["fps"]) for k, i in enumerate(picked)]
                for i in picked:
                    frame = Image.open(io.BytesIO(members[names[i]])).convert("RGB")
                    tiles.append(frame.resize((assets.image_size, assets.image_size), Image.BICUBIC))
    tok = assets.tokenizer
    text = tok.apply_chat_template(record["messages"], tokenize=False)
    if video_frames is not None:  # InternVLProcessor's per-frame expansion, with vlmscale's time tags
        block = "<img>" + IMG_CONTEXT * assets.image_seq_length + "</img>"
        text = text.replace("<video>\n", "".join(f"Frame{k + 1} ({t:.1f}s): {block}\n" for k, t in video_frames))
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        ids = template_ids(assets, record, counts)
    return ids, (_to_tensor(tiles, assets) if tiles else None)


@pytest.fixture(scope="module")
def tiny_fp32():
    torch.manual_seed(0)
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny"])
    model, assets = build_model(cfg.model, max_tiles=MAX_TILES, dtype=torch.float32, load_weights=load_weights_plain)
    return model.eval(), assets


def _ours(assets, names):
    samples = _samples()
    return [Item(render_sample(*samples[n], assets, max_seq_len=4096, video=VIDEO), n, 0, []) for n in names]


def _reference_logits(model, assets, name) -> torch.Tensor:
    ids, pixels = _reference_inputs(*_samples()[name], assets)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]


NAMES = ["multi_tile", "multi_image", "video", "text"]


def test_reference_inputs_match_render(tiny_fp32):
    """Same token ids and same tiles, sample by sample (an input mismatch is named before any logits)."""
    model, assets = tiny_fp32
    for item in _ours(assets, NAMES):
        ids, pixels = _reference_inputs(*_samples()[item.sample_id], assets)
        assert item.rendered.input_ids == ids, item.sample_id
        if pixels is None:
            assert item.rendered.pixel_values is None
        else:
            torch.testing.assert_close(item.rendered.pixel_values, pixels, atol=1e-5, rtol=0, msg=item.sample_id)
    # a 2x1 grid + thumbnail; two images share the tile budget (data.split_tiles: max(1, 4 // 2) each), so
    # the wide one is cut 2x1 and the tall one 1x2, each + thumbnail
    assert [it.rendered.tiles_per_image for it in _ours(assets, ["multi_tile", "multi_image"])] == [[3], [3, 3]]


def test_padded_batch_matches_hf_forward(tiny_fp32):
    model, assets = tiny_fp32
    items = _ours(assets, NAMES)
    b = collate(items, pad_id=assets.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = vlm_logits(model, input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          pixel_values=b["pixel_values"], tile_pool=b["tile_pool"])
    for row, item in enumerate(items):
        ref = _reference_logits(model, assets, item.sample_id)
        torch.testing.assert_close(ours[row, : ref.shape[0]], ref, atol=1e-5, rtol=1e-5, msg=item.sample_id)


def test_packed_batch_matches_hf_forward_per_sample(tiny_fp32):
    """Each packed sample against its own unpacked HF forward: position ids restart, attention stays inside."""
    model, assets = tiny_fp32
    items = _ours(assets, NAMES)
    total = sum(len(it.rendered.input_ids) for it in items)
    b = pack_collate(items, pad_id=assets.tokenizer.pad_token_id, max_len=total)
    assert len(b["rows"]) == 1  # all four samples in one row
    with torch.no_grad():
        ours = vlm_logits(model, input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          pixel_values=b["pixel_values"], position_ids=b["position_ids"],
                          tile_pool=b["tile_pool"], packed=True)
    start = 0
    for i in b["rows"][0]:
        ref = _reference_logits(model, assets, items[i].sample_id)
        torch.testing.assert_close(ours[0, start: start + ref.shape[0]], ref, atol=1e-5, rtol=1e-5, msg=items[i].sample_id)
        start += ref.shape[0]


def test_the_comparison_sees_planted_bugs(tiny_fp32):
    """The checks above can fail: a thumbnail moved first, or position ids running on across packed samples."""
    model, assets = tiny_fp32
    [item] = _ours(assets, ["multi_tile"])
    ref = _reference_logits(model, assets, "multi_tile")
    ids = torch.tensor([item.rendered.input_ids])
    thumbnail_first = item.rendered.pixel_values[[2, 0, 1]]
    with torch.no_grad():
        bad = vlm_logits(model, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=thumbnail_first)
    assert not torch.allclose(bad[0], ref, atol=1e-3)
    items = _ours(assets, ["text", "multi_tile"])
    b = pack_collate(items, pad_id=assets.tokenizer.pad_token_id, max_len=4096)
    running = torch.arange(b["input_ids"].shape[1]).unsqueeze(0)
    running[0, 0] = 0
    second = len(items[b["rows"][0][0]].rendered.input_ids)
    with torch.no_grad():
        good = vlm_logits(model, input_ids=b["input_ids"], attention_mask=None, pixel_values=b["pixel_values"],
                          position_ids=b["position_ids"], packed=True)
        # positions that never restart also merge the two samples into one attention segment
        bad = vlm_logits(model, input_ids=b["input_ids"], attention_mask=None, pixel_values=b["pixel_values"],
                         position_ids=running, packed=True)
    assert torch.allclose(good[0, :second], bad[0, :second], atol=1e-5)  # the first sample is unaffected
    assert not torch.allclose(good[0, second:], bad[0, second:], atol=1e-3)
