"""Pure scoring functions: exact match, box parsing and IoU, POPE statistics."""

from __future__ import annotations

import re

from vlmscale.data.render import normalise_answer

_BOX = re.compile(r"<box>\s*\[?\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*\]?\s*</box>")


def exact_match(prediction: str, answer: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(answer)


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """``<box>[x1, y1, x2, y2]</box>`` -> coordinates normalised to [0, 1], or None if malformed.

    Integers above 1 are read as InternVL's 0-999 grid; values within [0, 1] as already normalised.
    """
    m = _BOX.search(text)
    if not m:
        return None
    try:
        vals = [float(v) for v in m.groups()]
    except ValueError:
        return None
    if all(0.0 <= v <= 1.0 for v in vals) and not all(v.is_integer() and v > 0 for v in vals):
        box = vals
    elif all(0.0 <= v <= 1000.0 for v in vals):
        box = [v / 1000.0 for v in vals]
    else:
        return None
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def yes_no(text: str) -> str | None:
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return None
    return words[0] if words[0] in ("yes", "no") else None


def pope_scores(pairs: list[tuple[str | None, str]]) -> dict[str, float]:
    """POPE metrics from (predicted yes/no or None, gold yes/no); 'yes' is the positive class."""
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p != "yes" and g == "no" for p, g in pairs)
    fn = sum(p != "yes" and g == "yes" for p, g in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "unparsed": sum(p is None for p, _ in pairs),
    }
