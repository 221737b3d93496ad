"""model.vision + model.llm: a vision encoder and an LLM joined by a fresh projector."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlmscale.config import SFTConfig, load_config
from vlmscale.model.build import build_model, load_pretrained, load_weights_plain, preset_tokenizer


def test_compose_copies_both_halves(tmp_path):
    torch.manual_seed(0)
    base_cfg = load_config(SFTConfig, overrides=["model.preset=tiny"])
    vlm, assets = build_model(base_cfg.model, max_tiles=2, dtype=torch.float32, load_weights=load_weights_plain)
    vlm.save_pretrained(tmp_path / "vision_src")
    assets.save(tmp_path / "vision_src")

    tok = preset_tokenizer("tiny")
    llm = Qwen2ForCausalLM(Qwen2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                       intermediate_size=96, vocab_size=len(tok), tie_word_embeddings=False))
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")

    cfg = load_config(SFTConfig, overrides=[f"model.vision={tmp_path / 'vision_src'}", f"model.llm={tmp_path / 'llm'}"])
    model, composed_assets = build_model(cfg.model, max_tiles=2, dtype=torch.float32, load_weights=load_weights_plain)
    got = dict(model.named_parameters())
    for name, p in vlm.named_parameters():
        if name.startswith("model.vision_tower."):
            assert torch.equal(got[name], p), name
    for name, p in llm.named_parameters():
        target = name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name
        assert torch.equal(got[target], p), name
    assert model.config.text_config.hidden_size == 48
    assert got["model.multi_modal_projector.linear_2.weight"].shape == (48, 48)
    assert composed_assets.image_seq_length == assets.image_seq_length

    model.save_pretrained(tmp_path / "composed")
    composed_assets.save(tmp_path / "composed")
    reloaded, _ = load_pretrained(str(tmp_path / "composed"), max_tiles=2, dtype=torch.float32)
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, got[name]), name


def test_init_from_rejects_non_internvl(tmp_path):
    llm = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                       intermediate_size=32, vocab_size=64))
    llm.save_pretrained(tmp_path)
    try:
        load_pretrained(str(tmp_path), max_tiles=2, dtype=torch.float32)
    except ValueError as exc:
        assert "model.vision + model.llm" in str(exc)
    else:
        raise AssertionError("expected ValueError")
