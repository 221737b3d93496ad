"""Loading our own checkpoints without running code from them.

DeepSpeed's ``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``, so a
tampered checkpoint file runs arbitrary code when a job resumes. :func:`install` swaps in a
checkpoint engine that loads with ``weights_only=True`` and allows exactly the two non-tensor
classes DeepSpeed's ZeRO checkpoints contain; anything else (e.g. a ``__reduce__`` that calls
``os.system``) is refused with :class:`UnsafeCheckpoint` before it can execute. Exports are
safetensors only; ``model.trust_remote_code`` stays off unless set.
"""

from __future__ import annotations

import pickle

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum

# what DeepSpeed ZeRO model/optimizer state files hold besides tensors and containers
DEEPSPEED_SAFE_GLOBALS = [ZeroStageEnum, LossScaler]


class UnsafeCheckpoint(RuntimeError):
    pass


def safe_torch_load(path: str, map_location=None):
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - the report is best effort; the refusal is not
            found = []
        raise UnsafeCheckpoint(
            f"refusing to load {path}: it needs code outside the allowed set to unpickle "
            f"({', '.join(found) or exc}). It was not written by this trainer or has been tampered with.") from exc


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location)


def install(engine) -> None:
    """Make ``engine.load_checkpoint`` use weights-only loading."""
    from deepspeed.runtime.checkpoint_engine.decoupled_checkpoint_engine import DecoupledCheckpointEngine

    if type(engine.checkpoint_engine) is DecoupledCheckpointEngine:  # checkpoint.async_save: its load is torch.load too
        engine.checkpoint_engine.load = safe_torch_load
        return
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                           "safe loading supports the default torch engine and the decoupled one (checkpoint.async_save) only")
    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(engine.checkpoint_engine.__dict__)
    engine.checkpoint_engine = safe
