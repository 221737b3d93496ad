"""A checkpoint's image preprocessing is what a run trains on and what its export writes."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from vlmscale.config import SFTConfig, load_config
from vlmscale.data.render import render_sample
from vlmscale.model.build import build_model, load_weights_plain

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def imagenet_export(tiny_export, tmp_path_factory):
    """The tiny export with InternVL's own preprocessing: ImageNet statistics, up to 12 tiles."""
    out = tmp_path_factory.mktemp("imagenet") / "hf"
    shutil.copytree(tiny_export, out)
    GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=12,
                             image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(out)
    return out


def _wide_image() -> bytes:
    """8:1, so 12 tiles allow 8 (+ thumbnail) and the old default of 6 fewer."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 256, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _vlmscale_pixels(assets, data: bytes) -> torch.Tensor:
    record = {"messages": [{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "x"}],
              "images": ["a.png"]}
    return render_sample(record, {"a.png": data}, assets, max_seq_len=4096).pixel_values


def _assets(overrides: list[str]):
    cfg = load_config(SFTConfig, overrides=overrides)
    _, assets = build_model(cfg.model, max_tiles=cfg.tile_limit(), dtype=torch.float32, load_weights=load_weights_plain)
    return assets


def test_pixels_match_stock_processor(imagenet_export):
    data = _wide_image()
    ours = _vlmscale_pixels(_assets([f"model.init_from={imagenet_export}"]), data)
    stock = AutoImageProcessor.from_pretrained(imagenet_export)(images=[Image.open(io.BytesIO(data)).convert("RGB")],
                                                                 return_tensors="np")["pixel_values"]
    assert ours.shape[0] == 9 and ours.shape == stock.shape
    np.testing.assert_allclose(ours.numpy(), stock, rtol=0, atol=1e-6)


def test_explicit_max_tiles_overrides_only_max_patches(imagenet_export):
    assets = _assets([f"model.init_from={imagenet_export}", "data.max_tiles=6"])
    assert assets.image_processor.max_patches == 6
    assert list(assets.image_processor.image_mean) == IMAGENET_MEAN
    assert _vlmscale_pixels(assets, _wide_image()).shape[0] == 7


def test_explicit_keys_come_from_yaml_and_overrides(tmp_path):
    assert load_config(SFTConfig).tile_limit() == 6
    assert load_config(SFTConfig, overrides=["model.init_from=x"]).tile_limit() is None
    (tmp_path / "run.yaml").write_text("model: {init_from: x}\ndata: {max_tiles: 3}\n")
    cfg = load_config(SFTConfig, path=tmp_path / "run.yaml")
    assert "data.max_tiles" in cfg.explicit_keys and cfg.tile_limit() == 3


def test_export_keeps_checkpoint_preprocessing(imagenet_export, tmp_path, process_group):
    from tests.unit.engines import zero3_engine
    from vlmscale.train.step import export_hf

    engine, assets = zero3_engine(imagenet_export)
    export_hf(engine, assets=assets, out_dir=tmp_path / "hf", meta={})
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == IMAGENET_MEAN and pre["image_std"] == IMAGENET_STD and pre["max_patches"] == 12
    video = json.loads((tmp_path / "hf" / "video_preprocessor_config.json").read_text())
    assert video["image_mean"] == IMAGENET_MEAN
    data = _wide_image()
    again = AutoImageProcessor.from_pretrained(tmp_path / "hf")(images=[Image.open(io.BytesIO(data)).convert("RGB")],
                                                                 return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(_vlmscale_pixels(assets, data).numpy(), again, rtol=0, atol=1e-6)
