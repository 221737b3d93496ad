"""Peak tensor memory of a CPU process: the CPU counterpart of ``torch.cuda.max_memory_allocated``.

On a GPU the caching allocator counts every byte handed to a tensor; a CPU process has no such
counter. The profiler's memory events are one: with ``profile_memory=True`` every CPU allocation
and free made through PyTorch's allocator is recorded with its size and time, so a running sum over
the events in time order is the memory held by tensors, and its maximum is the peak. What it leaves
out is what ``max_memory_allocated`` leaves out too: the Python heap, library code, and buffers that
do not come from PyTorch's allocator (DeepSpeed's shared-memory all-reduce buffer here; NCCL's on a
GPU). Tensors that already existed when measuring started count 0, and freeing them is not seen.

``phase(name)`` marks a stretch of the measured code, so the peak can be split by phase.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

from torch.profiler import ProfilerActivity, profile, record_function

_PHASE = "phase:"


@dataclass
class TensorMemory:
    """Use as a context manager around the code to measure; read the results after it exits."""

    peak_bytes: int = 0  # most bytes held by tensors allocated since entering
    end_bytes: int = 0  # bytes still held at exit
    phase_peaks: dict[str, int] = field(default_factory=dict)  # peak within each marked phase
    phase_starts: dict[str, int] = field(default_factory=dict)  # bytes held when each phase began
    _prof: profile | None = None

    def __enter__(self) -> "TensorMemory":
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        events = self._prof.profiler.kineto_results.events()
        memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        phases = [(e.name()[len(_PHASE):], e.start_ns(), e.end_ns()) for e in events if e.name().startswith(_PHASE)]
        held, times, levels = 0, [], []
        for t, nbytes in memory:
            held += nbytes
            times.append(t)
            levels.append(held)
        self.peak_bytes = max(levels, default=0)
        self.end_bytes = held
        for name, start, end in phases:
            before = [lvl for t, lvl in zip(times, levels) if t < start]
            inside = [lvl for t, lvl in zip(times, levels) if start <= t <= end]
            start_level = before[-1] if before else 0
            # a name marked more than once keeps its highest figures
            self.phase_starts[name] = max(self.phase_starts.get(name, 0), start_level)
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), *inside, start_level)
        self._prof = None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a stretch of code measured by an enclosing :class:`TensorMemory`."""
    with record_function(_PHASE + name):
        yield
