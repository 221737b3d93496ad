"""Evaluation inside a training run: every ``eval.every_steps`` steps and at the end.

Runs the suites on the live (possibly ZeRO-3 partitioned) model on every rank together. The
drift suite compares the vision encoder with its state at the start of the run; those
reference features are computed once and stored rank-sharded under ``output_dir/eval/`` so a
resumed run keeps the same reference. Whether to use the stored reference is decided by all ranks
together (a file missing on one node must not give the ranks different suites, whose ZeRO-3 gathers
would then stop matching), and each shard is written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from vlmscale.config.schema import EvalConfig, VideoConfig
from vlmscale.distributed.group import DistInfo, all_reduce_sum, barrier
from vlmscale.config.load import parse_size
from vlmscale.eval.generate import VCDConfig
from vlmscale.eval.suites import drift_reference, flatten, format_table, run_suites
from vlmscale.model.tokenizer import ProcessorAssets
from vlmscale.files import atomic_write

log = logging.getLogger(__name__)


def vcd_config(cfg: EvalConfig) -> VCDConfig | None:
    if not cfg.vcd:
        return None
    return VCDConfig(alpha=cfg.vcd_alpha, beta=cfg.vcd_beta, noise=cfg.vcd_noise)


class PeriodicEval:
    def __init__(self, cfg: EvalConfig, *, heldout: Path, output_dir: Path, dist: DistInfo, assets: ProcessorAssets,
                 video: VideoConfig | None = None):
        self.cfg, self.heldout, self.dist, self.assets, self.video = cfg, heldout, dist, assets, video
        self.dir = output_dir / "eval"
        self.reference: dict | None = None

    def _reference_file(self) -> Path:
        return self.dir / f"drift_reference-w{self.dist.world_size}-rank{self.dist.rank:05d}.pt"

    def prepare(self, model, *, fresh: bool) -> None:
        """Capture (or reload) the drift reference: the encoder as it was when the run started (collective)."""
        if "drift" not in self.cfg.suites or not self.scheduled:
            return  # an encoder pass over every held-out image (at 448 px, minutes) that no evaluation would use
        path = self._reference_file()
        (present,) = all_reduce_sum([float(path.is_file())])
        if present == self.dist.world_size:
            self.reference = torch.load(path, weights_only=True)
            return
        if present:
            log.warning("the drift reference for world size %d is in %s on %d of %d ranks only: %s",
                        self.dist.world_size, self.dir, int(present), self.dist.world_size,
                        "computing it again on every rank" if fresh else "no rank uses it")
        if not fresh:
            log.warning("no drift reference for world size %d in %s: the drift suite is skipped in this resumed run",
                        self.dist.world_size, self.dir)
            return
        # over the final evaluation's images, so periodic and final drift compare like with like
        self.reference = drift_reference(model, self.assets, self.heldout, max_samples=self.cfg.final_max_samples,
                                         rank=self.dist.rank, world_size=self.dist.world_size)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self.reference)
        barrier()

    @property
    def scheduled(self) -> bool:
        """Whether this run evaluates at all (at the start, every N steps or at the end)."""
        return self.cfg.at_start or self.cfg.every_steps > 0 or self.cfg.at_end

    def due(self, step: int) -> bool:
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    def run(self, model, *, step: int, final: bool = False, name: str | None = None) -> dict:
        """Score ``model``; ``final`` uses ``eval.final_max_samples``; results go to ``eval/<name>.json``."""
        suites = [s for s in self.cfg.suites if s != "drift" or self.reference is not None]
        results = run_suites(
            model, self.assets, self.heldout, suites, rank=self.dist.rank, world_size=self.dist.world_size,
            max_samples=self.cfg.final_max_samples if final else self.cfg.max_samples,
            max_new_tokens=self.cfg.max_new_tokens, vcd=vcd_config(self.cfg), reference=self.reference,
            video=self.video, gather_max_bytes=parse_size(self.cfg.gather_policy_max_bytes),
        )
        if self.dist.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            name = name or ("final" if final else f"step-{step:08d}")
            (self.dir / f"{name}.json").write_text(json.dumps({"step": step, **results}, indent=2))
            log.info("evaluation at step %d (%s):\n%s", step, name, format_table(results))
        return {"step": step, **flatten(results)}
