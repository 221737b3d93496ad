"""EWC: the penalty by hand, its files, and its gradient inside a ZeRO-3 step (in process, world size 1)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.unit.engines import batches, zero3_engine
from vlmscale.distributed.zero import local_fp32_param, local_grad
from vlmscale.model.build import load_pretrained
from vlmscale.regularize import ewc as ewc_mod
from vlmscale.regularize.ewc import EWC, ewc_penalty, missing_files, protects, read_flat_range, read_meta, write_files
from vlmscale.train.step import train_step

CPU = torch.device("cpu")


# ---------------------------------------------------------------- the penalty


def test_penalty_by_hand():
    value, grad = ewc_penalty(torch.tensor([1.0, 2.0, 3.0]), anchor=torch.tensor([0.0, 2.0, 5.0]),
                              fisher=torch.tensor([1.0, 0.5, 2.0]), weight=3.0)
    # diff (1, 0, -2): 3/2 * (1*1 + 0.5*0 + 2*4) = 13.5; gradient 3 * F * diff
    assert value == 13.5
    assert grad.tolist() == [3.0, 0.0, -12.0]


def test_penalty_gradient_is_the_derivative_of_the_value():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(1000, generator=g, dtype=torch.float64, requires_grad=True)
    anchor, fisher = torch.randn(1000, generator=g, dtype=torch.float64), torch.rand(1000, generator=g, dtype=torch.float64)
    value, grad = ewc_penalty(theta.detach(), anchor=anchor, fisher=fisher, weight=0.7)
    autograd_value = 0.35 * (fisher * (theta - anchor) ** 2).sum()
    autograd_value.backward()
    assert value == pytest.approx(float(autograd_value), rel=1e-12)
    assert torch.allclose(grad, theta.grad, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- files


def test_read_flat_range_reads_any_slice(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"matrix": torch.randn(7, 5, generator=g), "lead1": torch.randn(1, 9, 4, generator=g),
               "vector": torch.randn(11, generator=g), "single": torch.randn(1, 1, 1, generator=g),
               "conv": torch.randn(6, 3, 2, 2, generator=g)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        for name, full in tensors.items():
            flat = full.reshape(-1)
            n = flat.numel()
            for start, stop in [(0, n), (0, 1), (n - 1, n), (n // 3, n // 2 + 1), (1, n - 1), (n // 2, n // 2)]:
                got = read_flat_range(f, name, start, stop)
                assert torch.equal(got, flat[start:stop]), (name, start, stop)


def test_files_round_trip_in_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(ewc_mod, "SHARD_BYTES", 8 * 12)  # one (4, 3) pair of fp32 F and theta* per shard
    tensors = [(f"p{i}", torch.full((4, 3), float(i)), torch.full((4, 3), -float(i))) for i in range(3)]
    write_files(tmp_path, iter(tensors), meta={"params": "llm"})
    meta = read_meta(tmp_path)
    assert meta["files"] == ["ewc-00001.safetensors", "ewc-00002.safetensors", "ewc-00003.safetensors"]
    assert meta["shapes"] == {f"p{i}": [4, 3] for i in range(3)} and meta["params"] == "llm"
    for name, fisher, anchor in tensors:
        with safe_open(str(tmp_path / meta["index"][name]), framework="pt") as f:
            assert torch.equal(f.get_tensor(f"fisher.{name}"), fisher)
            assert torch.equal(f.get_tensor(f"anchor.{name}"), anchor)
    assert missing_files(tmp_path) == []
    (tmp_path / "ewc-00002.safetensors").unlink()
    assert missing_files(tmp_path) == ["ewc-00002.safetensors"]
    assert missing_files(tmp_path / "nowhere") == ["ewc.json"]


def test_parameter_sets():
    assert protects("model.language_model.layers.0.mlp.up_proj.weight", "llm")
    assert protects("lm_head.weight", "llm")
    assert not protects("model.vision_tower.encoder.layer.0.mlp.fc1.weight", "llm")
    assert protects("model.vision_tower.encoder.layer.0.mlp.fc1.weight", "vision")
    assert protects("model.vision_tower.encoder.layer.0.mlp.fc1.weight", "both")
    assert not protects("model.multi_modal_projector.linear_1.weight", "both")


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides,needle", [
    (["regularizer.ewc.weight=-1"], "regularizer.ewc.weight must be >= 0"),
    (["regularizer.ewc.weight=1"], "needs regularizer.ewc.path"),
    (["regularizer.ewc.weight=1", "regularizer.ewc.path=x", "lora.enabled=true"], "lora.enabled"),
    (["regularizer.ewc.wieght=1"], "Did you mean 'weight'"),
])
def test_bad_ewc_config_names_the_field(overrides, needle):
    from vlmscale.config import ConfigError, SFTConfig, load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(SFTConfig, overrides=overrides)


def test_ewc_inputs_are_checked_before_launch(tmp_path):
    from vlmscale.config import ConfigError, SFTConfig, load_config
    from vlmscale.train.launch import check_paths

    with pytest.raises(ConfigError, match="lacks ewc.json"):
        check_paths(load_config(SFTConfig, overrides=["regularizer.ewc.weight=1", f"regularizer.ewc.path={tmp_path}"]))
    write_files(tmp_path, iter([("p", torch.ones(2), torch.zeros(2))]), meta={})
    ok = ["regularizer.ewc.weight=1", f"regularizer.ewc.path={tmp_path}"]
    check_paths(load_config(SFTConfig, overrides=ok))
    with pytest.raises(ConfigError, match="not stage 3"):
        check_paths(load_config(SFTConfig, overrides=[*ok, "deepspeed.config=ds_configs/zero2.json"]))
    assert load_config(SFTConfig).regularizer.ewc.weight == 0  # off by default


# ---------------------------------------------------------------- inside a ZeRO-3 step


def _full_weights(model_dir) -> dict[str, torch.Tensor]:
    model, _ = load_pretrained(str(model_dir), max_tiles=None, dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("ds_config", ["ds_configs/zero3.json", "ds_configs/zero3_offload.json"])
def test_ewc_gradient_is_weight_times_fisher_times_displacement(process_group, tiny_export, demo_dir, tmp_path, ds_config):
    """The gradient the update uses is the loss gradient plus weight * F * (theta - theta*), to 1e-6
    (also with the optimizer state and fp32 gradients offloaded to CPU)."""
    weight, lr = 2.0, 0.1
    theta0 = _full_weights(tiny_export)
    g = torch.Generator().manual_seed(0)
    files = {n: (torch.rand(t.shape, generator=g), t + 0.05 * torch.randn(t.shape, generator=g))
             for n, t in theta0.items() if protects(n, "both")}
    write_files(tmp_path, ((n, f, a) for n, (f, a) in files.items()), meta={"params": "both"})
    engine, assets = zero3_engine(tiny_export, optimizer=lambda ps: torch.optim.SGD(ps, lr=lr),
                                  policy=["policy.vision.trainable=true", f"deepspeed.config={ds_config}"])
    ewc = EWC.load(tmp_path, engine.module, weight=weight)
    params = dict(engine.module.named_parameters())
    before, after, values = {}, {}, []

    def apply_and_record():
        before.update({n: local_grad(p).clone() for n, p in params.items()})
        values.append(ewc.apply())
        after.update({n: local_grad(p).clone() for n, p in params.items()})
        return values[-1]

    stats = train_step(engine, batches(demo_dir / "train" / "vqa", assets, [[0]]), device=CPU, before_step=apply_and_record)

    want_value = 0.0
    for name, p in params.items():
        added = after[name] - before[name]
        if name in files:
            fisher, anchor = (t.flatten() for t in files[name])
            diff = theta0[name].flatten() - anchor
            assert torch.allclose(added, weight * fisher * diff, rtol=0, atol=1e-6), name
            want_value += 0.5 * weight * float((fisher.double() * diff.double() ** 2).sum())
        else:  # the projector is not protected
            assert torch.equal(added, torch.zeros_like(added)), name
        # the optimizer applied the sum (SGD: theta1 = theta0 - lr * gradient)
        assert torch.allclose(local_fp32_param(p), theta0[name].flatten() - lr * after[name], rtol=0, atol=1e-6), name
    assert values[0] == pytest.approx(want_value, rel=1e-9)
    assert stats.penalty == pytest.approx(want_value, rel=1e-9) and want_value > 1.0


def test_large_weight_holds_protected_parameters_near_the_anchor(process_group, tiny_export, demo_dir, tmp_path):
    """F = 1 on the LLM, the recipes' AdamW and schedule: with weight 1000 the LLM stays within eps of
    theta* while the vision encoder and projector move; with weight 0 (the control) the LLM moves too.

    eps is twice the peak learning rate, not ~0: an Adam step moves a coordinate by about lr however
    strong the pull back (the update is normalised by the gradient's running RMS), so a large weight
    bounds the drift by the step size rather than removing it.
    """
    lr, steps = 1e-2, 20
    eps = 2 * lr
    theta0 = _full_weights(tiny_export)
    write_files(tmp_path, ((n, torch.ones_like(t), t) for n, t in theta0.items() if protects(n, "llm")), meta={})

    def drift(weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per tensor, the largest |theta - theta*| after the run: (LLM, the rest)."""
        engine, assets = zero3_engine(tiny_export, policy=["policy.vision.trainable=true", f"policy.projector.lr={lr}"],
                                      lr=lr, max_grad_norm=1.0, max_steps=steps, micro_batch_size=2)
        ewc = EWC.load(tmp_path, engine.module, weight=weight)
        for b in batches(demo_dir / "train" / "vqa", assets, [[2 * k, 2 * k + 1] for k in range(steps)]):
            train_step(engine, [b], device=CPU, before_step=ewc.apply)
        moved = {n: float((local_fp32_param(p) - theta0[n].flatten()).abs().max())
                 for n, p in engine.module.named_parameters()}
        return (torch.tensor([d for n, d in moved.items() if protects(n, "llm")]),
                torch.tensor([d for n, d in moved.items() if not protects(n, "llm")]))

    protected, free = drift(1000.0)
    control, _ = drift(0.0)
    seen = {k: (round(float(v.max()), 4), round(float(v.median()), 4))
            for k, v in (("protected", protected), ("free", free), ("control", control))}  # (max, median)
    # measured: protected (0.012, 0.002), free (0.08, 0.043), control (0.115, 0.085)
    assert float(protected.max()) < eps, seen
    assert float(free.median()) > eps, seen
    assert float(control.median()) > 2 * eps, seen


def test_load_rejects_files_that_protect_nothing_or_another_model(process_group, tiny_export, tmp_path):
    theta0 = _full_weights(tiny_export)
    vision = tmp_path / "vision"
    write_files(vision, ((n, torch.ones_like(t), t) for n, t in theta0.items() if protects(n, "vision")), meta={})
    engine, _ = zero3_engine(tiny_export)  # SFT default policy: the vision encoder is frozen
    with pytest.raises(ValueError, match="none of the .* is trainable"):
        EWC.load(vision, engine.module, weight=1.0)
    other = tmp_path / "other"
    write_files(other, iter([("model.language_model.layers.9.mlp.up_proj.weight", torch.ones(2), torch.ones(2))]), meta={})
    with pytest.raises(ValueError, match="match no parameter"):
        EWC.load(other, engine.module, weight=1.0)


# ---------------------------------------------------------------- the Fisher estimate


def test_fisher_is_the_mean_squared_per_sample_gradient(process_group, tiny_export, demo_dir, tmp_path):
    from vlmscale.config.schema import VideoConfig
    from vlmscale.data.dataset import Item, collate
    from vlmscale.data.render import render_sample
    from vlmscale.data.shards import ShardDataset
    from vlmscale.model.forward import token_losses, vlm_logits
    from vlmscale.regularize.fisher import estimate_fisher, sample_indices

    data_dir = demo_dir / "train" / "vqa"
    meta = estimate_fisher(model_dir=str(tiny_export), data_dir=str(data_dir), out_dir=str(tmp_path / "f"),
                           dist=process_group, num_samples=5, params="llm", dtype=torch.float32, seed=3)
    assert meta["samples"] == 5 and meta["params"] == "llm" and meta["skipped"] == {}

    model, assets = load_pretrained(str(tiny_export), max_tiles=None, dtype=torch.float32)
    data = ShardDataset(data_dir)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters() if protects(n, "llm")}
    indices = sample_indices(len(data), 5, seed=3)
    assert len(set(indices)) == 5 and indices != list(range(5))  # a seeded subset, not the first five
    for i in indices:
        _, members = data.read(i)
        b = collate([Item(render_sample(json.loads(members["json"]), members, assets, max_seq_len=4096,
                                        video=VideoConfig()), "", 0, [])], pad_id=assets.tokenizer.pad_token_id)
        model.zero_grad()
        logits = vlm_logits(model, input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            pixel_values=b["pixel_values"], tile_pool=b["tile_pool"])
        token_losses(logits, b["labels"]).sum().backward()
        for n in want:
            want[n] += dict(model.named_parameters())[n].grad ** 2 / 5
    saved = read_meta(tmp_path / "f")
    assert set(saved["index"]) == set(want)
    with safe_open(str(tmp_path / "f" / saved["index"][next(iter(want))]), framework="pt") as f:
        for n, w in want.items():
            assert torch.allclose(f.get_tensor(f"fisher.{n}"), w, rtol=1e-4, atol=1e-6 * float(w.max())), n
            assert torch.equal(f.get_tensor(f"anchor.{n}"), dict(model.named_parameters())[n].detach())


def test_fisher_command_refuses_bad_inputs_before_any_process_group(tiny_export, tmp_path, capsys):
    from vlmscale.cli import main

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    base = ["ewc", "fisher", "--model", str(tiny_export), "--data", str(tiny_export)]
    for args, needle in [([*base, "--out", str(busy)], "is not empty"),
                         ([*base, "--out", str(tmp_path / "o"), "--deepspeed", "ds_configs/zero2.json"], "ZeRO-3"),
                         ([*base, "--out", str(tmp_path / "o"), "--samples", "0"], "--samples"),
                         (["ewc", "fisher", "--model", str(tmp_path), "--data", ".", "--out", str(tmp_path / "o")],
                          "no config.json")]:
        assert main(args) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
