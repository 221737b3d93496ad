"""DPO's reference log-probabilities: precomputed once into a rank-sharded cache, or a live frozen engine.

Cached (the default): before the first step, the starting model — the engine itself, before any
update — scores every pair the run will train on. Each rank walks exactly the micro-batches its
sampler will give it in training and keeps ``{pair id: (chosen, rejected)}`` in its own shard
``<output_dir>/ref_cache/rank-<r>-of-<w>.pt``, committed atomically every ``dpo.cache_flush_steps``
steps, so a run killed while filling the cache resumes from the last commit (the slowest rank's).
A shard records a fingerprint of everything its numbers depend on (starting weights, data shards,
batch layout, seed, steps, world size, weighting); a mismatch discards it. Training needs no second
model and no extra forward: the step costs what an SFT step on both answers costs.

Live (``dpo.reference=live``): a second copy of the starting model, frozen, partitioned under ZeRO-3
by its own optimizer-less engine, runs a no-grad forward on every micro-batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch

from vlmscale.config.schema import DPOConfig
from vlmscale.data.dataset import resolve_path
from vlmscale.data.shards import list_shards
from vlmscale.distributed.group import DistInfo, all_gather_objects
from vlmscale.distributed.zero import start_micro_batch
from vlmscale.files import atomic_write
from vlmscale.stages.objectives import answer_logps
from vlmscale.train import faults
from vlmscale.train.checkpoint import ResumeError

log = logging.getLogger(__name__)
CACHE_DIR = "ref_cache"


def _files_signature(paths: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(paths)]


def fingerprint(cfg: DPOConfig, *, world_size: int) -> str:
    """Everything the cached numbers depend on; files by path, size and modification time."""
    weights = []
    if cfg.model.init_from is not None:
        weights = _files_signature(list(Path(cfg.model.init_from).glob("*.safetensors")))
    shards = [_files_signature(list_shards(resolve_path(s.path, cfg.data))) for s in cfg.data.sources]
    t = cfg.train
    key = {
        "model": [cfg.model.preset, cfg.model.init_from, cfg.model.vision, cfg.model.llm, weights, t.seed, t.precision],
        "data": [[s.name, s.path, s.weight] for s in cfg.data.sources] + shards,
        "render": [cfg.data.max_seq_len, cfg.data.max_tiles],
        "layout": [t.micro_batch_size, t.grad_accum_steps, t.max_steps, world_size],
        "segment_weight": cfg.dpo.segment_weight,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class ReferenceCache:
    def __init__(self, output_dir: str | Path, *, dist: DistInfo, fingerprint: str):
        self.dir = Path(output_dir) / CACHE_DIR
        self.dist, self.fingerprint = dist, fingerprint
        self.path = self.dir / f"rank-{dist.rank:05d}-of-{dist.world_size:05d}.pt"
        self.logps: dict[str, tuple[float, float]] = {}
        self.steps_done, self.complete = 0, False

    def _load(self) -> None:
        if not self.path.is_file():
            return
        state = torch.load(self.path, weights_only=True)
        if state["fingerprint"] != self.fingerprint:
            log.warning("%s was computed for other data, weights or batch layout: recomputing it", self.path)
            return
        self.logps = {k: (float(v[0]), float(v[1])) for k, v in state["logps"].items()}
        self.steps_done, self.complete = int(state["steps_done"]), bool(state["complete"])

    def _commit(self) -> None:
        state = {"fingerprint": self.fingerprint, "steps_done": self.steps_done, "complete": self.complete,
                 "logps": {k: list(v) for k, v in self.logps.items()}}
        atomic_write(self.path, state)

    def prepare(self, engine, *, loader_from: Callable[[int], object], max_steps: int, grad_accum_steps: int,
                start_step: int, segment_weight: float, flush_steps: int, device: torch.device) -> None:
        """Load this rank's shard or fill it (collective: all ranks walk the same number of micro-batches).

        ``loader_from(step)`` gives the training loader's micro-batches from ``step`` on. Must run
        before the first update: the engine's current weights are the reference.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self._load()
        states = all_gather_objects((self.steps_done, self.complete))
        if all(done for _, done in states):
            log.info("reference log-probs: %d pairs from %s", len(self.logps), self.path)
            return
        if start_step > 0:
            raise ResumeError(f"the DPO reference cache in {self.dir} is incomplete or stale, and the run resumes at step "
                              f"{start_step}: the starting weights are no longer in the engine. Delete the run's "
                              "checkpoints to start over, or use dpo.reference=live")
        first = min(steps for steps, _ in states)  # the slowest rank's last commit: every rank redoes from there
        self.steps_done = first
        log.info("computing reference log-probs for steps %d-%d", first + 1, max_steps)
        batches = iter(loader_from(first))
        engine.eval()
        with torch.no_grad():
            for step in range(first, max_steps):
                for _ in range(grad_accum_steps):
                    batch = next(batches)
                    start_micro_batch(engine)
                    logps, _ = answer_logps(engine.module, batch, device, segment_weight=segment_weight)
                    n = len(batch["sample_ids"])
                    for i, sid in enumerate(batch["sample_ids"]):
                        self.logps[sid] = (float(logps[i]), float(logps[n + i]))
                self.steps_done = step + 1
                faults.fire("refcache", self.steps_done)
                if self.steps_done % flush_steps == 0 or self.steps_done == max_steps:
                    self.complete = self.steps_done == max_steps
                    self._commit()
        engine.train()
        log.info("reference log-probs: %d pairs computed, saved to %s", len(self.logps), self.path)

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [sid for sid in batch["sample_ids"] if sid not in self.logps]
        assert not missing, f"pairs without cached reference log-probs: {missing[:3]}"
        pairs = torch.tensor([self.logps[sid] for sid in batch["sample_ids"]], dtype=torch.float32)
        return pairs[:, 0], pairs[:, 1]


class LiveReference:
    """The frozen reference model's log-probs, computed per micro-batch (collective)."""

    def __init__(self, engine, *, segment_weight: float, device: torch.device):
        self.engine, self.segment_weight, self.device = engine, segment_weight, device

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        start_micro_batch(self.engine)
        with torch.no_grad():
            logps, _ = answer_logps(self.engine.module, batch, self.device, segment_weight=self.segment_weight)
        n = len(batch["sample_ids"])
        return logps[:n], logps[n:]
