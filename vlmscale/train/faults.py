"""Deterministic fault injection, for the reliability tests (docs/reliability.md).

Set ``VLMSCALE_FAULT`` to ``<action>@<point><op><n>[,rank=<r>]``; several faults are separated
by ``;``. Unset (the default), every hook is a no-op.

    kill@step=7,rank=1     SIGKILL rank 1 as step 7 begins
    kill@save=10,rank=1    SIGKILL rank 1 inside the save of step 10, after its shards are written,
                           before the checkpoint is committed (a torn save)
    kill@retain=15         SIGKILL rank 0 in the middle of deleting an old checkpoint at step 15
    kill@replace=10        SIGKILL rank 0 while re-saving tag step-10 (after a rollback): the old step-10 is
                           moved aside, the new one committed but not yet renamed into place
    raise@step=3,rank=1    raise :class:`InjectedFault` on rank 1 as step 3 begins (an ordinary exception)
    nan@step=3,rank=1      rank 1's loss at step 3 becomes NaN
    nan@step>=3,rank=0     ... at every step from 3 on
    stop@step=5,rank=1     SIGSTOP rank 1 as step 5 begins (a hung rank)
    stall@step>=7          sleep 1 s before each step from 7 on (a slow run, to signal it mid-way)
    kill@refcache=3,rank=0 SIGKILL rank 0 after the DPO reference cache's step 3 is computed
"""

from __future__ import annotations

import functools
import os
import re
import signal
import time
from dataclasses import dataclass

ENV = "VLMSCALE_FAULT"
_SPEC = re.compile(r"^(kill|nan|stop|stall|raise)@(step|save|retain|replace|refcache)(>=|=)(\d+)(?:,rank=(\d+))?$")


class InjectedFault(RuntimeError):
    """An exception raised on purpose by ``raise@...`` (a stand-in for any bug on one rank)."""


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    at_least: bool
    n: int
    rank: int | None

    def matches(self, point: str, n: int, rank: int) -> bool:
        if point != self.point or (self.rank is not None and rank != self.rank):
            return False
        return n >= self.n if self.at_least else n == self.n


@functools.lru_cache(maxsize=4)
def parse(spec: str) -> tuple[Fault, ...]:
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        m = _SPEC.match(part)
        if m is None:
            raise ValueError(f"{ENV}={spec!r}: cannot parse {part!r} (e.g. kill@step=7,rank=1; see vlmscale/train/faults.py)")
        action, point, op, n, rank = m.groups()
        faults.append(Fault(action, point, op == ">=", int(n), None if rank is None else int(rank)))
    return tuple(faults)


def _active() -> tuple[Fault, ...]:
    """The faults set for this process (parsed once per distinct value; called a few times per step)."""
    spec = os.environ.get(ENV, "")
    return parse(spec) if spec else ()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fire(point: str, n: int) -> None:
    """Kill, stop or raise in this process if a fault is set for (point, n, this rank)."""
    for f in _active():
        if not f.matches(point, n, _rank()):
            continue
        if f.action == "raise":
            raise InjectedFault(f"injected fault {f.action}@{point}={n} on rank {_rank()}")
        if f.action == "stall":
            time.sleep(1.0)
        elif f.action in ("kill", "stop"):
            os.kill(os.getpid(), signal.SIGKILL if f.action == "kill" else signal.SIGSTOP)


def poison_loss(step: int) -> bool:
    """Whether this rank's loss at ``step`` should be made NaN."""
    return any(f.action == "nan" and f.matches("step", step, _rank()) for f in _active())
