"""The 2-D position cue on image tokens (``model.image_pos_scale``, issue #20).

Off (0) it leaves vlmscale's image features exactly transformers' ``get_image_features``, which keeps the
forward-equality tests against ``InternVLForConditionalGeneration`` (tests/unit/test_hf_reference.py, the
tiny preset, where it is off) meaningful. On, it adds the same fixed table to every tile, and the setting
travels with the exported config.json.
"""

import pytest
import torch

from vlmscale.config import SFTConfig, load_config
from vlmscale.config.load import ConfigError
from vlmscale.model.build import build_model, load_pretrained, load_weights_plain
from vlmscale.model.forward import image_features, image_pos_table


def _tiny(*overrides):
    torch.manual_seed(0)
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny", *overrides])
    model, assets = build_model(cfg.model, max_tiles=4, dtype=torch.float32, load_weights=load_weights_plain)
    return model.eval(), assets


def test_table_is_centred_unit_rms_and_tells_every_cell_apart():
    table = image_pos_table(3, 64, dtype=torch.float32, device=torch.device("cpu"))
    assert table.shape == (9, 64)
    assert torch.allclose(table.mean(0), torch.zeros(64), atol=1e-6)
    assert table.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-5)
    dist = torch.cdist(table, table) + torch.eye(9) * 1e9
    assert dist.min() > 0.1  # no two cells share a code


def test_off_is_transformers_features_and_on_adds_the_table_to_every_tile():
    model, _ = _tiny()
    assert model.config.image_pos_scale == 0.0  # the tiny preset (the forward-equality tests) keeps it off
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        assert torch.equal(image_features(model, pixels), reference.reshape(-1, reference.shape[-1]))
        model.config.image_pos_scale = 0.5
        on = image_features(model, pixels).reshape(reference.shape)
    seq, hidden = reference.shape[1:]
    table = image_pos_table(int(seq ** 0.5), hidden, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.allclose(on - reference, 0.5 * table.expand_as(reference), atol=1e-6)


def test_setting_comes_from_preset_override_and_checkpoint(tmp_path):
    demo_cfg = load_config(SFTConfig, overrides=[])
    assert demo_cfg.model.image_pos_scale is None  # null: the preset decides (off in both; opt-in)
    model, _ = _tiny("model.image_pos_scale=0.25")
    assert model.config.image_pos_scale == 0.25
    model.save_pretrained(tmp_path / "hf")
    from vlmscale.model.build import preset_assets

    preset_assets("tiny").save(tmp_path / "hf")
    loaded, _ = load_pretrained(str(tmp_path / "hf"), max_tiles=None, dtype=torch.float32)
    assert loaded.config.image_pos_scale == 0.25  # kept by the export's config.json
    override = load_config(SFTConfig, overrides=[f"model.init_from={tmp_path / 'hf'}", "model.image_pos_scale=0"])
    off, _ = load_pretrained(str(tmp_path / "hf"), max_tiles=None, dtype=torch.float32, cfg=override.model)
    assert off.config.image_pos_scale == 0.0


def test_negative_scale_is_a_config_error():
    with pytest.raises(ConfigError, match="image_pos_scale"):
        load_config(SFTConfig, overrides=["model.image_pos_scale=-1"])
