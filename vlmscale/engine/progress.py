"""Training progress: counters that checkpoints carry and metrics report.

The trainer's position in the data stream is part of its state, like the weights: a resumed run
restores these counters from the checkpoint's client state and continues the stream exactly.
"""

from __future__ import annotations

import time
from typing import Any

from vlmscale.config.schema import DataConfig
from vlmscale.data.dataset import check_bad_fraction
from vlmscale.engine.distributed import DistInfo, sum_counts
from vlmscale.engine.trainer import StepStats


class Progress:
    def __init__(self, client_state: dict[str, Any], *, dist: DistInfo):
        self.dist = dist
        self.samples = int(client_state.get("samples_seen", 0))
        self.tokens = int(client_state.get("tokens_seen", 0))
        self.bad = int(client_state.get("bad_seen", 0))
        self.read = int(client_state.get("read_seen", 0))
        # per-rank skip counts by reason; rank 0 carries the resumed run's global totals
        self.skipped: dict[str, int] = dict(client_state.get("skipped", {})) if dist.is_main else {}
        self._window_start, self._window_tokens, self.data_wait = time.time(), 0, 0.0

    def update(self, stats: StepStats, *, data: DataConfig) -> None:
        """Count a finished step; stop the run (on every rank alike) if bad data passes the limit."""
        self.samples += stats.samples
        self.tokens += stats.tokens
        self.bad += stats.bad
        self.read += stats.read
        self._window_tokens += stats.tokens
        for k, v in stats.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        check_bad_fraction(bad=self.bad, read=self.read, data=data)

    def client_state(self, step: int) -> dict[str, Any]:
        """Collective (sums skip counts over ranks)."""
        return {"step": step, "samples_seen": self.samples, "tokens_seen": self.tokens, "bad_seen": self.bad,
                "read_seen": self.read, "skipped": sum_counts(self.skipped), "data_position": self.samples,
                "world_size": self.dist.world_size}

    def record(self, step: int, stats: StepStats, *, lr: float) -> dict[str, Any]:
        """A metrics.jsonl row for the window since the previous one (collective)."""
        elapsed = max(time.time() - self._window_start, 1e-9)
        row = {
            "step": step, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm, "samples": self.samples,
            "tokens": self.tokens, "tokens_per_s": self._window_tokens / elapsed, "supervised_tokens": stats.supervised,
            "bad_samples": self.bad, "data_wait_fraction": self.data_wait / elapsed,
        }
        row.update({f"skipped/{k}": v for k, v in sum_counts(self.skipped).items()})
        self._window_start, self._window_tokens, self.data_wait = time.time(), 0, 0.0
        return row
