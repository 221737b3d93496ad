"""Activation checkpointing per module: the same losses and gradients, and only the chosen modules recompute."""

import json
from collections import Counter

import pytest
import torch

from vlmscale.config import ConfigError, SFTConfig, load_config
from vlmscale.data.dataset import Item, collate
from vlmscale.data.render import render_sample
from vlmscale.data.shards import ShardDataset
from vlmscale.model.build import build_model, load_weights_plain
from vlmscale.model.checkpointing import enable_activation_checkpointing
from vlmscale.model.forward import token_losses, vlm_logits


def _model():
    torch.manual_seed(0)
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny"])
    model, assets = build_model(cfg.model, max_tiles=4, dtype=torch.float32, load_weights=load_weights_plain)
    return model.train(), assets


def _batch(demo_dir, assets):
    ds = ShardDataset(demo_dir / "train" / "vqa")
    items = []
    for i in range(3):
        _, members = ds.read(i)
        items.append(Item(render_sample(json.loads(members["json"]), members, assets, max_seq_len=512), str(i), 0, []))
    return collate(items, pad_id=assets.tokenizer.pad_token_id)


def _count_mlp_calls(model) -> Counter:
    """Entries into each layer's MLP. Checkpointing wraps a layer's ``forward`` (the layer's own hooks
    stay outside), so a recompute shows in the hooks of the modules inside it; pre-hooks, because the
    recompute stops as soon as the last saved tensor it needs is rebuilt, which for the LLM is inside
    the MLP's final projection, before a forward hook would run."""
    calls: Counter = Counter()
    layers = {"llm": model.model.language_model.layers, "vision": model.model.vision_tower.encoder.layer}
    for name, stack in layers.items():
        for layer in stack:
            layer.mlp.register_forward_pre_hook(lambda *_, name=name: calls.update([name]))
    return calls


def _step(model, batch):
    model.zero_grad()
    logits = vlm_logits(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], tile_pool=batch["tile_pool"])
    loss = token_losses(logits, batch["labels"]).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("llm", "vision"), [(True, False), (False, True), (True, True)])
def test_checkpointing_keeps_losses_and_recomputes_only_its_modules(demo_dir, llm, vision):
    model, assets = _model()
    batch = _batch(demo_dir, assets)
    calls = _count_mlp_calls(model)
    ref_loss, ref_grads = _step(model, batch)
    layers = {"llm": len(model.model.language_model.layers), "vision": len(model.model.vision_tower.encoder.layer)}
    assert calls == Counter(layers)  # one forward each, nothing recomputed
    calls.clear()

    enable_activation_checkpointing(model, llm=llm, vision=vision)
    loss, grads = _step(model, batch)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    assert calls == Counter({"llm": layers["llm"] * (2 if llm else 1), "vision": layers["vision"] * (2 if vision else 1)})


def test_config_per_module_and_the_older_single_switch():
    ac = load_config(SFTConfig).train.activation_checkpointing
    assert (ac.llm, ac.vision) == (False, False)
    ac = load_config(SFTConfig, overrides=["train.activation_checkpointing.vision=true"]).train.activation_checkpointing
    assert (ac.llm, ac.vision) == (False, True)
    ac = load_config(SFTConfig, overrides=["train.activation_checkpointing={llm: true}"]).train.activation_checkpointing
    assert (ac.llm, ac.vision) == (True, False)
    ac = load_config(SFTConfig, overrides=["train.activation_checkpointing=true"]).train.activation_checkpointing
    assert (ac.llm, ac.vision) == (True, True)  # the older boolean form: the whole model, as before
    with pytest.raises(ConfigError, match="Did you mean 'vision'"):
        load_config(SFTConfig, overrides=["train.activation_checkpointing.vison=true"])
