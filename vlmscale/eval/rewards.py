"""Verifiable rewards for GRPO: built-in scorers and user functions, combined with weights.

A reward function takes ``(record, completion)``: the prompt's shard record (its JSON, with
``"reference"`` added: the text of the last assistant turn, the answer the prompt was cut from) and
the sampled completion's text, and returns a float, or None where it does not apply (the IoU reward
on a question whose reference holds no box). ``grpo.rewards`` maps names to weights; a name with a
colon is a user function, ``package.module:function``, imported on every rank::

    grpo.rewards={exact_match: 1.0, iou: 1.0, format: 0.1}
    grpo.rewards={"my_rewards:count_reward": 1.0}

Built in (the parsers are the held-out evaluation's, ``vlmscale.eval.metrics``):

- ``exact_match``: normalised answer equality (case, punctuation, articles), 1 or 0;
- ``numeric``: the first number in the completion equals the reference's first number (relative
  tolerance ``1e-6``); None when the reference holds no number;
- ``iou``: the IoU of the completion's ``<box>[x1, y1, x2, y2]</box>`` with the reference box, in
  InternVL's 0-999 grid or in 0-1 coordinates; 0 for a missing or malformed box, None when the
  reference holds no box;
- ``format``: 1 when the completion matches ``grpo.format_pattern`` (a regular expression, searched),
  else 0; None when no pattern is set.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from vlmscale.eval.metrics import exact_match, iou, parse_box

RewardFn = Callable[[dict[str, Any], str], "float | None"]

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def exact_match_reward(record: dict[str, Any], completion: str) -> float:
    return 1.0 if exact_match(completion, record["reference"]) else 0.0


def numeric_reward(record: dict[str, Any], completion: str) -> float | None:
    ref = _NUMBER.search(record["reference"])
    if ref is None:
        return None
    got = _NUMBER.search(completion)
    if got is None:
        return 0.0
    a, b = float(got.group()), float(ref.group())
    return 1.0 if math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) else 0.0


def iou_reward(record: dict[str, Any], completion: str) -> float | None:
    ref = parse_box(record["reference"])
    if ref is None:
        return None
    box = parse_box(completion)
    return 0.0 if box is None else iou(box, ref)


def format_reward(pattern: str | None) -> RewardFn:
    compiled = re.compile(pattern) if pattern else None

    def reward(record: dict[str, Any], completion: str) -> float | None:
        if compiled is None:
            return None
        return 1.0 if compiled.search(completion) else 0.0
    return reward


BUILTIN = ("exact_match", "numeric", "iou", "format")


def load_reward(name: str, *, format_pattern: str | None = None) -> RewardFn:
    """A built-in reward by name, or a user function ``module:function``."""
    if name == "exact_match":
        return exact_match_reward
    if name == "numeric":
        return numeric_reward
    if name == "iou":
        return iou_reward
    if name == "format":
        return format_reward(format_pattern)
    if ":" not in name:
        raise ValueError(f"grpo.rewards: unknown reward {name!r}; built in: {', '.join(BUILTIN)}, "
                         "or a user function as package.module:function")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"grpo.rewards: cannot import {name!r} ({exc}); the module must be importable on every "
                         "rank (on PYTHONPATH or installed)") from exc
    if not callable(fn):
        raise ValueError(f"grpo.rewards: {name!r} is not callable")
    return fn


@dataclass
class RewardSet:
    """The weighted rewards of a run. :meth:`score` gives the combined reward of each completion (the
    weighted sum of the rewards that apply) and each reward's values (None where it does not apply)."""

    names: list[str]
    weights: list[float]
    fns: list[RewardFn]

    @classmethod
    def from_config(cls, rewards: dict[str, float], *, format_pattern: str | None = None) -> RewardSet:
        active = [(n, w) for n, w in rewards.items() if w != 0]
        if not active:
            raise ValueError("grpo.rewards gives every reward weight 0: GRPO needs at least one reward")
        return cls(names=[n for n, _ in active], weights=[w for _, w in active],
                   fns=[load_reward(n, format_pattern=format_pattern) for n, _ in active])

    def score(self, records: list[dict[str, Any]], completions: list[str]) -> tuple[list[float], dict[str, list]]:
        per: dict[str, list] = {n: [] for n in self.names}
        total = []
        for rec, text in zip(records, completions):
            value = 0.0
            for name, weight, fn in zip(self.names, self.weights, self.fns):
                r = fn(rec, text)
                if r is not None:
                    r = float(r)
                    if not math.isfinite(r):
                        raise ValueError(f"reward {name!r} returned {r} for completion {text!r}: rewards must be finite")
                    value += weight * r
                per[name].append(r)
            total.append(value)
        return total, per
