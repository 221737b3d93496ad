"""Hang watchdog, and the notice that tells every rank when one rank failed.

**Watchdog.** A rank that makes no progress for ``train.hang_timeout_s`` dumps its stacks and exits.

A stopped or dead peer leaves the other ranks blocked inside a collective, possibly in C++ code
that holds the GIL. Python's ``faulthandler`` timer runs on its own C thread and needs no GIL: when
it fires it writes every thread's stack to ``output_dir/hang/rank-NNNNN.txt`` and exits the
process (code 1). The launcher then sees a failed rank and terminates the rest (DeepSpeed's
launcher: SIGTERM, then SIGKILL after 30 s, which also ends a SIGSTOPped rank).

The training loop re-arms the timer before each step, so the timeout bounds one step, not the
run; a checkpoint save gets ``checkpoint.save_timeout_s`` instead. Evaluation and export run with
the timer off.

**Peer failures.** A rank that fails (any exception) writes a notice into the process group's
key-value store (:meth:`PeerFailures.report`) before it exits. Every other rank polls the store on
a daemon thread: once it sees a notice it logs the failing rank's message, and if its main thread
has not left by itself within ``grace_s`` (it is blocked in a collective the failed rank will never
join) it dumps its stacks to ``output_dir/hang/rank-NNNNN.txt`` and exits with the failed rank's
exit code. So one rank's exception ends every rank within seconds, with that rank's code, instead
of leaving the others for the hang watchdog. Rank 0 hosts the store: when it fails it waits (at
most ``grace_s``) until every rank has seen the notice before exiting.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass
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

    def beat(self, timeout_s: float | None = None) -> None:
        """(Re)start the countdown: ``timeout_s`` (e.g. ``checkpoint.save_timeout_s``), default the step timeout."""
        if self._file is not None:
            faulthandler.dump_traceback_later(timeout_s or self.timeout, repeat=False, file=self._file, exit=True)

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


def kill_children() -> None:
    """SIGKILL this rank's worker processes on a failure exit: DataLoader workers ignore SIGTERM (see
    ``vlmscale.train.preemption.ignore_stop_signals``), so interpreter exit would wait on them forever
    while an iterator is still alive, and after ``os._exit`` they would linger for seconds."""
    for child in multiprocessing.active_children():
        child.kill()


_FAILED, _NUM_FAILED, _HEARD = "vlmscale/failed", "vlmscale/num_failed", "vlmscale/heard/"


@dataclass(frozen=True)
class Failure:
    rank: int
    host: str
    code: int
    message: str

    def __str__(self) -> str:
        return f"rank {self.rank} on {self.host} failed (exit code {self.code}): {self.message}"


class PeerFailures:
    """Share one rank's failure with every rank through the process group's store (see the module doc)."""

    def __init__(self, output_dir: str | Path, *, rank: int, world_size: int, grace_s: float = 10.0,
                 poll_s: float = 0.5):
        self.rank, self.world_size, self.grace_s, self.poll_s = rank, world_size, grace_s, poll_s
        self.dump = Path(output_dir) / "hang" / f"rank-{rank:05d}.txt"
        self.seen: Failure | None = None
        self._stop = threading.Event()
        self._store = None
        if world_size > 1:
            from torch.distributed.distributed_c10d import _get_default_store

            self._store = _get_default_store()
            threading.Thread(target=self._watch, name="vlmscale-peer-failures", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if not self._store.check([_FAILED]):
                    continue
                failure = Failure(**json.loads(self._store.get(_FAILED)))
                if failure.rank == self.rank:
                    return
                self.seen = failure
                self._store.set(f"{_HEARD}{self.rank}", "1")
            except Exception as exc:  # noqa: BLE001 - the store is gone: rank 0 died without a notice
                if self._stop.is_set():
                    return
                failure = self.seen = Failure(0, "?", 1, f"lost contact with rank 0 ({type(exc).__name__}: {exc})")
            log.error("stopping: %s", failure)
            if self._stop.wait(self.grace_s):
                return  # the main thread is leaving by itself
            self.dump.parent.mkdir(parents=True, exist_ok=True)
            with open(self.dump, "a") as f:
                f.write(f"{failure}\nthis rank did not stop within {self.grace_s:g}s; its stacks:\n")
                faulthandler.dump_traceback(file=f, all_threads=True)
            kill_children()
            os._exit(failure.code)

    def report(self, code: int, message: str) -> Failure:
        """This rank failed: post a notice (unless a peer's came first) and return the first failure."""
        self._stop.set()
        own = Failure(self.rank, socket.gethostname(), code, message)
        if self._store is None:
            return own
        try:
            if self._store.add(_NUM_FAILED, 1) == 1:
                self._store.set(_FAILED, json.dumps(own.__dict__))
            self._store.set(f"{_HEARD}{self.rank}", "1")
            first = Failure(**json.loads(self._store.get(_FAILED)))
            if self.rank == 0:  # the store lives in this process: keep it up until every rank has heard
                self._wait_until_heard()
            return first
        except Exception:  # noqa: BLE001 - rank 0 (the store) is gone; what the watcher saw is all we know
            return self.seen or own

    def _wait_until_heard(self) -> None:
        """Until every rank has read the notice, or none has for ``4 x poll_s`` (each live rank's watcher reads it
        within one poll; a rank that never does is dead, often the cause of the failure), at most ``grace_s``."""
        keys = [f"{_HEARD}{r}" for r in range(self.world_size)]
        deadline = time.time() + self.grace_s
        heard, last_news = 0, time.time()
        while time.time() < deadline:
            now = sum(self._store.check([k]) for k in keys)
            if now == len(keys):
                return
            if now > heard:
                heard, last_news = now, time.time()
            elif time.time() - last_news > 4 * self.poll_s:
                return
            time.sleep(0.1)

    def close(self) -> None:
        """Stop watching (before the process group is destroyed)."""
        self._stop.set()
