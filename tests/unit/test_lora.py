import torch

from vlmscale.config import SFTConfig, load_config
from vlmscale.model.build import build_model, load_weights_plain
from vlmscale.model.forward import vlm_logits
from vlmscale.model.lora import add_lora, merge_lora_state_dict
from vlmscale.model.policy import apply_policy


def test_merged_export_equals_adapted_model():
    torch.manual_seed(0)
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny", "lora.enabled=true", "lora.r=4", "lora.alpha=8"])
    model, _ = build_model(cfg.model, max_tiles=2, dtype=torch.float32, load_weights=load_weights_plain)
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, cfg.lora)
    groups, summary = apply_policy(model, cfg.policy, base_lr=1e-3, weight_decay=0.0, lora=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("model.language_model.")]
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():  # peft initialises B to zero; make the adapters do something
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 100, (2, 12))
    adapted = vlm_logits(model, input_ids=ids, attention_mask=None, pixel_values=None)
    merged = merge_lora_state_dict(model.state_dict(), scaling=cfg.lora.alpha / cfg.lora.r)
    assert merged.keys() == plain_state.keys()
    fresh, _ = build_model(load_config(SFTConfig, overrides=["model.preset=tiny"]).model, max_tiles=2,
                           dtype=torch.float32, load_weights=load_weights_plain)
    fresh.load_state_dict(merged)
    torch.testing.assert_close(vlm_logits(fresh, input_ids=ids, attention_mask=None, pixel_values=None), adapted,
                               rtol=1e-4, atol=1e-4)
