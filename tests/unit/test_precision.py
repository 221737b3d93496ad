"""train.precision: what ``auto`` picks on each kind of hardware (capabilities mocked), resume rules,
the deprecated ``train.bf16`` alias and the DeepSpeed JSON it fills."""

from __future__ import annotations

import json

import pytest
import torch

from vlmscale import precision
from vlmscale.config import ConfigError, SFTConfig, load_config
from vlmscale.config.deepspeed import build_ds_config
from vlmscale.config.schema import DEPRECATIONS


@pytest.fixture
def cpu(monkeypatch):
    """A CPU-only host whose feature flags the test sets."""
    def set_flags(flags: set[str] | None, model: str = "Test CPU"):
        monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
        monkeypatch.setattr(precision, "cpu_model", lambda: model)
        monkeypatch.setattr(precision, "cuda_capability", lambda: None)
        precision.cpu_bf16.cache_clear()
    yield set_flags
    precision.cpu_bf16.cache_clear()


@pytest.fixture
def gpu(monkeypatch):
    def set_capability(cap: tuple[int, int], name: str = "Test GPU"):
        monkeypatch.setattr(precision, "cuda_capability", lambda: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    return set_capability


def test_auto_on_a_cpu_with_native_bf16_picks_bf16(cpu):
    cpu({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "Intel Xeon")
    d = precision.resolve("auto")
    assert d.precision == "bf16" and "native bf16" in d.reason and "amx_bf16" in d.reason


def test_auto_on_a_cpu_without_native_bf16_picks_fp32(cpu):
    cpu({"avx2", "fma", "sse4_2"}, "AMD EPYC 7B13")
    d = precision.resolve("auto")
    assert d.precision == "fp32" and "no native bf16" in d.reason and "AMD EPYC" in d.reason


def test_auto_on_an_arm_cpu_reads_its_features(cpu):
    cpu({"fp", "asimd", "bf16", "sve"})
    assert precision.resolve("auto").precision == "bf16"


def test_unreadable_flags_fall_back_to_a_measured_matmul(cpu, monkeypatch):
    cpu(None)
    rates = {torch.bfloat16: 1.0, torch.float32: 80.0}  # bf16 80x slower: emulated
    monkeypatch.setattr(precision, "_matmul_rate", lambda dtype, **_: rates[dtype])
    d = precision.resolve("auto")
    assert d.precision == "fp32" and "measured" in d.reason
    precision.cpu_bf16.cache_clear()
    rates[torch.bfloat16] = 200.0
    assert precision.resolve("auto").precision == "bf16"


def test_auto_on_gpus(gpu):
    gpu((9, 0), "NVIDIA H100 80GB HBM3")
    assert precision.resolve("auto").precision == "bf16"
    gpu((8, 0), "NVIDIA A100-SXM4-40GB")
    assert precision.resolve("auto").precision == "bf16"
    gpu((7, 0), "Tesla V100-SXM2-32GB")
    d = precision.resolve("auto")
    assert d.precision == "fp16" and "loss scaling" in d.reason
    with pytest.raises(precision.PrecisionError, match="no native bf16 on this GPU"):
        precision.resolve("bf16")


def test_fp16_is_refused_on_cpu(cpu):
    cpu({"avx2"})
    with pytest.raises(precision.PrecisionError, match="fp16 needs a CUDA GPU"):
        precision.resolve("fp16")


def test_resume_auto_keeps_the_checkpoint_precision(cpu):
    cpu({"avx2"})  # this host alone would pick fp32
    d = precision.resolve("auto", checkpoint="bf16")
    assert d.precision == "bf16" and d.slow and "kept the checkpoint's bf16" in d.reason
    cpu({"avx512_bf16"})
    d = precision.resolve("auto", checkpoint="fp32")
    assert d.precision == "fp32" and not d.slow


def test_resume_auto_refuses_what_the_hardware_cannot_run(cpu, gpu):
    cpu({"avx2"})
    with pytest.raises(precision.PrecisionError, match="trained in fp16, which this device cannot run"):
        precision.resolve("auto", checkpoint="fp16")
    gpu((7, 5), "Tesla T4")
    with pytest.raises(precision.PrecisionError, match="trained in bf16"):
        precision.resolve("auto", checkpoint="bf16")


@pytest.mark.parametrize("saved,asked", [("bf16", "fp32"), ("fp32", "bf16")])
def test_resume_with_an_explicit_other_precision_names_the_fix(cpu, saved, asked):
    cpu({"avx512_bf16"})
    with pytest.raises(precision.PrecisionError, match=f"train.precision={saved} \\(or auto\\) to resume"):
        precision.resolve(asked, checkpoint=saved, checkpoint_path="/runs/x/checkpoints/step-00000004")


def test_checkpoint_precision_from_commit_or_file_names(tmp_path):
    assert precision.checkpoint_precision(tmp_path, {"precision": "fp16"}) == "fp16"
    assert precision.checkpoint_precision(tmp_path, {}) is None
    (tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert precision.checkpoint_precision(tmp_path, {"step": 4}) == "bf16"
    other = tmp_path / "b"
    other.mkdir()
    (other / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert precision.checkpoint_precision(other, None) == "fp32"


def test_bf16_alias_is_deprecated_but_works():
    DEPRECATIONS.clear()
    cfg = load_config(SFTConfig, overrides=["train.bf16=false"])
    assert cfg.train.precision == "fp32" and cfg.train.bf16 is None
    assert any("train.bf16 is deprecated" in d for d in DEPRECATIONS)
    assert load_config(SFTConfig, overrides=["train.bf16=true"]).train.precision == "bf16"
    with pytest.raises(ConfigError, match="contradicts train.precision=fp32"):
        load_config(SFTConfig, overrides=["train.bf16=true", "train.precision=fp32"])
    with pytest.raises(ConfigError, match="expected one of auto, bf16, fp16, fp32"):
        load_config(SFTConfig, overrides=["train.precision=fp64"])
    assert load_config(SFTConfig, overrides=[]).train.precision == "auto"


@pytest.mark.parametrize("flags,want", [({"avx2"}, "fp32"), ({"amx_bf16"}, "bf16")])
def test_deepspeed_json_follows_auto(cpu, flags, want):
    cpu(flags)
    ds = build_ds_config(load_config(SFTConfig, overrides=[]), world_size=2)
    assert ds["bf16"]["enabled"] is (want == "bf16") and ds["fp16"]["enabled"] is False


def test_deepspeed_json_fp16_gets_dynamic_loss_scaling(gpu):
    gpu((7, 0))
    ds = build_ds_config(load_config(SFTConfig, overrides=[]), world_size=1)
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0 and ds["bf16"]["enabled"] is False


def test_deepspeed_json_contradicting_an_explicit_precision_is_an_error(tmp_path, cpu):
    cpu({"amx_bf16"})
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    cfg = load_config(SFTConfig, overrides=[f"deepspeed.config={path}", "train.precision=fp32"])
    with pytest.raises(ConfigError, match="bf16.enabled=True contradicts train.precision=fp32"):
        build_ds_config(cfg, world_size=1)
