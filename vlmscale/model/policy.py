"""One declarative parameter policy: which modules train, at what learning rate.

Applied to the model before the DeepSpeed engine exists: it sets ``requires_grad`` and returns
optimizer parameter groups (one per module and decay class). A learning rate of 0 means frozen.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from vlmscale.config.schema import ModulePolicy, PolicyConfig

log = logging.getLogger(__name__)
MODULES = ("vision", "projector", "llm", "head")
_VISION_LAYER = re.compile(r"^(?:vlm\.)?model\.vision_tower\.encoder\.layer\.(\d+)\.")
HEAD_RULE = ModulePolicy()  # a scalar head (vlmscale.model.heads) always trains, at optim.lr


def module_of(name: str) -> str:
    """vision / projector / llm, or head for a scalar head; a :class:`ScalarHeadModel`'s VLM is under ``vlm.``."""
    if name.startswith("score."):
        return "head"
    name = name.removeprefix("vlm.")
    if name.startswith("model.vision_tower."):
        return "vision"
    if name.startswith("model.multi_modal_projector."):
        return "projector"
    if name.startswith(("model.language_model.", "lm_head.")):
        return "llm"
    raise AssertionError(f"parameter {name} belongs to no known module")


def numel(p: torch.Tensor) -> int:
    """Full element count, also for a ZeRO-3 partitioned parameter."""
    return int(getattr(p, "ds_numel", p.numel()))


def _trainable(name: str, rule: ModulePolicy, *, lora: bool) -> bool:
    if not rule.trainable or rule.lr == 0:
        return False
    if lora and module_of(name) == "llm":
        return ".lora_A." in name or ".lora_B." in name  # adapters train, base weights stay frozen
    span = rule.layer_range()
    if span is None:
        return True
    match = _VISION_LAYER.match(name)
    return bool(match) and span[0] <= int(match.group(1)) <= span[1]


@dataclass
class PolicySummary:
    trainable: dict[str, int]
    frozen: dict[str, int]

    def table(self) -> str:
        rows = [f"{'module':<10} {'trainable':>14} {'frozen':>14}"]
        for m in MODULES:
            if m == "head" and not self.trainable[m] + self.frozen[m]:
                continue
            rows.append(f"{m:<10} {self.trainable[m]:>14,} {self.frozen[m]:>14,}")
        rows.append(f"{'total':<10} {sum(self.trainable.values()):>14,} {sum(self.frozen.values()):>14,}")
        return "\n".join(rows)


def apply_policy(model: torch.nn.Module, policy: PolicyConfig, *, base_lr: float, weight_decay: float,
                 lora: bool = False) -> tuple[list[dict], PolicySummary]:
    """Freeze/unfreeze per the policy and build optimizer groups (lr per module, no decay on 1-D params)."""
    num_layers = model.config.vision_config.num_hidden_layers
    span = policy.vision.layer_range()
    if span is not None and span[1] >= num_layers:
        raise ValueError(f"policy.vision.layers={policy.vision.layers!r}: the vision encoder has layers 0-{num_layers - 1}")
    groups: dict[tuple[str, bool], list[torch.Tensor]] = {}
    trainable = dict.fromkeys(MODULES, 0)
    frozen = dict.fromkeys(MODULES, 0)
    for name, p in model.named_parameters():
        module = module_of(name)
        rule: ModulePolicy = HEAD_RULE if module == "head" else getattr(policy, module)
        on = _trainable(name, rule, lora=lora)
        p.requires_grad_(on)
        (trainable if on else frozen)[module] += numel(p)
        if on:
            decay = len(getattr(p, "ds_shape", p.shape)) >= 2
            groups.setdefault((module, decay), []).append(p)
    param_groups = []
    for (module, decay), params in groups.items():
        rule = HEAD_RULE if module == "head" else getattr(policy, module)
        param_groups.append({
            "params": params,
            "lr": rule.lr if rule.lr is not None else base_lr,
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{module}{'' if decay else '.no_decay'}",
        })
    return param_groups, PolicySummary(trainable, frozen)
