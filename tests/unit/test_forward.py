"""The training forward: image scatter, the text-only dummy tile, activation checkpointing."""

import torch

from vlmscale.config import SFTConfig, load_config
from vlmscale.data.dataset import Item, collate
from vlmscale.data.render import render_sample
from vlmscale.data.shards import ShardDataset
from vlmscale.model.build import build_model, load_weights_plain
from vlmscale.model.forward import token_losses, vlm_logits


def _model():
    torch.manual_seed(0)
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny"])
    return build_model(cfg.model, max_tiles=4, dtype=torch.float32, load_weights=load_weights_plain)


def _batch(demo_dir, assets, source):
    ds = ShardDataset(demo_dir / "train" / source)
    items = []
    for i in range(3):
        import json
        _, members = ds.read(i)
        items.append(Item(render_sample(json.loads(members["json"]), members, assets, max_seq_len=512), str(i), 0, []))
    return collate(items, pad_id=assets.tokenizer.pad_token_id)


def _loss(model, b):
    logits = vlm_logits(model, input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
    return token_losses(logits, b["labels"]).sum()


def test_matches_stock_forward(demo_dir):
    model, assets = _model()
    b = _batch(demo_dir, assets, "vqa")
    ours = vlm_logits(model, input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
    stock = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"]).logits
    torch.testing.assert_close(ours, stock)


def test_text_only_batch_runs_vision_with_zero_effect(demo_dir):
    model, assets = _model()
    b = _batch(demo_dir, assets, "text")
    assert b["pixel_values"] is None
    loss = _loss(model, b)
    loss.backward()
    vision_grads = [p.grad for n, p in model.named_parameters() if n.startswith("model.vision_tower.")]
    assert all(g is not None for g in vision_grads)  # the encoder ran (ZeRO-3 collectives match across ranks)
    assert all(torch.count_nonzero(g) == 0 for g in vision_grads)  # ... and contributed nothing
    stock = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(token_losses(stock, b["labels"]).sum(), loss)


def test_activation_checkpointing_changes_nothing(demo_dir):
    model, assets = _model()
    model.train()
    b = _batch(demo_dir, assets, "vqa")
    ref = _loss(model, b)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    got = _loss(model, b)
    got.backward()
    torch.testing.assert_close(got, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=n)


def test_supervised_loss_sum_matches_full_logits(demo_dir):
    """The LM head on supervised positions only gives the same loss and gradients as full logits."""
    from vlmscale.model.forward import supervised_loss_sum, vlm_hidden

    model, assets = _model()
    b = _batch(demo_dir, assets, "vqa")
    assert int((b["labels"] != -100).sum()) < b["labels"].numel() // 2  # most positions are unsupervised
    full = _loss(model, b)
    full.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden = vlm_hidden(model, input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
    kept = supervised_loss_sum(model, hidden, b["labels"])
    kept.backward()
    torch.testing.assert_close(kept, full)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)
