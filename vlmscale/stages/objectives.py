"""The reward and DPO objectives for ``vlmscale.train.step.train_step``, and held-out pair accuracy.

A pair micro-batch (``vlmscale.data.preference.pair_collate``) holds ``n`` chosen rows then ``n``
rejected rows; one forward scores both, so under ZeRO-3 every parameter is gathered once per
micro-batch for the two answers of a pair. Losses are averaged over the pairs of the whole
accumulation window on all ranks (``count`` = pairs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from vlmscale.data.dataset import Item
from vlmscale.data.preference import pair_collate, render_pair
from vlmscale.data.render import BadSample
from vlmscale.data.shards import ShardDataset
from vlmscale.distributed.group import all_reduce_sum, dealt_rounds
from vlmscale.losses.preference import bradley_terry_loss, dpo_loss, sequence_logps, sft_loss, token_logps
from vlmscale.model.forward import vlm_logits
from vlmscale.model.heads import last_token_scores, token_values
from vlmscale.model.tokenizer import ProcessorAssets


def model_inputs(batch: dict, device: torch.device) -> dict:
    pixels = batch["pixel_values"]
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "pixel_values": None if pixels is None else pixels.to(device), "tile_pool": batch.get("tile_pool")}


def pair_scores(model: torch.nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A scalar-head model's ``(chosen, rejected)`` scores ``(n,)`` at each row's last token."""
    values = token_values(model, **model_inputs(batch, device))
    scores = last_token_scores(values, batch["attention_mask"].to(device))
    n = len(batch["sample_ids"])
    return scores[:n], scores[n:]


class BradleyTerryObjective:
    """``-log sigmoid(r_chosen - r_rejected)`` per pair."""

    def count(self, batch: dict) -> float:
        return len(batch["sample_ids"])

    def __call__(self, model, batch, device):
        chosen, rejected = pair_scores(model, batch, device)
        losses = bradley_terry_loss(chosen, rejected)
        chosen, rejected = chosen.detach(), rejected.detach()
        return losses.sum(), {"correct": float((chosen > rejected).sum()), "margin": float((chosen - rejected).sum()),
                              "chosen_score": float(chosen.sum()), "rejected_score": float(rejected.sum())}


def answer_logps(model, batch: dict, device: torch.device, *, segment_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the answer's log-probability (:func:`sequence_logps`) and its token log-probs."""
    logits = vlm_logits(model, **model_inputs(batch, device))
    labels = batch["labels"].to(device)
    tlp = token_logps(logits, labels)
    return sequence_logps(tlp, labels, changed=batch["changed"].to(device), segment_weight=segment_weight), tlp


class DPOObjective:
    """Sigmoid DPO against reference log-probs from ``reference(batch) -> (chosen, rejected)``, plus
    ``sft_weight`` x the chosen answers' mean NLL."""

    def __init__(self, *, beta: float, sft_weight: float, segment_weight: float,
                 reference: Callable[[dict], tuple[torch.Tensor, torch.Tensor]]):
        self.beta, self.sft_weight, self.segment_weight, self.reference = beta, sft_weight, segment_weight, reference

    def count(self, batch: dict) -> float:
        return len(batch["sample_ids"])

    def __call__(self, model, batch, device):
        ref_chosen, ref_rejected = self.reference(batch)  # first: a live reference gathers its own parameters
        logps, tlp = answer_logps(model, batch, device, segment_weight=self.segment_weight)
        n = len(batch["sample_ids"])
        losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref_chosen.to(device), ref_rejected.to(device),
                                            beta=self.beta)
        stats = {"dpo_loss": float(losses.detach().sum())}
        if self.sft_weight > 0:
            sft = sft_loss(tlp[:n], batch["labels"][:n].to(device))
            losses = losses + self.sft_weight * sft
            stats["sft_loss"] = float(sft.detach().sum())
        stats.update({"correct": float((chosen > rejected).sum()), "margin": float((chosen - rejected).sum()),
                      "chosen_reward": float(chosen.sum()), "rejected_reward": float(rejected.sum()),
                      "chosen_logp": float(logps[:n].detach().sum()), "rejected_logp": float(logps[n:].detach().sum())})
        return losses.sum(), stats


def pair_metrics(extra: dict[str, float], pairs: int) -> dict[str, float]:
    """A step's summed objective statistics as per-pair means (``accuracy`` from ``correct``)."""
    out = {}
    for k, v in extra.items():
        out["accuracy" if k == "correct" else k] = v / max(pairs, 1)
    return out


# ---------------------------------------------------------------- held-out pair accuracy


def heldout_pairs(path: Path, assets: ProcessorAssets, *, max_seq_len: int) -> tuple[list[Item], int]:
    """Every renderable pair under ``path`` (the same list on every rank) and the number skipped."""
    data = ShardDataset(path)
    items, skipped = [], 0
    for i in range(len(data)):
        _, members = data.read(i)
        try:
            record = json.loads(members["json"])
            items.append(Item(render_pair(record, members, assets, max_seq_len=max_seq_len), str(record.get("id", i)), 0, []))
        except (BadSample, KeyError, ValueError, TypeError):
            skipped += 1
    return items, skipped


@torch.no_grad()
def reward_accuracy(model, items: list[Item], *, rank: int, world_size: int, batch_size: int, pad_id: int,
                    device: torch.device, start: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Held-out pair accuracy of a scalar-head model (collective: every rank runs the same number of
    forwards; rank r scores pairs r, r + world, ...; a rank short of pairs scores a repeat it does not count).

    ``start`` runs before each forward (``start_micro_batch`` for a ZeRO-3 engine)."""
    if not items:
        return {"pairs": 0.0}
    dealt = dealt_rounds(len(items), rank=rank, world_size=world_size)
    per_rank = len(dealt)
    counted = [i is not None for i in dealt]
    mine = [items[i] if i is not None else items[0] for i in dealt]
    correct = margin = 0.0
    for lo in range(0, per_rank, batch_size):
        start()
        batch = pair_collate(mine[lo:lo + batch_size], pad_id=pad_id)
        chosen, rejected = pair_scores(model, batch, device)
        keep = torch.tensor(counted[lo:lo + batch_size])
        correct += float(((chosen > rejected).cpu() & keep).sum())
        margin += float(((chosen - rejected).cpu() * keep).sum())
    total_correct, total_margin = all_reduce_sum([correct, margin])
    return {"pairs": float(len(items)), "accuracy": total_correct / len(items), "margin": total_margin / len(items)}
