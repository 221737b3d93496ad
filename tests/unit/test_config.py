import re
from pathlib import Path

import pytest

from vlmscale.config import ConfigError, SFTConfig, load_config, parse_cli
from vlmscale.config.deepspeed import build_ds_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_validate():
    cfg = load_config(SFTConfig)
    assert cfg.model.preset == "demo" and cfg.resume == "auto"


def test_overrides_are_typed_and_nested():
    cfg = load_config(SFTConfig, overrides=["train.max_steps=7", "optim.lr=3e-4", "policy.vision.layers=1-2",
                                            "policy.vision.trainable=true"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.policy.vision.layer_range() == (1, 2)


@pytest.mark.parametrize("override,needle", [
    ("train.max_step=5", "Did you mean 'max_steps'"),
    ("trian.max_steps=5", "Did you mean 'train'"),
    ("train.max_steps=abc", "train.max_steps: expected an integer"),
    ("train.bf16=maybe", "train.bf16: expected true/false"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be >= 1"),
    ("model.preset=huge", "model.preset='huge'"),
    ("policy.vision.layers=5-1", "start must be <= end"),
    ("policy.projector.layers=1-2", "only the vision encoder"),
    ("data.max_bad_fraction=2", "data.max_bad_fraction"),
    ("noequals", "must look like key=value"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, overrides=[override])
    assert needle in str(err.value)


def test_all_frozen_is_rejected():
    with pytest.raises(ConfigError, match="every module is frozen"):
        load_config(SFTConfig, overrides=["policy.vision.trainable=false", "policy.projector.trainable=false", "policy.llm.lr=0"])


def test_cli_parsing_drops_local_rank():
    path, overrides = parse_cli(["--local_rank=1", "--config", "a.yaml", "x.y=1"])
    assert path == "a.yaml" and overrides == ["x.y=1"]
    with pytest.raises(ConfigError):
        parse_cli(["--bogus"])


@pytest.mark.parametrize("yaml_file", sorted((REPO / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_validates(yaml_file):
    """Each against the stage its name starts with (dpo_*.yaml is a DPO config); the rest are SFT configs."""
    from vlmscale.config import DPOConfig, GRPOConfig

    stage = {"dpo": DPOConfig, "grpo": GRPOConfig}.get(yaml_file.name.split("_")[0], SFTConfig)
    load_config(stage, path=yaml_file)


@pytest.mark.parametrize("ds_file", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_ds_configs_are_filled_from_run_config(ds_file):
    cfg = load_config(SFTConfig, overrides=[f"deepspeed.config={ds_file}", "train.micro_batch_size=3", "train.grad_accum_steps=2"])
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == cfg.optim.max_grad_norm
    assert ds["bf16"]["enabled"] is True


def test_ds_contradiction_is_an_error(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 3}}')
    cfg = load_config(SFTConfig, overrides=[f"deepspeed.config={bad}", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16"):
        build_ds_config(cfg, world_size=2)


def test_global_batch_must_match_world():
    cfg = load_config(SFTConfig, overrides=["train.global_batch_size=32", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="world_size"):
        build_ds_config(cfg, world_size=3)
    # the error names the grad_accum_steps that fits (32 = 4 x 2 x 4 ranks), or the per-rank product when none does
    with pytest.raises(ConfigError, match=re.escape("set train.grad_accum_steps=2")):
        build_ds_config(cfg, world_size=4)
    with pytest.raises(ConfigError, match=re.escape("train.micro_batch_size x train.grad_accum_steps = 3.2 per rank")):
        build_ds_config(cfg, world_size=10)


def test_ds_optimizer_section_rejected(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}')
    cfg = load_config(SFTConfig, overrides=[f"deepspeed.config={bad}"])
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        build_ds_config(cfg, world_size=1)


def test_stage_defaults_follow_the_seeds():
    from vlmscale.config import AlignConfig, PretrainConfig

    align = load_config(AlignConfig)
    assert (align.policy.vision.trainable, align.policy.projector.trainable, align.policy.llm.trainable) == (False, True, False)
    assert align.optim.lr == pytest.approx(1e-3)
    pre = load_config(PretrainConfig)
    assert (pre.policy.vision.trainable, pre.policy.projector.trainable, pre.policy.llm.trainable) == (False, True, True)
    assert [s.weight for s in pre.data.sources] == [1.0, 1.0]  # interleaved : pairs = 1 : 1


def test_align_with_frozen_projector_is_rejected():
    from vlmscale.config import AlignConfig

    with pytest.raises(ConfigError, match="policy.projector must be trainable"):
        load_config(AlignConfig, overrides=["policy.projector.trainable=false", "policy.llm.trainable=true"])


def test_missing_inputs_are_config_errors_before_launch(tmp_path):
    from vlmscale.train.launch import check_paths

    cfg = load_config(SFTConfig, overrides=[f"data.sources=[{{name: x, path: '{tmp_path / 'nope'}', weight: 1}}]"])
    with pytest.raises(ConfigError, match="does not exist"):
        check_paths(cfg)
    cfg = load_config(SFTConfig, overrides=[f"model.init_from={tmp_path}"])
    with pytest.raises(ConfigError, match="no config.json"):
        check_paths(cfg)
    check_paths(load_config(SFTConfig))  # demo sources and the shipped DeepSpeed JSON resolve


def test_text_fraction_sets_the_text_only_share():
    from vlmscale.data.mixture import Mixture

    cfg = load_config(SFTConfig, overrides=["data.text_fraction=0.2"])
    w = cfg.data.mixture_weights()
    text = sum(x for x, s in zip(w, cfg.data.sources) if s.text_only)
    assert abs(text / sum(w) - 0.2) < 1e-9
    # relative weights of the image sources are unchanged
    vqa, grounding = w[0], w[1]
    assert abs(vqa / grounding - 5.0 / 1.5) < 1e-9
    none = load_config(SFTConfig, overrides=["data.text_fraction=0"])
    m = Mixture(sizes=[100] * 5, weights=none.data.mixture_weights(), seed=0)
    assert all(m.locate(p)[0] != 4 for p in range(3000))  # the text source is never drawn
    assert load_config(SFTConfig).data.mixture_weights() == [5.0, 1.5, 1.0, 2.0, 1.5]
    with pytest.raises(ConfigError, match="text_only"):
        load_config(SFTConfig, overrides=["data.text_fraction=0.2",
                                          "data.sources=[{name: a, path: x, weight: 1}]"])
    with pytest.raises(ConfigError, match="text_fraction"):
        load_config(SFTConfig, overrides=["data.text_fraction=1.5"])


@pytest.mark.parametrize("override,needle", [
    ("ppo.rollout_batch_size=6", "ppo.rollout_batch_size=6 must be a multiple of"),
    ("ppo.temperature=0", "ppo.temperature must be > 0"),
    ("ppo.lam=1.5", "ppo.lam within [0, 1]"),
    ("ppo.kl_target=0", "ppo.kl_target must be > 0"),
    ("ppo.freeze_actor_steps=-1", "ppo.freeze_actor_steps must be >= 0"),
    ("lora.enabled=true", "ppo with lora.enabled is not supported"),
    ("eval.every_steps=5", "ppo runs evaluation at the end only"),
])
def test_ppo_config_errors_name_the_field(override, needle):
    from vlmscale.config import PPOConfig

    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(PPOConfig, overrides=[override])


def test_ppo_reward_model_without_head_is_a_config_error(tmp_path):
    from vlmscale.config import PPOConfig
    from vlmscale.train.launch import check_paths

    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text("{}")
    cfg = load_config(PPOConfig, overrides=[f"ppo.reward_model={tmp_path / 'rm'}", "model.preset=tiny",
                                            "model.init_from=null"])
    with pytest.raises(ConfigError, match="no score_head.safetensors"):
        check_paths(cfg)


def test_async_save_sets_the_decoupled_python_writer_and_refuses_another(tmp_path):
    cfg = load_config(SFTConfig, overrides=["checkpoint.async_save=true"])
    assert build_ds_config(cfg, world_size=2)["checkpoint"]["writer"] == {"type": "python", "decoupled": True}
    assert "writer" not in build_ds_config(load_config(SFTConfig), world_size=2).get("checkpoint", {})
    ds = tmp_path / "fast.json"
    ds.write_text('{"zero_optimization": {"stage": 3}, "checkpoint": {"writer": {"type": "fast"}}}')
    cfg = load_config(SFTConfig, overrides=["checkpoint.async_save=true", f"deepspeed.config={ds}"])
    with pytest.raises(ConfigError, match="checkpoint.async_save=true"):
        build_ds_config(cfg, world_size=2)
