"""Video samples: frame sampling, per-frame pooling, time tags, and the clip token budget."""

import io

import pytest
import torch
from PIL import Image

from vlmscale.config import SFTConfig, load_config
from vlmscale.config.schema import VideoConfig
from vlmscale.constants import IMG_CONTEXT, IMG_END, IMG_START
from vlmscale.data.dataset import Item, collate
from vlmscale.data.render import BadSample, plan_video, render_sample
from vlmscale.model.build import build_model, load_weights_plain
from vlmscale.model.forward import image_features, token_losses, vlm_logits


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny"])
    return build_model(cfg.model, max_tiles=4, dtype=torch.float32, load_weights=load_weights_plain)


def _frame(i: int) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (48, 48), (240, 240, 240))
    img.paste((200, 30, 30), (2 + 2 * i, 10, 14 + 2 * i, 22))
    img.save(buf, format="PNG")
    return buf.getvalue()


def _clip(n: int = 16):
    names = [f"f{i:02d}.png" for i in range(n)]
    record = {"messages": [
        {"role": "user", "content": [{"type": "video", "frames": names, "fps": 2}, {"type": "text", "text": "Which way?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "right"}]},
    ]}
    return record, {name: _frame(i) for i, name in enumerate(names)}


def _clip_tokens(r, assets) -> int:
    """Tokens from the first frame tag to the newline after the last </img>."""
    ids = r.input_ids
    frame_tok = assets.tokenizer("Frame", add_special_tokens=False)["input_ids"][0]
    start = ids.index(frame_tok)
    end = len(ids) - 1 - ids[::-1].index(assets.token_id(IMG_END))
    newline = len(assets.tokenizer("\n", add_special_tokens=False)["input_ids"])
    return end + 1 + newline - start


@pytest.mark.parametrize("budget,pool", [(256, 1), (60, 2), (40, 1), (25, 2)])
def test_clip_stays_within_budget(demo_assets, budget, pool):
    cfg = VideoConfig(max_frames=8, pool=pool, token_budget=budget)
    record, members = _clip()
    r = render_sample(record, members, demo_assets, max_seq_len=4096, video=cfg)
    frames = len(r.tile_pool)
    assert 1 <= frames <= 8
    assert _clip_tokens(r, demo_assets) <= budget
    per_frame = 9 if pool == 1 else 4  # demo tiles are 3x3 tokens; 2x2 pooling with ceil -> 2x2
    assert r.input_ids.count(demo_assets.token_id(IMG_CONTEXT)) == frames * per_frame
    assert r.pixel_values.shape[0] == frames and r.tile_pool == [pool] * frames
    if budget >= 256:
        assert frames == 8  # a generous budget takes max_frames


def test_budget_drops_frames_not_beyond(demo_assets):
    record, members = _clip()
    big = render_sample(record, members, demo_assets, max_seq_len=4096, video=VideoConfig(max_frames=8, pool=1, token_budget=1000))
    small = render_sample(record, members, demo_assets, max_seq_len=4096, video=VideoConfig(max_frames=8, pool=1, token_budget=60))
    assert len(small.tile_pool) < len(big.tile_pool) == 8
    # the small budget could not have held one more frame
    per_frame = _clip_tokens(big, demo_assets) / 8
    assert _clip_tokens(small, demo_assets) + per_frame > 60 - 2


def test_time_tags_and_uniform_sampling(demo_assets):
    record, members = _clip(16)
    r = render_sample(record, members, demo_assets, max_seq_len=4096, video=VideoConfig(max_frames=4, pool=2, token_budget=500))
    text = demo_assets.tokenizer.decode(r.input_ids)
    # fps 2, 16 frames, 4 segments: centres at frames 2, 6, 10, 14 -> 1.0s, 3.0s, 5.0s, 7.0s
    for k, t in enumerate(["1.0", "3.0", "5.0", "7.0"]):
        assert f"Frame{k + 1} ({t}s): {IMG_START}" in text
    assert plan_video(16, tag_tokens=[5] * 16, newline_tokens=1, image_seq_length=9,
                      cfg=VideoConfig(max_frames=4, pool=2, token_budget=500)).frames == [2, 6, 10, 14]


def test_keyframes_follow_change():
    scores = [0.0, 0.1, 9.0, 0.1, 0.1, 7.0, 0.1, 0.1]
    plan = plan_video(8, tag_tokens=[5] * 8, newline_tokens=1, image_seq_length=9,
                      cfg=VideoConfig(max_frames=3, pool=1, token_budget=500, sampling="keyframe"), scores=scores)
    assert plan.frames == [0, 2, 5]


def test_one_frame_over_budget_is_a_counted_skip(demo_assets):
    record, members = _clip()
    with pytest.raises(BadSample) as err:
        render_sample(record, members, demo_assets, max_seq_len=4096, video=VideoConfig(pool=1, token_budget=8))
    assert err.value.reason == "video_over_budget"


def test_pooling_averages_each_frame_grid(tiny):
    tiny_model, _ = tiny
    """Pool 2 on a tile is the 2x2 average of that tile's unpooled token grid."""
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    full = image_features(tiny_model, pixels).view(3, 4, -1)  # tiny: 2x2 tokens per tile
    pooled = image_features(tiny_model, pixels, torch.tensor([1, 2, 1]))
    assert pooled.shape[0] == 4 + 1 + 4
    torch.testing.assert_close(pooled[4], full[1].mean(0))
    torch.testing.assert_close(pooled[:4], full[0])


def test_video_sample_trains(tiny):
    """A video clip: finite loss, gradients reach the projector, loss falls."""
    model, tiny_assets = tiny
    record, members = _clip(8)
    cfg = VideoConfig(max_frames=4, pool=2, token_budget=200)
    items = [Item(render_sample(record, members, tiny_assets, max_seq_len=1024, video=cfg), "v", 0, [])]
    batch = collate(items, pad_id=tiny_assets.tokenizer.pad_token_id)
    assert batch["tile_pool"].tolist() == [2] * 4
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(5):
        logits = vlm_logits(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"], tile_pool=batch["tile_pool"])
        per_token = token_losses(logits, batch["labels"])
        loss = per_token.sum() / (batch["labels"][:, 1:] != -100).sum()
        opt.zero_grad()
        loss.backward()
        proj = next(model.model.multi_modal_projector.parameters())
        assert proj.grad is not None and proj.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
