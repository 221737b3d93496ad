"""Graceful stop on SIGTERM / SIGUSR1: finish the step, commit a checkpoint, exit.

Slurm (and the DeepSpeed launcher, when it is itself terminated) sends SIGTERM and follows with
SIGKILL after a grace period (Slurm's KillWait, the launcher's 30 s); ``#SBATCH --signal=USR1@120``
asks for an earlier warning. The handler only sets a flag. After every step all ranks all-reduce
it, so a signal that reaches one rank stops every rank at the same step; they save a checkpoint
of that step together and exit with :data:`EXIT_PREEMPTED`, and a relaunch resumes there exactly.
"""

from __future__ import annotations

import logging
import signal

from vlmscale.distributed.group import all_reduce_sum

log = logging.getLogger(__name__)
EXIT_PREEMPTED = 6
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the checkpoint of ``step`` is committed."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; its checkpoint is committed, "
                         "relaunch the same command to resume")
        self.step, self.signum = step, signum


class StopFlag:
    def __init__(self):
        self.signum = 0
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)
        self.signum = signum

    def any_rank(self) -> int:
        """Collective: the signal number if any rank was signalled, else 0."""
        (total,) = all_reduce_sum([float(self.signum > 0)])
        return (self.signum or signal.SIGTERM) if total > 0 else 0


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the stop signals and leave when their rank does.

    PyTorch's workers die on SIGTERM by default, and their rank would then fail on its next batch
    instead of stopping cleanly. (Workers exit on their own once their parent process is gone.)
    """
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
