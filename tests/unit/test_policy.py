import torch

from vlmscale.config import SFTConfig, load_config
from vlmscale.model.build import build_model, load_weights_plain
from vlmscale.model.policy import apply_policy, module_of


def _model():
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny"])
    model, _ = build_model(cfg.model, max_tiles=2, dtype=torch.float32, load_weights=load_weights_plain)
    return model


def test_stage_style_freezing_and_lrs():
    model = _model()
    cfg = load_config(SFTConfig, overrides=["policy.vision.trainable=true", "policy.vision.lr=1e-5",
                                            "policy.vision.layers=1-1", "policy.projector.lr=1e-3", "policy.llm.trainable=false"])
    groups, summary = apply_policy(model, cfg.policy, base_lr=2e-4, weight_decay=0.1)
    for name, p in model.named_parameters():
        module = module_of(name)
        if module == "llm":
            assert not p.requires_grad, name
        elif module == "projector":
            assert p.requires_grad, name
        else:
            assert p.requires_grad == name.startswith("model.vision_tower.encoder.layer.1."), name
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["projector"] == 1e-3 and lrs["vision"] == 1e-5
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("no_decay"))
    assert summary.trainable["llm"] == 0 and summary.frozen["llm"] > 0
    assert "vision" in summary.table()


def test_layer_range_beyond_encoder_is_an_error():
    model = _model()
    cfg = load_config(SFTConfig, overrides=["policy.vision.trainable=true", "policy.vision.layers=0-9"])
    try:
        apply_policy(model, cfg.policy, base_lr=1e-4, weight_decay=0.0)
    except ValueError as exc:
        assert "layers 0-1" in str(exc)
    else:
        raise AssertionError("expected ValueError")
