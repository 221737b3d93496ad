"""From a run config to the facts a plan needs: the model on the meta device with the run's policy applied."""

from __future__ import annotations

import torch

from vlmscale.config.schema import RunConfig
from vlmscale.model.lora import add_lora
from vlmscale.model.policy import apply_policy
from vlmscale.plan.memory import ModelFacts
from vlmscale.plan.specs import meta_model, model_config


def facts_for(cfg: RunConfig) -> ModelFacts:
    """The run's model (preset, named size, config dir or composition) with its LoRA and parameter policy."""
    config = model_config(cfg.model)
    config._attn_implementation = cfg.model.attn_implementation
    config.text_config._attn_implementation = cfg.model.attn_implementation
    model = meta_model(config)
    if cfg.lora.enabled:
        with torch.device("meta"):
            add_lora(model, cfg.lora)
    groups, _ = apply_policy(model, cfg.policy, base_lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                             lora=cfg.lora.enabled)
    return ModelFacts.from_model(model, param_groups=groups)
