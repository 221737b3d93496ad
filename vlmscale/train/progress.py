"""Training progress: counters that checkpoints carry and metrics report.

The trainer's position in the data stream is part of its state, like the weights: a resumed run
restores these counters from the checkpoint's client state and continues the stream exactly.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vlmscale.config.schema import DataConfig
from vlmscale.data.dataset import check_bad_fraction
from vlmscale.distributed.group import DistInfo, sum_counts
from vlmscale.train.step import StepStats

log = logging.getLogger(__name__)


class NonFiniteTraining(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient (each was skipped)."""


class Progress:
    def __init__(self, client_state: dict[str, Any], *, dist: DistInfo, peak_tflops: float = float("nan")):
        """``peak_tflops``: the summed peak of all ranks' devices, the MFU denominator."""
        self.dist = dist
        self.samples = int(client_state.get("samples_seen", 0))
        self.tokens = int(client_state.get("tokens_seen", 0))
        self.bad = int(client_state.get("bad_seen", 0))
        self.read = int(client_state.get("read_seen", 0))
        # per-rank skip counts by reason; rank 0 carries the resumed run's global totals
        self.skipped: dict[str, int] = dict(client_state.get("skipped", {})) if dist.is_main else {}
        self.nonfinite_skips = int(client_state.get("nonfinite_skips", 0))
        self.consecutive_nonfinite = int(client_state.get("consecutive_nonfinite", 0))
        self.peak_tflops = peak_tflops
        self._peak_raised = False
        self._window_start, self._window_tokens, self._window_flops, self.data_wait = time.time(), 0, 0.0, 0.0
        self._window_balance = [0.0, 0.0, 0.0, 0]  # summed per step: largest rank's FLOPs, busy seconds (all, max); steps

    def update(self, stats: StepStats, *, step: int, data: DataConfig, max_consecutive_nonfinite: int) -> None:
        """Count a finished step; stop the run (on every rank alike) on too much bad data or too many
        consecutive non-finite steps (every rank sees the same global flags, so all stop together)."""
        if stats.update_skipped:
            self.nonfinite_skips += 1
            self.consecutive_nonfinite += 1
            log.warning("step %d: non-finite loss or gradient norm on some rank; update skipped on every rank "
                        "(%d in a row, %d in total)", step, self.consecutive_nonfinite, self.nonfinite_skips)
            if self.consecutive_nonfinite >= max_consecutive_nonfinite:
                raise NonFiniteTraining(
                    f"{self.consecutive_nonfinite} consecutive steps with a non-finite loss or gradient (up to step {step}); "
                    f"the last checkpoint is intact. Lower optim.lr, check the data, or raise train.max_consecutive_nonfinite")
        else:
            self.consecutive_nonfinite = 0
        self.samples += stats.samples
        self.tokens += stats.tokens
        self.bad += stats.bad
        self.read += stats.read
        self._window_tokens += stats.tokens
        self._window_flops += stats.flops
        w = self._window_balance
        w[0] += stats.rank_flops_max
        w[1] += stats.busy_sum
        w[2] += stats.busy_max
        w[3] += 1
        for k, v in stats.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        check_bad_fraction(bad=self.bad, read=self.read, data=data)

    def _balance_figures(self) -> dict[str, float]:
        """How evenly the window's work fell on the ranks (data.balance): the largest rank's share over the
        mean, by estimated FLOPs and by measured compute time (1.0 = even); and that time's max and mean."""
        flops_max, busy_sum, busy_max, steps = self._window_balance
        world = self.dist.world_size
        nan = float("nan")
        return {
            "rank_flops_imbalance": flops_max / (self._window_flops / world) if self._window_flops > 0 else nan,
            "rank_busy_imbalance": busy_max / (busy_sum / world) if busy_sum > 0 else nan,
            "step_time_s": (time.time() - self._window_start) / steps if steps else nan,  # wall, per step
            "rank_busy_s_max": busy_max / steps if steps else nan,
            "rank_busy_s_mean": busy_sum / world / steps if steps else nan,
        }

    def client_state(self, step: int) -> dict[str, Any]:
        """Collective (sums skip counts over ranks)."""
        return {"step": step, "samples_seen": self.samples, "tokens_seen": self.tokens, "bad_seen": self.bad,
                "read_seen": self.read, "skipped": sum_counts(self.skipped), "data_position": self.samples,
                "nonfinite_skips": self.nonfinite_skips, "consecutive_nonfinite": self.consecutive_nonfinite,
                "world_size": self.dist.world_size}

    def _mfu(self, tflops: float) -> float:
        """Achieved over peak, at most 1: a window faster than the peak means the peak (measured at start
        on CPU) was too low; that is said once, and MFU is then relative to the fastest window seen."""
        if tflops > self.peak_tflops:
            if not self._peak_raised:
                log.warning("achieved %.3g TFLOP/s exceeds the MFU peak of %.3g: the measured peak underestimates "
                            "this device (set train.peak_tflops); MFU is reported against the fastest window",
                            tflops, self.peak_tflops)
            self._peak_raised = True
            self.peak_tflops = tflops
        return tflops / self.peak_tflops

    def record(self, step: int, stats: StepStats, *, lr: float) -> dict[str, Any]:
        """A metrics.jsonl row for the window since the previous one (collective)."""
        elapsed = max(time.time() - self._window_start, 1e-9)
        row = {
            "step": step, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm, "samples": self.samples,
            "tokens": self.tokens, "tokens_per_s": self._window_tokens / elapsed, "supervised_tokens": stats.supervised,
            "real_token_fraction": stats.tokens / max(stats.slots, 1),  # this step: non-pad / (rows x padded length)
            "bad_samples": self.bad, "data_wait_fraction": self.data_wait / elapsed,
            "nonfinite_skips": self.nonfinite_skips,
            "tflops": self._window_flops / elapsed / 1e12,  # achieved model TFLOP/s, all ranks
            "mfu": self._mfu(self._window_flops / elapsed / 1e12),
        }
        row.update(self._balance_figures())
        row.update({f"skipped/{k}": v for k, v in sum_counts(self.skipped).items()})
        self._window_start, self._window_tokens, self._window_flops, self.data_wait = time.time(), 0, 0.0, 0.0
        self._window_balance = [0.0, 0.0, 0.0, 0]
        return row
