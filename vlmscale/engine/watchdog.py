"""Hang watchdog: a rank that makes no progress for ``train.hang_timeout_s`` dumps its stacks and exits.

A stopped or dead peer leaves the other ranks blocked inside a collective, possibly in C++ code
that holds the GIL. Python's ``faulthandler`` timer runs on its own C thread and needs no GIL: when
it fires it writes every thread's stack to ``output_dir/hang/rank-NNNNN.txt`` and exits the
process (code 1). The launcher then sees a failed rank and terminates the rest (DeepSpeed's
launcher: SIGTERM, then SIGKILL after 30 s, which also ends a SIGSTOPped rank).

The training loop re-arms the timer before each step (and each checkpoint save), so the timeout
bounds one step, not the run. Evaluation and export run with the timer off.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, output_dir: str | Path, *, rank: int, timeout_s: float):
        self.timeout = timeout_s
        self.path = Path(output_dir) / "hang" / f"rank-{rank:05d}.txt"
        self._file = None
        if timeout_s > 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w")  # noqa: SIM115 - faulthandler needs it open for the whole run

    def beat(self) -> None:
        """(Re)start the countdown."""
        if self._file is not None:
            faulthandler.dump_traceback_later(self.timeout, repeat=False, file=self._file, exit=True)

    def pause(self) -> None:
        if self._file is not None:
            faulthandler.cancel_dump_traceback_later()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.beat()

    def close(self) -> None:
        """Stop watching; remove the (empty) dump file of a run that never hung."""
        if self._file is None:
            return
        faulthandler.cancel_dump_traceback_later()
        self._file.close()
        self._file = None
        if self.path.stat().st_size == 0:
            self.path.unlink()
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()
