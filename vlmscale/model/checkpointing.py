"""Activation checkpointing per module: the LLM's decoder layers and the vision encoder's layers.

Each switch calls transformers' own ``activation_checkpointing_enable`` on that sub-model only, so a
checkpointed layer keeps just its inputs in the forward and runs again in the backward. The
non-reentrant form is used: it recomputes only what the backward needs, and it works with frozen
modules and with inputs that do not require grad.
"""

from __future__ import annotations

import torch

KWARGS = {"use_reentrant": False}


def enable_activation_checkpointing(model: torch.nn.Module, *, llm: bool, vision: bool) -> None:
    """Turn on checkpointing for the chosen sub-models of an InternVL model (others are left as they are)."""
    if llm:
        model.model.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs=KWARGS)
    if vision:
        model.model.vision_tower.activation_checkpointing_enable(activation_checkpointing_kwargs=KWARGS)
