"""Rank-aware metrics: ``metrics.jsonl`` and tensorboard on rank 0, nothing elsewhere."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank} %(name)s] %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step``; a line torn by a crash mid-write is dropped too."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            log.warning("%s: dropping a torn line (%d chars)", path, len(line))
    path.write_text("".join(line + "\n" for line in keep))


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, resume_step)  # drop records past the checkpoint we resume from
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class SampleLog:
    """Per-rank record of the sample ids each step trained on (``train.log_sample_ids``).

    ``output_dir/samples/rank-NNNNN.jsonl``, one ``{"step", "ids"}`` line per step; on resume the
    lines past the checkpoint are dropped, so the file lists exactly what the final model saw.
    """

    def __init__(self, output_dir: str | Path, *, rank: int, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "samples" / f"rank-{rank:05d}.jsonl"
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, resume_step)

    @staticmethod
    def drop_absent_ranks(output_dir: str | Path, *, world_size: int, resume_step: int) -> None:
        """Rank 0, on a resume with fewer ranks than before: truncate the files of the ranks that no longer
        exist too, which no rank of this run opens."""
        for path in sorted((Path(output_dir) / "samples").glob("rank-*.jsonl")):
            if int(path.stem.split("-")[1]) >= world_size:
                truncate_jsonl(path, resume_step)

    def log(self, step: int, ids: list[str]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "ids": ids}) + "\n")
