"""How a vlmscale process ends: recipes and the ``vlmscale`` command alike (light: no torch import)."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """End the process with ``code`` without the interpreter's module teardown (about 2 s per process with
    torch, transformers and DeepSpeed loaded, on every rank of every launch; and where a C++ object's
    destructor can still abort a rank that has finished its work, "terminate called without an active
    exception", seen once in CI after a 2-rank ``vlmscale eval``). The caller has closed what it wrote and left
    the process group; the exit handlers still run first (multiprocessing's join of loader workers,
    DeepSpeed's async checkpoint writers), MPI is finalized when mpi4py started it (under mpirun), then
    logging and stdio are flushed."""
    atexit._run_exitfuncs()  # what interpreter exit runs first; os._exit below skips only the module teardown
    mpi = sys.modules.get("mpi4py.MPI")  # mpi4py finalizes MPI from a C-level exit hook, which os._exit skips;
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():  # mpirun counts that as a failure
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
