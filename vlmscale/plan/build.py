"""From a run config to the facts a plan needs: the model on the meta device with the run's policy applied."""

from __future__ import annotations

import dataclasses

import torch

from vlmscale.config.schema import RunConfig
from vlmscale.model.lora import add_lora
from vlmscale.model.policy import apply_policy
from vlmscale.plan.memory import ModelFacts
from vlmscale.model.specs import meta_model, model_config


def planned_attention(name: str, *, device: str) -> str:
    """``model.attn_implementation`` as the run would resolve it on ``device`` (``cuda`` or ``cpu``).

    ``auto`` follows ``vlmscale.model.build.resolve_attn_implementation``: eager on a CPU; on a GPU
    flash_attention_2 if ``flash_attn`` is installed there, else sdpa. The planning machine cannot see
    the GPU box's packages, so a GPU plan takes sdpa, which keeps more than flash-attention (k and v
    repeated to full head count and the padding mask in every layer): the plan is then an upper bound
    either way. Set ``model.attn_implementation=flash_attention_2`` to plan for flash-attention.
    """
    if name != "auto":
        return name
    return "eager" if device == "cpu" else "sdpa"


def facts_for(cfg: RunConfig, *, device: str = "cuda") -> ModelFacts:
    """The run's model (preset, named size, config dir or composition) with its LoRA and parameter policy,
    and its attention resolved for ``device`` (:func:`planned_attention`)."""
    config = model_config(cfg.model)
    attention = planned_attention(cfg.model.attn_implementation, device=device)
    # transformers refuses flash_attention_2 where flash_attn is not installed (the planning machine need
    # not have it); the attention implementation changes no parameter, so the meta model is built with sdpa
    config._attn_implementation = "sdpa" if attention == "flash_attention_2" else attention
    model = meta_model(config)
    if cfg.lora.enabled:
        with torch.device("meta"):
            add_lora(model, cfg.lora)
    groups, _ = apply_policy(model, cfg.policy, base_lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                             lora=cfg.lora.enabled)
    return dataclasses.replace(ModelFacts.from_model(model, param_groups=groups), attn_implementation=attention)
