"""Resumable checkpoints: DeepSpeed state + training progress + RNG, committed atomically.

Layout under ``<output_dir>/checkpoints``::

    step-00000200/            DeepSpeed tag dir (model, optimizer, scheduler; client state)
    step-00000200/rng/rank-00000.pt   per-rank RNG states (plain tensors, weights_only-loadable)
    step-00000200/<name>/     further engines of the run (PPO's critic), each a DeepSpeed tag dir
    step-00000200/model/      what rebuilds the model without weights (HF config, generation config, tokenizer,
                              image processor), written by rank 0: a resume builds from it and reads nothing
                              from ``model.init_from`` (the DeepSpeed files hold every parameter, see
                              :meth:`CheckpointManager.architecture_dir`)
    step-00000200/COMMITTED   written last, by rank 0, after every rank finished writing and fsyncing
                              (JSON: step, world_size, global_batch, precision, time, seq: the commit's place in
                              this history, which retention and ``newest`` order by)
    step-00000200/universal/  DeepSpeed universal checkpoint of this step, made when a run resumes it on a
                              different number of ranks (see :meth:`CheckpointManager.prepare_universal`), with
                              ``frozen.safetensors``: the frozen parameters, which DeepSpeed's conversion drops
    latest                    name of the newest committed tag (temp file + fsync + rename)

    .saving-step-00000200/    a save in progress; renamed to ``step-00000200`` once committed
    .deleting-step-00000200/  a checkpoint being removed (retention, or replaced by a re-save of its tag)

A save is written into ``.saving-<tag>`` and renamed into place after the commit barrier, so a
``<tag>`` directory is always complete. Re-saving a tag that exists (after ``resume=<older tag>``)
moves the old one aside first; a kill between the two renames leaves a committed ``.saving-<tag>``
that :meth:`CheckpointManager.clean_partial` renames into place.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from vlmscale.distributed.group import DistInfo, all_gather_objects, barrier
from vlmscale.files import atomic_write, fsync_dir, fsync_tree  # noqa: F401 - fsync_tree: re-used by callers
from vlmscale.train import faults

log = logging.getLogger(__name__)
COMMIT = "COMMITTED"
PREFIX = "step-"
SAVING = ".saving-"
DELETING = ".deleting-"
UNIVERSAL = "universal"
ARCH = "model"
FROZEN = "frozen.safetensors"


def bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux ``/proc/self/io``: ``rchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def is_decoupled(engine) -> bool:
    """Whether ``engine`` saves through DeepSpeed's decoupled checkpoint engine (``checkpoint.async_save``)."""
    ckpt = getattr(engine, "checkpoint_engine", None)
    return bool(ckpt is not None and ckpt.is_decoupled())


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def commit_order(root: Path, tag: str) -> tuple[int, float]:
    """Where ``tag``'s commit stands in the history: its ``seq``, then its commit time."""
    meta = json.loads((root / tag / COMMIT).read_text())
    return int(meta.get("seq", -1)), float(meta.get("time", 0.0))


def committed_tags(root: Path) -> list[str]:
    """Complete checkpoints, oldest commit first (not name order: a rollback re-saves lower steps later)."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / COMMIT).is_file()]
    return sorted(tags, key=lambda t: (*commit_order(root, t), t))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def engine_precision(engine) -> str:
    """The precision a DeepSpeed engine trains in (what its optimizer state is saved as)."""
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp16" if engine.fp16_enabled() else "fp32"


class ResumeError(RuntimeError):
    """Resume was requested but nothing loadable exists."""


class CheckpointManager:
    def __init__(self, output_dir: str | Path, *, dist: DistInfo, keep_last: int):
        self.root = Path(output_dir) / "checkpoints"
        self.dist, self.keep_last = dist, keep_last
        self.extra_files: dict[str, str] = {}  # name -> text rank 0 writes into every checkpoint before its commit
        # rank 0 calls it with <staging>/model in every save: the model's architecture (model.build.save_architecture)
        self.architecture: Callable[[Path], None] | None = None
        self._pending: tuple | None = None  # a deferred save (checkpoint.async_save) not committed yet

    def save(self, engine, *, step: int, client_state: dict[str, Any], extra_engines: dict[str, Any] | None = None,
             defer: bool = False) -> Path:
        """Collective: every rank writes and fsyncs its shards into ``.saving-<tag>``, then rank 0 commits
        and renames it to ``<tag>``. ``extra_engines`` (name -> engine) are saved inside the same tag, so
        one commit covers them all.

        ``defer`` (``checkpoint.async_save``, an engine with DeepSpeed's decoupled checkpoint engine): return
        once the state is handed to each rank's writer process; the files are written while training goes
        on, and :meth:`finish_pending` (after the next step) waits for them, fsyncs and commits. Until then
        the newest committed checkpoint is the previous one."""
        tag = tag_for(step)
        staging = self.root / f"{SAVING}{tag}"
        self.finish_pending()
        t0 = time.time()
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # a torn save of this tag from an earlier launch
        barrier()
        engine.save_checkpoint(str(self.root), tag=staging.name, client_state=client_state, save_latest=False)
        for name, other in (extra_engines or {}).items():
            other.save_checkpoint(str(staging), tag=name, client_state={"step": step}, save_latest=False)
        rng_dir = staging / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), rng_dir / f"rank-{self.dist.rank:05d}.pt")
        if self.dist.is_main and self.architecture is not None:
            self.architecture(staging / ARCH)
        self._pending = (engine, [engine, *(extra_engines or {}).values()], tag, step, t0)
        if defer and is_decoupled(engine):
            faults.fire("save", step)  # async: while the writer processes are still writing
            log.info("checkpoint %s handed to the writer processes in %.1fs; committed after the next step", tag,
                     time.time() - t0)
        else:
            self.finish_pending()
        return self.root / tag

    @property
    def pending(self) -> bool:
        """Whether a deferred save waits for :meth:`finish_pending`."""
        return self._pending is not None

    def finish_pending(self) -> None:
        """Collective: complete the save :meth:`save` left pending, if any: wait until every engine's writer
        has written its files (DeepSpeed's decoupled commit; a no-op after the engine's own step did it), fsync
        them, then rank 0 commits. A no-op when nothing is pending."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        engine, engines, tag, step, t0 = pending
        staging = self.root / f"{SAVING}{tag}"
        for e in engines:
            if is_decoupled(e):
                e._commit_decoupled_checkpoint()  # blocks until this rank's writer process has written the files
        fsync_tree(staging)  # this rank's files (and the others' it can see): durable before the commit
        if not is_decoupled(engine):
            faults.fire("save", step)
        barrier()
        if self.dist.is_main:
            self._commit(engine, tag=tag, step=step)
        barrier()
        log.info("checkpoint %s committed in %.1fs", tag, time.time() - t0)

    def _commit(self, engine, *, tag: str, step: int) -> None:
        """Rank 0, every rank's files durable: mark the staged save committed and rename it into place."""
        staging, final = self.root / f"{SAVING}{tag}", self.root / tag
        done = committed_tags(self.root)
        seq = max((commit_order(self.root, t)[0] for t in done), default=0) + 1
        for name, text in self.extra_files.items():  # e.g. the data mixture's fingerprint (vlmscale.data.fingerprint)
            atomic_write(staging / name, text)
        meta = {"step": step, "world_size": self.dist.world_size, "global_batch": engine.train_batch_size(),
                "precision": engine_precision(engine), "time": time.time(), "seq": seq}
        atomic_write(staging / COMMIT, json.dumps(meta))
        if final.exists():  # re-saving a tag after a rollback: the old one goes, whole, before the new arrives
            doomed = self.root / f"{DELETING}{tag}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(final, doomed)
            faults.fire("replace", step)
        os.replace(staging, final)
        fsync_dir(self.root)
        atomic_write(self.root / "latest", tag)
        self._retain(step)

    def _retain(self, step: int) -> None:
        """Keep the ``keep_last`` newest commits (by commit order, not by tag name)."""
        if self.keep_last > 0:
            for tag in committed_tags(self.root)[: -self.keep_last]:
                doomed = self.root / f"{DELETING}{tag}"
                os.replace(self.root / tag, doomed)  # atomic: a kill mid-delete leaves no half checkpoint
                faults.fire("retain", step)
                shutil.rmtree(doomed, ignore_errors=True)
        for doomed in self.root.glob(f"{DELETING}*"):
            shutil.rmtree(doomed, ignore_errors=True)

    def clean_partial(self) -> None:
        """Rank 0, before training starts: finish a committed save whose rename was interrupted, and
        remove torn saves and interrupted deletions."""
        if not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(SAVING) and (p / COMMIT).is_file() and not (self.root / p.name[len(SAVING):]).exists():
                log.warning("completing checkpoint %s (committed, rename interrupted)", p.name[len(SAVING):])
                os.replace(p, self.root / p.name[len(SAVING):])
            elif (p.name.startswith((DELETING, SAVING)) or
                  (p.is_dir() and p.name.startswith(PREFIX) and not (p / COMMIT).exists())):
                log.warning("removing incomplete checkpoint %s", p)
                shutil.rmtree(p, ignore_errors=True)
        fsync_dir(self.root)

    def has_history(self) -> bool:
        """Whether checkpoints of some run (complete or not) are here."""
        return self.root.is_dir() and any(p.name.startswith((PREFIX, SAVING)) for p in self.root.iterdir())

    def move_history_aside(self) -> Path:
        """Rank 0 (``checkpoint.overwrite=true``): rename the whole history to ``checkpoints.old-<time>``."""
        aside = self.root.with_name(f"{self.root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(self.root, aside)
        fsync_dir(self.root.parent)
        log.warning("checkpoint.overwrite=true: moved the earlier run's checkpoints to %s", aside)
        return aside

    def newest(self) -> str | None:
        """The ``latest`` pointer if it names a committed checkpoint, else the newest committed one."""
        tags = committed_tags(self.root)
        pointer = self.root / "latest"
        if pointer.is_file():
            named = pointer.read_text().strip()
            if named in tags:
                return named
            log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", pointer, named)
        return tags[-1] if tags else None

    def find(self, resume: str) -> str | None:
        """The tag to resume from: newest complete (auto: if any; latest: must exist), none (never), or the one named."""
        if resume == "never":
            return None
        if resume in ("auto", "latest"):
            tag = self.newest()
            if tag is None and resume == "latest":
                raise ResumeError(f"resume=latest but {self.root} holds no complete checkpoint; "
                                  "use resume=auto to start fresh when there is none")
            return tag
        named = Path(resume)
        if not (named / COMMIT).is_file():
            raise ResumeError(f"resume={resume!r} is not a complete checkpoint directory (no {COMMIT} marker)")
        if named.parent.resolve() != self.root.resolve():
            raise ResumeError(f"resume={resume!r} must be a checkpoint under {self.root}")
        return named.name

    def meta(self, tag: str) -> dict[str, Any]:
        """What rank 0 recorded when it committed ``tag`` (step, world_size, global_batch)."""
        return json.loads((self.root / tag / COMMIT).read_text())

    def architecture_dir(self, tag: str) -> Path | None:
        """``<tag>/model`` if the checkpoint holds its architecture (saves from before it did: None).

        Such a checkpoint is self-sufficient. DeepSpeed's files of one tag hold every parameter: under
        ZeRO-3 each rank's ``*_optim_states.pt`` holds its fp32 partition of the trainable ones, and its
        ``zero_pp_rank_R_mp_rank_00_model_states.pt`` holds ``frozen_param_fragments``, its partition of
        every parameter the optimizer does not own (``requires_grad=False``), which ``load_checkpoint``
        copies back (``DeepSpeedEngine.load_module_state_dict``); under ZeRO-1/2 the module state holds
        them whole. So a resume builds the model from this directory and reads no weights elsewhere."""
        arch = self.root / tag / ARCH
        return arch if (arch / "config.json").is_file() else None

    def frozen_weights(self, tag: str) -> dict[str, Any]:
        """The frozen parameters of ``tag``'s universal conversion, by name (nothing read yet).

        DeepSpeed's universal conversion (``ds_to_universal``) keeps the optimizer's parameters only,
        and a universal load skips the module state (``DeepSpeedEngine._load_checkpoint``), so frozen
        parameters would keep whatever the model was built with. :meth:`prepare_universal` merges
        their fragments from every saving rank into ``universal/frozen.safetensors``; the caller copies
        them into the model before the engine loads the rest."""
        from vlmscale.model.shards import LazyTensor

        path = self.root / tag / UNIVERSAL / FROZEN
        if not path.is_file():
            raise ResumeError(f"{path} is missing; convert {self.root / tag} again with "
                              f"`vlmscale ckpt convert {self.root.parent} --to universal`")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: LazyTensor(path, k) for k in f.keys()}

    def _write_frozen(self, src: Path, out: Path) -> int:
        """Merge the frozen parameters' fragments of every rank's ``*model_states.pt`` in ``src`` into
        ``out`` (safetensors); returns how many. A ZeRO-3 fragment is the rank's padded partition of the
        flattened parameter, rank order (as ``zero_to_fp32`` merges them); under ZeRO-1/2 each is whole."""
        import math
        import re

        from vlmscale.model.shards import write_safetensors
        from vlmscale.train.safe_load import safe_torch_load

        def rank_of(f: Path) -> int:
            m = re.match(r"zero_pp_rank_(\d+)_", f.name)
            return int(m.group(1)) if m else 0

        files = sorted(src.glob("*model_states.pt"), key=rank_of)
        states = [safe_torch_load(str(f), map_location="cpu") for f in files]
        shapes = (states[0].get("frozen_param_shapes") or {}) if states else {}
        merged = {}
        for name, shape in shapes.items():
            numel = math.prod(shape)
            parts = [s["frozen_param_fragments"][name].flatten() for s in states]
            flat = parts[0] if parts[0].numel() >= numel else torch.cat(parts)
            merged[name] = flat[:numel].reshape(tuple(shape)).contiguous()
        write_safetensors(out, merged, metadata={"format": "pt"})
        return len(merged)

    def size_bytes(self, tag: str) -> int:
        """Bytes of ``tag``'s files (its universal conversion excluded)."""
        return sum(f.stat().st_size for f in (self.root / tag).rglob("*")
                   if f.is_file() and UNIVERSAL not in f.relative_to(self.root / tag).parts[:1])

    def prepare_universal(self, tag: str, *, workers: int = 1) -> Path:
        """Convert ``tag`` to a DeepSpeed universal checkpoint in ``<tag>/universal`` (once), with ``workers``
        processes to extract and merge. Run by rank 0 inside a small job, or offline by
        ``vlmscale ckpt convert`` (one process, no process group) before relaunching a large one.

        A ZeRO checkpoint is partitioned for the world size that wrote it; the universal one holds each
        parameter's fp32 weights and Adam moments whole, and every rank of any world size cuts its own
        partition out of it on load. Every input file is first loaded weights-only (DeepSpeed's converter
        unpickles them unrestricted). The conversion is written to a temp dir and renamed, so an
        interrupted one is redone. Reads the whole fp32 model and optimizer state on this node's CPU.
        """
        from deepspeed.checkpoint import ds_to_universal

        from vlmscale.train.safe_load import safe_torch_load

        src, dst = self.root / tag, self.root / tag / UNIVERSAL
        if dst.is_dir():
            if not (dst / FROZEN).is_file():  # converted before the frozen parameters were kept
                self._write_frozen(src, dst / f".{FROZEN}.tmp")
                os.replace(dst / f".{FROZEN}.tmp", dst / FROZEN)
                fsync_dir(dst)
            return dst
        t0 = time.time()
        for f in sorted(src.glob("*.pt")):
            safe_torch_load(str(f), map_location="cpu")
        for stale in src.glob(f".{UNIVERSAL}-tmp-*"):  # an interrupted conversion
            shutil.rmtree(stale, ignore_errors=True)
        tmp = src / f".{UNIVERSAL}-tmp-{os.getpid()}"
        args = argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=workers,
                                  num_merge_workers=workers, keep_temp_folder=False, strict=True, inject_missing_state=False)
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints progress bars
            ds_to_universal.main(args)
        (src / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; ours is the dir name
        frozen = self._write_frozen(src, tmp / FROZEN)
        fsync_tree(tmp)
        os.replace(tmp, dst)
        fsync_dir(src)
        log.info("converted %s (saved by %d ranks, %.2f GB) to a universal checkpoint in %.1fs with %d workers "
                 "(%d frozen parameters kept in %s)", tag, self.meta(tag)["world_size"], self.size_bytes(tag) / 1e9,
                 time.time() - t0, workers, frozen, FROZEN)
        return dst

    def load(self, engine, tag: str, *, universal: bool = False, extra_engines: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load ``tag`` into ``engine``; ``universal``: from ``<tag>/universal`` (the engine was created with
        ``checkpoint.load_universal``), for a world size other than the one that saved it. ``extra_engines``
        (e.g. PPO's critic) load from ``<tag>/<name>``, saved by ``save(extra_engines=...)``."""
        if universal and extra_engines:
            raise ResumeError(f"{self.root / tag} holds several engines (e.g. PPO's actor and critic); resuming it on "
                              "a different world size is not supported: resume with the world size that saved it")
        read_before = bytes_read()
        load_dir, load_tag = (self.root / tag, UNIVERSAL) if universal else (self.root, tag)
        if universal:
            groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
            if self.dist.is_main:  # the universal files are unpickled unrestricted by DeepSpeed: check them first
                from vlmscale.train.safe_load import safe_torch_load

                for f in sorted((load_dir / load_tag).rglob("*.pt")):
                    safe_torch_load(str(f), map_location="cpu")
            barrier()
        path, client = engine.load_checkpoint(str(load_dir), tag=load_tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise ResumeError(f"DeepSpeed could not load checkpoint {self.root / tag}; refusing to start from scratch")
        if universal:
            _repair_universal_load(engine, groups)
        for name, other in (extra_engines or {}).items():
            path, _ = other.load_checkpoint(str(self.root / tag), tag=name, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
            if path is None:
                raise ResumeError(f"DeepSpeed could not load {name} from {self.root / tag / name}; refusing to continue")
        rng_file = self.root / tag / "rng" / f"rank-{self.dist.rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        elif universal:
            log.info("no RNG state for rank %d in %s (saved by fewer ranks); keeping the seeded one", self.dist.rank, tag)
        per_rank = all_gather_objects(bytes_read() - read_before)
        log.info("loading %s%s read %s MB per rank (ranks 0..%d); the checkpoint holds %.1f MB", tag,
                 "/universal" if universal else "", ", ".join(f"{b / 1e6:.1f}" for b in per_rank), len(per_rank) - 1,
                 self.size_bytes(tag) / 1e6)
        return client


def _repair_universal_load(engine, groups: list[dict[str, Any]]) -> None:
    """Undo two things DeepSpeed 0.19's universal ZeRO-3 load gets wrong for vlmscale's optimizer.

    1. It copies parameter group 0's hyperparameters onto every group; vlmscale's groups differ
       (per-module learning rates, no weight decay on norms and biases). The configured ones are put
       back, with each group's current learning rate taken from the restored scheduler.
    2. It gives every group's Adam state one shared ``step`` tensor, which AdamW then increments once
       per group per update, so the bias correction runs ahead (step 10 instead of 4 after two
       updates with four groups). Each group gets its own copy.
    """
    lrs = engine.lr_scheduler.get_last_lr()
    for group, saved, lr in zip(engine.optimizer.param_groups, groups, lrs, strict=True):
        group.update({**saved, "lr": lr})
    for state in engine.optimizer.optimizer.state.values():
        state["step"] = state["step"].clone()
