"""Preference pairs: one prompt (images anywhere), a chosen and a rejected answer.

A pair is one shard sample whose JSON holds the conversation up to the answer plus both answers::

    {"task": "preference", "messages": [{"role": "user", "content": [{"type": "image", "image": "img0.png"},
                                                                     {"type": "text", "text": "Describe the image."}]}],
     "chosen": "Two objects: ...", "rejected": "Two objects: ..."}

Messages follow the SFT schema (``images`` + ``<image>`` placeholders also work) and must end with a
user turn. :func:`render_pair` renders the two full conversations with :func:`render_sample`, so each
side's labels cover exactly its answer and ``<|im_end|>``, and marks the answer tokens where the two
sides differ (RLHF-V's "changed segments", for dense weighting). :func:`pair_collate` stacks a
micro-batch as ``[chosen_0 .. chosen_{n-1}, rejected_0 .. rejected_{n-1}]`` so one forward scores both.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from vlmscale.config.schema import VideoConfig
from vlmscale.constants import IGNORE
from vlmscale.data.dataset import Item, TrainDataset, collate
from vlmscale.data.render import BadSample, ImageOptions, Rendered, render_sample
from vlmscale.model.tokenizer import ProcessorAssets


@dataclass
class RenderedPair:
    chosen: Rendered
    rejected: Rendered
    chosen_changed: list[bool]  # per token of ``chosen``: a supervised token outside the common parts
    rejected_changed: list[bool]


def changed_tokens(a: list[int], b: list[int]) -> tuple[list[bool], list[bool]]:
    """Per token of each sequence: True where it is not part of a matching block of the other."""
    ca, cb = [True] * len(a), [True] * len(b)
    for block in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        ca[block.a:block.a + block.size] = [False] * block.size
        cb[block.b:block.b + block.size] = [False] * block.size
    return ca, cb


def _answer(rendered: Rendered) -> tuple[int, list[int]]:
    start = next(i for i, t in enumerate(rendered.labels) if t != IGNORE)
    return start, rendered.input_ids[start:]


def render_pair(record: dict, members: dict[str, bytes], assets: ProcessorAssets, *, max_seq_len: int,
                video: VideoConfig | None = None, images: ImageOptions | None = None) -> RenderedPair:
    """Both conversations rendered; raises :class:`BadSample` (reason ``bad_pair``) for malformed pairs."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadSample("bad_pair", "a pair needs 'messages' (the prompt) as a non-empty list")
    if messages[-1].get("role") != "user":
        raise BadSample("bad_pair", "the prompt's last message must be a user turn (the answers follow it)")
    answers = []
    for side in ("chosen", "rejected"):
        text = record.get(side)
        if not isinstance(text, str) or not text.strip():
            raise BadSample("bad_pair", f"'{side}' must be a non-empty string")
        answers.append(text)
    if answers[0] == answers[1]:
        raise BadSample("bad_pair", "chosen and rejected are identical")
    sides = []
    for text in answers:
        rec = {**record, "messages": messages + [{"role": "assistant", "content": [{"type": "text", "text": text}]}]}
        sides.append(render_sample(rec, members, assets, max_seq_len=max_seq_len, video=video, images=images))
    chosen, rejected = sides
    (ca_start, ca), (rj_start, rj) = _answer(chosen), _answer(rejected)
    diff_c, diff_r = changed_tokens(ca, rj)
    return RenderedPair(chosen, rejected, [False] * ca_start + diff_c, [False] * rj_start + diff_r)


class PairDataset(TrainDataset):
    """:class:`TrainDataset` over preference shards: the same mixture, positions and counted skips;
    each item's ``rendered`` is a :class:`RenderedPair`."""

    render = staticmethod(render_pair)
    probe_record = None  # pairs are not balanced (data.balance applies to single-sample stages)


def pair_collate(items: list[Item], *, pad_id: int) -> dict:
    """Rows ``[chosen..., rejected...]`` right-padded; ``changed`` marks the differing answer tokens;
    ``sample_ids`` and the skip counts are per pair."""
    n = len(items)
    rows = [Item(it.rendered.chosen, it.sample_id, it.source, it.skipped) for it in items]
    rows += [Item(it.rendered.rejected, it.sample_id, it.source, []) for it in items]
    batch = collate(rows, pad_id=pad_id)
    changed = torch.zeros_like(batch["labels"], dtype=torch.bool)
    for i, it in enumerate(items):
        for row, flags in ((i, it.rendered.chosen_changed), (n + i, it.rendered.rejected_changed)):
            changed[row, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
    batch["changed"] = changed
    batch["sample_ids"] = [it.sample_id for it in items]
    batch["num_read"] = n + sum(len(it.skipped) for it in items)
    return batch
