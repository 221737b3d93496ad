"""A VLM with a scalar head: the reward model (score at the last real token) and the PPO critic (a value per token).

The head is one ``Linear(hidden, 1)`` on the LLM's last hidden states (:func:`vlmscale.model.forward.vlm_hidden`),
so the whole model, head included, is one ``nn.Module`` that DeepSpeed wraps and ZeRO-3 partitions like any other.

On disk the VLM part is a stock HF InternVL export (loadable by transformers alone) and the head sits next to it
in ``score_head.safetensors`` (keys ``weight`` ``(1, hidden)`` and ``bias`` ``(1,)``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vlmscale.model.build import LazyTensor, load_pretrained
from vlmscale.model.forward import vlm_hidden

HEAD_FILE = "score_head.safetensors"


class ScalarHeadModel(nn.Module):
    def __init__(self, vlm: nn.Module):
        super().__init__()
        self.vlm = vlm
        self.config = vlm.config
        hidden = vlm.config.text_config.hidden_size
        dtype = next(vlm.parameters()).dtype
        self.score = nn.Linear(hidden, 1, dtype=dtype)
        # Small init: the first rewards / values are near zero and the head learns its own scale.
        nn.init.normal_(self.score.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)

    def forward(self, **kwargs) -> torch.Tensor:
        """Per-token scalars ``(rows, L)`` in fp32; arguments as :func:`vlm_hidden`."""
        return token_values(self, **kwargs)


def token_values(model: ScalarHeadModel, **kwargs) -> torch.Tensor:
    """What ``model(**kwargs)`` returns, without calling the top module: training code drives the
    sub-modules directly, like :func:`vlmscale.model.forward.vlm_logits` (see ``engine.zero.start_micro_batch``)."""
    hidden = vlm_hidden(model.vlm, **kwargs)
    return model.score(hidden).squeeze(-1).float()


def last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(rows,)``: each row's value at its last non-pad token (right padding)."""
    last = attention_mask.long().sum(-1) - 1
    return values.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1)


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A :class:`ScalarHeadModel` state dict -> (the VLM's state dict, the head's)."""
    vlm = {k[len("vlm."):]: v for k, v in state.items() if k.startswith("vlm.")}
    head = {k[len("score."):]: v for k, v in state.items() if k.startswith("score.")}
    other = set(state) - {f"vlm.{k}" for k in vlm} - {f"score.{k}" for k in head}
    if other:
        raise ValueError(f"unexpected keys in a scalar-head state dict: {sorted(other)[:5]}")
    return vlm, head


def head_path(export_dir: str | Path) -> Path:
    return Path(export_dir) / HEAD_FILE


def save_head(head: dict[str, torch.Tensor], export_dir: str | Path) -> Path:
    """Write the head (``weight`` (1, hidden), ``bias`` (1,)) next to an HF export."""
    if set(head) != {"weight", "bias"} or head["weight"].dim() != 2 or head["weight"].shape[0] != 1:
        raise ValueError(f"a score head is weight (1, hidden) and bias (1,); got {({k: tuple(v.shape) for k, v in head.items()})}")
    path = head_path(export_dir)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(path))
    return path


def head_weights(export_dir: str | Path) -> dict[str, LazyTensor]:
    """The saved head as named tensors of a :class:`ScalarHeadModel` (``score.weight``, ``score.bias``),
    for ``vlmscale.distributed.zero.load_weights`` (partition-aware) or ``load_weights_plain``."""
    path = head_path(export_dir)
    if not path.is_file():
        raise ValueError(f"{export_dir}: no {HEAD_FILE}; expected a reward-model export (recipes/reward.py writes <output_dir>/hf)")
    return {f"score.{k}": LazyTensor(path, k) for k in ("weight", "bias")}


def load_scalar_head_model(export_dir: str | Path, *, dtype: torch.dtype, max_tiles: int | None = None,
                           load_weights=None):
    """``(ScalarHeadModel, assets)`` from a reward-model export: the HF InternVL dir plus its head.

    Call inside ``vlmscale.distributed.zero.zero3_model_scope`` with ``load_weights=vlmscale.distributed.zero.load_weights``
    to get the VLM partitioned under ZeRO-3 (the head, one small Linear, is partitioned by
    ``deepspeed.initialize``); without them everything loads whole on this process.
    """
    from vlmscale.model.build import load_weights_plain

    vlm, assets = load_pretrained(str(export_dir), max_tiles=max_tiles, dtype=dtype)
    model = ScalarHeadModel(vlm)
    (load_weights or load_weights_plain)(model, head_weights(export_dir))
    return model, assets
