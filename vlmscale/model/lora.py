"""LoRA adapters on the LLM, and merging them back for export.

Adapters are injected in place (``peft.inject_adapter_in_model``) into the language model's
linear layers, so parameter names keep their ``model.language_model.`` prefix and the parameter
policy applies unchanged: with LoRA on, ``policy.llm`` trains the adapters and the base weights
stay frozen. Under ZeRO-3 the adapters are partitioned by the engine like every other parameter.
The export folds ``W + (alpha / r) * B @ A`` into each base weight, so the result is a plain
InternVL checkpoint that stock transformers loads.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from vlmscale.config.schema import LoraSection

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.default\.weight$")


def add_lora(model: torch.nn.Module, cfg: LoraSection) -> None:
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                        bias="none")
    inject_adapter_in_model(config, model.model.language_model)


def merge_lora_state_dict(state: dict[str, torch.Tensor], *, scaling: float) -> dict[str, torch.Tensor]:
    """Fold adapters into their base weights and restore the plain parameter names."""
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _LORA.match(key)
        if m:
            adapters.setdefault(m.group("module"), {})[m.group("ab")] = value
        else:
            merged[key.replace(".base_layer.", ".")] = value
    for module, ab in adapters.items():
        weight_key = module + ".weight"
        base = merged[weight_key]
        delta = (ab["B"].float() @ ab["A"].float()) * scaling
        merged[weight_key] = (base.float() + delta).to(base.dtype)
    return merged


def export_units(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """The model's parameters and persistent buffers, by full name, in the groups an export gathers and
    writes together: a LoRA-adapted layer whole (its adapters fold into its base weight with
    :func:`merge_lora_state_dict`), else one module's own tensors. Each tensor comes once: a tied
    weight under its first name (transformers re-ties it on load)."""
    seen: set[int] = set()
    whole: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in whole):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLayer):
            whole.append(name)
            tensors = dict(module.named_parameters(prefix=name))
        else:
            tensors = {prefix + k: p for k, p in module.named_parameters(recurse=False)}
        tensors |= {prefix + k: b for k, b in module.named_buffers(recurse=False)
                    if k not in module._non_persistent_buffers_set}
        unit = {}
        for key, t in tensors.items():
            if id(t) not in seen:
                seen.add(id(t))
                unit[key] = t
        if unit:
            yield unit
