"""Converters for users' formats, the persistent shard index, robust decoding and the data fingerprint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from tests import user_formats as uf
from vlmscale.data import convert as cv
from vlmscale.data.dataset import TrainDataset
from vlmscale.data.mixture import Mixture
from vlmscale.data.records import BadLine, iter_records
from vlmscale.data.render import BadSample, ImageOptions, decode_image, normalise_tiles, render_sample
from vlmscale.data.shards import ShardDataset, ShardWriter, index_shard


def _samples(path):
    data = ShardDataset(path)
    return [(json.loads(m["json"]), m) for _, m in (data.read(i) for i in range(len(data)))]


def _renders(samples, assets, **kwargs):
    return [render_sample(rec, members, assets, max_seq_len=4096, **kwargs) for rec, members in samples]


# --- records --------------------------------------------------------------------------------------

def test_json_arrays_are_streamed_and_jsonl_skips_blank_lines(tmp_path, monkeypatch):
    import vlmscale.data.records as records

    monkeypatch.setattr(records, "CHUNK", 5)  # records straddle many reads
    data = [{"i": i, "s": "x" * i + '"],{'} for i in range(20)]
    (tmp_path / "a.json").write_text(json.dumps(data, indent=2))
    assert list(iter_records(tmp_path / "a.json")) == data
    (tmp_path / "b.jsonl").write_text('{"a": 1}\n\n   \n{broken\n{"b": 2}\n')
    out = list(iter_records(tmp_path / "b.jsonl"))
    assert out[0] == {"a": 1} and isinstance(out[1], BadLine) and out[1].line == 4 and out[2] == {"b": 2}
    (tmp_path / "c.json").write_text('[{"a": 1}, {"b": ')
    with pytest.raises(ValueError, match="malformed JSON array"):
        list(iter_records(tmp_path / "c.json"))


# --- converters -----------------------------------------------------------------------------------

def test_sharegpt_converts_multi_image_system_and_from_value(tmp_path, tiny_assets):
    src = uf.sharegpt_file(tmp_path, n=6)
    counts = cv.convert_sharegpt(src, image_root=tmp_path / "media", out_dir=tmp_path / "out")
    assert counts == {"written": 8, "skipped/missing_image": 1}
    summary = json.loads((tmp_path / "out" / cv.SUMMARY).read_text())
    assert summary["counts"] == counts
    samples = {rec["id"]: (rec, m) for rec, m in _samples(tmp_path / "out")}
    rec, members = samples["sg0"]
    assert rec["messages"][0] == {"role": "system", "content": "Answer briefly."}
    multi = render_sample(*samples["sg-multi"], tiny_assets, max_seq_len=4096)
    assert len(multi.tiles_per_image) == 3
    assert samples["sg-fromvalue"][0]["messages"][1] == {"role": "assistant", "content": "blue"}
    assert all(r.num_supervised > 0 for r in _renders(samples.values(), tiny_assets))


def test_openai_content_lists_data_urls_and_trl_layout(tmp_path, tiny_assets):
    src = uf.openai_file(tmp_path, n=6)
    counts = cv.convert_openai(src, image_root=tmp_path / "media", out_dir=tmp_path / "out", workers=2)
    assert counts == {"written": 8, "skipped/remote_media": 1}
    samples = {rec["id"]: (rec, m) for rec, m in _samples(tmp_path / "out")}
    assert [k for k in samples["oa1"][1] if k != "json"] == ["img0.png"]  # the data URL became a member
    trl = render_sample(*samples["oa-trl"], tiny_assets, max_seq_len=4096)
    assert len(trl.tiles_per_image) == 2
    assert render_sample(*samples["oa-text"], tiny_assets, max_seq_len=4096).pixel_values is None
    # the same output with one worker: order and content do not depend on --workers
    cv.convert_openai(src, image_root=tmp_path / "media", out_dir=tmp_path / "one")
    assert [r for r, _ in _samples(tmp_path / "one")] == [r for r, _ in _samples(tmp_path / "out")]


def test_internvl_meta_writes_sources_with_weights_and_max_tiles(tmp_path, tiny_assets):
    from vlmscale.config import SFTConfig, load_config

    result = cv.convert_internvl(uf.internvl_meta(tmp_path, n=4), out_dir=tmp_path / "out")
    sources = yaml.safe_load((tmp_path / "out" / "sources.yaml").read_text())["data"]["sources"]
    assert [(s["name"], s["weight"], s.get("max_tiles")) for s in sources] == [("ivl_a", 4.0, 2), ("ivl_b", 2.0, None)]
    assert result["counts"]["ivl_a"] == {"written": 4}
    cfg = load_config(SFTConfig, path=str(tmp_path / "out" / "sources.yaml"), overrides=["model.preset=tiny"])
    ds = TrainDataset(sources=[ShardDataset(s.path) for s in cfg.data.sources], names=["a", "b"],
                      weights=cfg.data.mixture_weights(), assets=tiny_assets, max_seq_len=4096, seed=0,
                      image_options=[ImageOptions(max_tiles=s.max_tiles or 6) for s in cfg.data.sources])
    tiles = {ds.names[it.source]: it.rendered.tiles_per_image[0] for it in (ds[p] for p in range(12))}
    assert tiles == {"a": 3, "b": 5}  # 192 x 48: a's max_dynamic_patch 2 -> 2 x 1 + thumbnail; b: 4 x 1 + thumbnail


def test_hf_parquet_with_embedded_images(tmp_path, tiny_assets):
    pytest.importorskip("datasets")
    counts = cv.convert_hf(uf.hf_parquet(tmp_path, n=4), out_dir=tmp_path / "out")
    assert counts == {"written": 4}
    samples = _samples(tmp_path / "out")
    assert samples[0][0]["images"] == ["img0.png"]
    assert all(r.pixel_values is not None for r in _renders(samples, tiny_assets))


def test_video_files_become_frames_with_timestamps(tmp_path, tiny_assets):
    pytest.importorskip("av")
    from vlmscale.data.video_files import FrameSampling

    src = uf.sharegpt_file(tmp_path, n=2, video=True)
    counts = cv.convert_sharegpt(src, image_root=tmp_path / "media", out_dir=tmp_path / "out",
                                 video=FrameSampling(num_frames=4))
    assert counts == {"written": 5, "skipped/missing_image": 1, "skipped/unreadable_video": 1}
    rec, members = next((r, m) for r, m in _samples(tmp_path / "out") if r["id"] == "sg-video")
    part = rec["messages"][0]["content"][0]
    assert part["type"] == "video" and len(part["frames"]) == 4 and part["timestamps"] == sorted(part["timestamps"])
    assert all(members[f][:2] == b"\xff\xd8" for f in part["frames"])  # JPEG
    rendered = render_sample(rec, members, tiny_assets, max_seq_len=4096)
    assert len(rendered.tiles_per_image) == 4


def test_rerun_into_the_same_out_refuses_or_replaces(tmp_path):
    src = uf.openai_file(tmp_path, n=3)
    cv.convert_openai(src, image_root=tmp_path / "media", out_dir=tmp_path / "out", shard_size=2)
    with pytest.raises(ValueError, match="--overwrite"):
        cv.convert_openai(src, image_root=tmp_path / "media", out_dir=tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    cv.convert_openai(src, image_root=tmp_path / "media", out_dir=tmp_path / "out", shard_size=100, overwrite=True)
    assert len(before) == 3 and sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["shard-000000.tar"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# --- the index ------------------------------------------------------------------------------------

def _write_shards(path, n, per_shard):
    w = ShardWriter(path, max_count=per_shard)
    for i in range(n):
        w.write(f"s{i:05d}", {"json": json.dumps({"id": f"t{i}"}).encode(), **({"img0.png": b"x" * i} if i % 2 else {})})
    w.close()


def test_index_matches_the_tar_walk_is_reused_and_rebuilt_when_stale(tmp_path):
    _write_shards(tmp_path / "d", 25, 10)
    data = ShardDataset(tmp_path / "d")
    walk = [r for s in sorted((tmp_path / "d").glob("*.tar")) for r in index_shard(s)]
    assert len(data) == 25 and [data.ref(i) for i in range(25)] == walk
    meta = tmp_path / "d" / "shard-000001.tar.idx.json"
    built = meta.stat().st_mtime_ns
    again = ShardDataset(tmp_path / "d")
    assert meta.stat().st_mtime_ns == built and again.digest == data.digest
    _write_shards(tmp_path / "d", 26, 10)  # shard 2 changes (size + mtime): its index is rebuilt
    changed = ShardDataset(tmp_path / "d")
    assert len(changed) == 26 and changed.digest != data.digest
    assert changed.record(25) == {"id": "t25"}


def test_index_goes_to_the_cache_dir_when_the_shards_are_read_only(tmp_path, monkeypatch):
    import vlmscale.data.shards as shards

    _write_shards(tmp_path / "ro", 5, 10)
    monkeypatch.setenv("VLMSCALE_INDEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shards.os, "access", lambda path, mode: False)
    data = ShardDataset(tmp_path / "ro")
    assert len(data) == 5 and not list((tmp_path / "ro").glob("*.idx.*"))
    assert len(list((tmp_path / "cache").glob("*.idx.npy"))) == 1


def test_mixture_order_is_unchanged_and_keeps_one_permutation_per_source():
    sizes, seed = [50, 7], 3
    mix = Mixture(sizes=sizes, weights=[2.0, 1.0], seed=seed, block=16)
    for p in range(0, 400, 7):
        s, item = mix.locate(p)
        b, off = divmod(p, 16)
        assign, rank = mix._block(b)
        k = b * mix.counts[s] + int(rank[off])
        epoch, i = divmod(k, sizes[s])
        assert item == int(np.random.default_rng([seed, 2, s, epoch]).permutation(sizes[s])[i])
    assert len(mix._perms) == 2 and all(perm.dtype == np.int32 for _, perm in mix._perms.values())


# --- decoding -------------------------------------------------------------------------------------

def test_bad_images_are_counted_or_converted(tiny_assets):
    images = uf.bad_images()
    for name in ("bomb.png", "truncated.jpg"):
        with pytest.raises(BadSample) as exc:
            decode_image(images[name])
        assert exc.value.reason == {"bomb.png": "decompression_bomb", "truncated.jpg": "corrupt_image"}[name]
    assert decode_image(images["cmyk.jpg"]).getpixel((5, 5)) == (255, 0, 0)
    assert decode_image(images["grey16.png"]).getpixel((5, 5)) == (156,) * 3  # 40000 >> 8, not clipped to 255
    pal = decode_image(images["palette.png"])
    assert pal.getpixel((5, 5)) == (255, 0, 0) and pal.getpixel((35, 5)) == (255, 255, 255)  # transparent -> white
    assert decode_image(images["animated.gif"]).getpixel((5, 5)) == uf.RED  # first frame


def test_exif_rotated_photo_gives_an_upright_tile(tiny_assets):
    img = decode_image(uf.exif_rotated_jpeg())
    assert img.size == (32, 64)
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img0.jpg"}]},
                           {"role": "assistant", "content": "red on top"}]}
    out = render_sample(record, {"img0.jpg": uf.exif_rotated_jpeg()}, tiny_assets, max_seq_len=4096,
                        images=ImageOptions(raw=True))
    thumb = out.pixel_values[-1].float()  # (3, H, W) 0..255
    top, bottom = thumb[:, : thumb.shape[1] // 4].mean((1, 2)), thumb[:, -thumb.shape[1] // 4:].mean((1, 2))
    assert top[0] > 150 and top[2] < 90 and bottom[2] > 150 and bottom[0] < 90


def test_large_jpeg_is_drafted_to_the_tile_grid():
    big = uf.jpeg(uf.photo(4000, 3000))
    assert decode_image(big, tile_size=448, max_tiles=12).size == (2000, 1500)  # 4 x 3 tiles of 448 = 1792 x 1344
    assert decode_image(big).size == (4000, 3000)


def test_multi_image_samples_split_the_tile_budget(tiny_assets):
    photos = {f"img{k}.jpg": uf.jpeg(uf.photo(1800, 600, seed=k)) for k in range(3)}  # 3:1
    record = {"images": list(photos), "messages": [{"role": "user", "content": "<image><image><image>Q"},
                                                   {"role": "assistant", "content": "A"}]}
    split = render_sample(record, photos, tiny_assets, max_seq_len=1 << 16, images=ImageOptions(max_tiles=6))
    full = render_sample(record, photos, tiny_assets, max_seq_len=1 << 16, images=ImageOptions(max_tiles=6, split_tiles=False))
    assert split.tiles_per_image == [3, 3, 3]  # 6 // 3 = 2 tiles (2 x 1) + thumbnail each
    assert full.tiles_per_image == [4, 4, 4]  # 3 x 1 + thumbnail


def test_uint8_tiles_normalise_to_the_processor_values(tiny_assets):
    data = uf.jpeg(uf.photo(300, 200))
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.jpg"}]},
                           {"role": "assistant", "content": "x"}]}
    floats = render_sample(record, {"a.jpg": data}, tiny_assets, max_seq_len=4096)
    raw = render_sample(record, {"a.jpg": data}, tiny_assets, max_seq_len=4096, images=ImageOptions(raw=True))
    assert raw.pixel_values.dtype == torch.uint8
    assert torch.equal(normalise_tiles(raw.pixel_values, tiny_assets.image_processor), floats.pixel_values)


# --- fingerprint ----------------------------------------------------------------------------------

def test_fingerprint_names_what_changed(tmp_path):
    from vlmscale.config import ConfigError, SFTConfig, load_config
    from vlmscale.data.fingerprint import FINGERPRINT, check_resume_data, data_fingerprint

    _write_shards(tmp_path / "a", 6, 10)
    _write_shards(tmp_path / "b", 4, 10)
    sources = f"data.sources=[{{name: a, path: '{tmp_path / 'a'}', weight: 1}}, {{name: b, path: '{tmp_path / 'b'}', weight: 1}}]"
    cfg = load_config(SFTConfig, overrides=[sources])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / FINGERPRINT).write_text(json.dumps(data_fingerprint(cfg.data, seed=cfg.train.seed)))
    check_resume_data(cfg, ckpt)  # unchanged: passes
    changed = load_config(SFTConfig, overrides=[sources.replace("weight: 1}]", "weight: 3}]")])
    with pytest.raises(ConfigError, match=r"source 'b' weight share 0.5 -> 0.75.*resume_allow_data_change=true"):
        check_resume_data(changed, ckpt)
    check_resume_data(load_config(SFTConfig, overrides=[sources.replace("weight: 1}]", "weight: 3}]"),
                                                         "resume_allow_data_change=true"]), ckpt)
    _write_shards(tmp_path / "b", 5, 10)
    with pytest.raises(ConfigError, match="source 'b' has 5 samples, was 4"):
        check_resume_data(cfg, ckpt)
    with pytest.raises(ConfigError, match="data.max_seq_len 512 -> 256"):
        check_resume_data(load_config(SFTConfig, overrides=[sources, "data.max_seq_len=256"]), ckpt)


def test_data_index_command_builds_the_index_ahead_of_a_launch(tmp_path, capsys):
    from vlmscale.cli import main

    _write_shards(tmp_path / "d", 12, 5)
    assert main(["data", "index", str(tmp_path / "d"), "--workers", "2"]) == 0
    assert "12 samples in 3 shards" in capsys.readouterr().out
    assert len(list((tmp_path / "d").glob("*.tar.idx.json"))) == 3
