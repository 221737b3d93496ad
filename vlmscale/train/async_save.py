"""``checkpoint.async_save``: DeepSpeed's ``DecoupledCheckpointEngine`` (a writer process per rank), made safe
to kill.

DeepSpeed starts each rank's writer with ``multiprocessing`` in ``spawn`` mode; the writer waits on a queue
whose write end it holds itself, so when its rank is SIGKILLed it never sees the end of the queue and lives
on (holding the launcher's stdout and stderr open, so whoever waits for them waits forever). The writer is
started here through :func:`_writer_main`, which first asks the kernel to SIGKILL it when its rank dies
(``PR_SET_PDEATHSIG``). An uncommitted save is never used (``vlmscale.train.checkpoint``), so killing a
writer mid-file is harmless. See docs/reliability.md, "Async saves".
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
from typing import Any, Iterator

PR_SET_PDEATHSIG = 1


def _writer_main(*args: Any) -> None:
    """DeepSpeed's writer loop (``init_decoupled_checkpoint``), killed with its rank."""
    from deepspeed.runtime.checkpoint_engine import decoupled_checkpoint_engine as dce

    parent = int(os.environ.get("VLMSCALE_WRITER_PARENT", "0"))
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent and os.getppid() != parent:  # the rank died before the request took effect
        os._exit(1)
    # a fresh (spawned) process imported DeepSpeed's module unpatched: its function is the original
    getattr(dce, "_ORIGINAL_WRITER_MAIN", dce.init_decoupled_checkpoint)(*args)


def decoupled(ds_config: dict[str, Any]) -> bool:
    return bool((ds_config.get("checkpoint", {}).get("writer") or {}).get("decoupled"))


@contextlib.contextmanager
def writer_processes(ds_config: dict[str, Any]) -> Iterator[None]:
    """Around ``deepspeed.initialize`` for a ``ds_config`` with the decoupled writer: the writer processes are
    started through :func:`_writer_main`; the environment DeepSpeed reads (the node count and rank, which
    only its own launcher exports) is filled in; and the global start method DeepSpeed sets to ``spawn`` is
    put back afterwards, so DataLoader workers keep the platform's default."""
    if not decoupled(ds_config):
        yield
        return
    from deepspeed.runtime.checkpoint_engine import decoupled_checkpoint_engine as dce

    os.environ.setdefault("CROSS_SIZE", os.environ.get("SLURM_NNODES", "1"))
    os.environ.setdefault("CROSS_RANK", os.environ.get("SLURM_NODEID", os.environ.get("GROUP_RANK", "0")))
    os.environ["VLMSCALE_WRITER_PARENT"] = str(os.getpid())
    if not hasattr(dce, "_ORIGINAL_WRITER_MAIN"):
        dce._ORIGINAL_WRITER_MAIN = dce.init_decoupled_checkpoint
    method = multiprocessing.get_start_method(allow_none=True)
    dce.init_decoupled_checkpoint = _writer_main  # looked up when the engine starts its process
    try:
        yield
    finally:
        dce.init_decoupled_checkpoint = dce._ORIGINAL_WRITER_MAIN
        multiprocessing.set_start_method(method, force=True)
