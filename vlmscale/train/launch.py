"""What every recipe's ``__main__`` does: parse and validate the config, run, map failures to exit codes.

Exit codes: 0 done; 2 configuration error (before training starts); 3 too much bad data;
4 too many consecutive non-finite steps; 5 resume requested but nothing loadable (or unsafe);
6 stopped by SIGTERM/SIGUSR1 after committing a checkpoint (relaunch to resume);
1 the hang watchdog fired (stacks in output_dir/hang/) or any other failure.

A failure on one rank is every rank's: pre-launch checks that read the filesystem (which can differ
between nodes) are agreed in one collective, so every rank exits 2 and the failing rank's message
is printed (with its rank and host) by every rank; an exception in training is posted to the other
ranks (``vlmscale.train.watchdog.PeerFailures``), which stop within seconds with the failing
rank's exit code.
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Callable, NoReturn, TypeVar

from vlmscale.config import ConfigError, load_config, parse_cli
from vlmscale.process import exit_process
from vlmscale.data.dataset import TooManyBadSamples
from vlmscale.distributed.group import all_gather_objects, barrier, env_dist_info, init_distributed, shutdown

log = logging.getLogger(__name__)
C = TypeVar("C")

EXIT_CONFIG = 2
EXIT_BAD_DATA = 3
EXIT_NONFINITE = 4
EXIT_RESUME = 5


def check_config(cfg) -> None:
    """The DeepSpeed JSON and the batch sizes against the launcher's world size: alike on every rank,
    checked before any process group starts."""
    from vlmscale.config.deepspeed import build_ds_config, resolve_ds_path

    resolve_ds_path(cfg.deepspeed.config)
    build_ds_config(cfg, world_size=env_dist_info().world_size)


def check_paths(cfg) -> None:
    """Inputs that must exist and the checkpoint history; these read the filesystem, which can differ
    between nodes, so :func:`recipe_main` agrees on the outcome across ranks."""
    from pathlib import Path

    from vlmscale.config.deepspeed import build_ds_config, zero_stage
    from vlmscale.train.checkpoint import CheckpointManager, ResumeError
    from vlmscale.distributed.group import DistInfo

    ds = build_ds_config(cfg, world_size=env_dist_info().world_size)
    checkpoints = CheckpointManager(cfg.output_dir, dist=DistInfo(0, 1, 0), keep_last=0)
    if cfg.resume == "latest" and checkpoints.newest() is None:
        raise ConfigError(f"resume=latest but {checkpoints.root} holds no complete checkpoint "
                          "(use resume=auto to start fresh when there is none)")
    if cfg.resume == "never" and checkpoints.has_history() and not cfg.checkpoint.overwrite:
        raise ConfigError(f"resume=never but {checkpoints.root} holds checkpoints of an earlier run (newest "
                          f"{checkpoints.newest()}); a new run would mix its checkpoints with them. Use a new output_dir, "
                          "or checkpoint.overwrite=true to move the old history aside (to checkpoints.old-<time>), "
                          "or resume=auto to continue it")
    check_resume_batch(cfg, checkpoints, world_size=env_dist_info().world_size)
    settle_precision(cfg, checkpoints)
    for i, src in enumerate(cfg.data.sources):
        if not src.path.startswith("demo:") and not Path(src.path).exists():
            raise ConfigError(f"data.sources[{i}].path={src.path!r} does not exist")
    check_resume_mixture(cfg, checkpoints)
    try:
        tag = checkpoints.find(cfg.resume)
    except ResumeError:
        tag = None  # setup_run reports it with its exit code
    if tag is None or checkpoints.architecture_dir(tag) is None:  # a resume reads no model weights (architecture_dir)
        for key in ("init_from", "vision", "llm"):
            value = getattr(cfg.model, key)
            if value is not None and not (Path(value) / "config.json").is_file():
                hint = (f"; {checkpoints.root / tag} predates checkpoints that hold their architecture, so resuming it "
                        "builds the model from this path first" if tag is not None else "")
                raise ConfigError(f"model.{key}={value!r}: no config.json there (expected a Hugging Face model "
                                  f"directory){hint}")
    if cfg.stage == "ppo":
        for key in ("reward_model", "critic_from"):
            value = getattr(cfg.ppo, key)
            if value is not None and not (Path(value) / "score_head.safetensors").is_file():
                raise ConfigError(f"ppo.{key}={value!r}: no score_head.safetensors there (expected a reward export: "
                                  "the HF model dir recipes/reward.py writes, with its score head)")
    if cfg.stage == "grpo":
        from vlmscale.eval.rewards import RewardSet

        for i, path in enumerate(cfg.grpo.prompts):
            if not path.startswith("demo:") and not Path(path).exists():
                raise ConfigError(f"grpo.prompts[{i}]={path!r} does not exist (conversation shards: "
                                  "`vlmscale data convert` writes them)")
        try:
            RewardSet.from_config(cfg.grpo.rewards, format_pattern=cfg.grpo.format_pattern)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    ewc = cfg.regularizer.ewc
    if ewc.weight > 0:
        from vlmscale.regularize.ewc import missing_files

        missing = missing_files(ewc.path)
        if missing:
            raise ConfigError(f"regularizer.ewc.path={ewc.path!r} lacks {', '.join(missing)}; write it with "
                              "`vlmscale ewc fisher --out DIR`")
        if zero_stage(ds) != 3:
            raise ConfigError("regularizer.ewc applies the penalty to ZeRO-3 partitions; "
                              f"deepspeed.config={cfg.deepspeed.config!r} is not stage 3 (use ds_configs/zero3.json)")


def settle_precision(cfg, checkpoints) -> None:
    """Resolve ``train.precision`` (``auto`` by hardware and by the checkpoint to resume) into the run
    config, before any process group starts; the run logs the decision (:func:`precision_decision`)."""
    from vlmscale.train.checkpoint import ResumeError
    from vlmscale.precision import PrecisionError, checkpoint_precision, resolve

    saved = tag = None
    try:
        tag = checkpoints.find(cfg.resume)
    except ResumeError:
        pass  # setup_run reports it with its exit code
    if tag is not None:
        saved = checkpoint_precision(checkpoints.root / tag, checkpoints.meta(tag))
    try:
        decision = resolve(cfg.train.precision, checkpoint=saved,
                           checkpoint_path=checkpoints.root / tag if tag is not None else None)
    except PrecisionError as exc:
        raise ConfigError(str(exc)) from exc
    cfg.train.precision = decision.precision
    _DECISION[:] = [decision]


_DECISION: list = []


def precision_decision():
    """The precision decision :func:`settle_precision` made in this process (None before it ran)."""
    return _DECISION[0] if _DECISION else None


def check_resume_batch(cfg, checkpoints, *, world_size: int) -> None:
    """The checkpoint to resume must have been trained with this launch's global batch.

    Step ``t`` reads data positions ``[t * G, (t + 1) * G)``, so the global batch ``G`` fixes the sample
    order; with it kept, any world size continues the same sequence (``grad_accum_steps`` takes up the
    difference: 16 ranks x accum 1 -> 8 ranks x accum 2).
    """
    from vlmscale.train.checkpoint import ResumeError

    try:
        tag = checkpoints.find(cfg.resume)
    except ResumeError:
        return  # setup_run reports it with its exit code
    if tag is None:
        return
    saved = checkpoints.meta(tag)
    check_universal_size(cfg, checkpoints, tag, world_size=world_size)
    train = cfg.train
    have = train.micro_batch_size * train.grad_accum_steps * world_size
    if "global_batch" in saved and saved["global_batch"] != have:
        from vlmscale.config.deepspeed import batch_fix

        want = saved["global_batch"]
        fix = batch_fix(want=want, micro_batch_size=train.micro_batch_size, world_size=world_size)
        raise ConfigError(
            f"{checkpoints.root / tag} was trained with a global batch of {want} samples ({saved['world_size']} "
            f"ranks) but this launch gives {have} (micro_batch_size {train.micro_batch_size} x grad_accum_steps "
            f"{train.grad_accum_steps} x {world_size} ranks); the data order depends on it: {fix}")


def check_resume_mixture(cfg, checkpoints) -> None:
    """The checkpoint to resume must have been trained on this launch's data mixture (``vlmscale.data.fingerprint``)."""
    from vlmscale.data.fingerprint import check_resume_data
    from vlmscale.train.checkpoint import ResumeError

    try:
        tag = checkpoints.find(cfg.resume)
    except ResumeError:
        return  # setup_run reports it with its exit code
    if tag is not None:
        check_resume_data(cfg, checkpoints.root / tag)


def check_universal_size(cfg, checkpoints, tag: str, *, world_size: int) -> None:
    """A checkpoint saved by another number of ranks is converted inside the job only when it is small;
    a large one would hold every rank at a barrier for the conversion (an hour at 76B)."""
    from vlmscale.train.checkpoint import UNIVERSAL

    if checkpoints.meta(tag)["world_size"] == world_size or (checkpoints.root / tag / UNIVERSAL).is_dir():
        return
    gb = checkpoints.size_bytes(tag) / 1e9
    if gb > cfg.checkpoint.auto_universal_max_gb:
        raise ConfigError(
            f"{checkpoints.root / tag} was saved by {checkpoints.meta(tag)['world_size']} ranks and is {gb:.1f} GB, above "
            f"checkpoint.auto_universal_max_gb={cfg.checkpoint.auto_universal_max_gb:g}; convert it before relaunching "
            f"on {world_size} ranks: vlmscale ckpt convert {cfg.output_dir} --to universal --workers 8")


def _where() -> str:
    return f"rank {env_dist_info().rank} on {socket.gethostname()}"


def _agree_on_checks(cfg) -> bool:
    """Run :func:`check_paths` on every rank; True if it passed on all of them (collective when the
    launcher started several ranks). Every failing rank prints its error, and every rank the others'."""
    error = None
    try:
        check_paths(cfg)
    except ConfigError as exc:
        error = f"config error ({_where()}): {exc}"
        print(error, file=sys.stderr)
    if env_dist_info().world_size == 1:
        return error is None
    init_distributed()
    outcomes = all_gather_objects((error, cfg.train.precision))
    errors = [e for e, _ in outcomes if e is not None]
    precisions = sorted({p for _, p in outcomes})
    if not errors and len(precisions) > 1:  # ranks on different hardware resolved auto differently
        errors = [f"config error: the ranks resolved train.precision=auto to {' and '.join(precisions)} (different "
                  "hardware); set train.precision explicitly"]
        print(errors[0], file=sys.stderr)
    if errors and error is None:
        print("config error: stopping because other ranks failed their pre-launch checks:\n" + "\n".join(errors),
              file=sys.stderr)
    if errors:
        shutdown()
    return not errors


def exit_code(exc: BaseException) -> int:
    """The exit code of a run that raised ``exc`` (see the module doc)."""
    from vlmscale.train.checkpoint import ResumeError
    from vlmscale.train.preemption import EXIT_PREEMPTED, Preempted
    from vlmscale.train.progress import NonFiniteTraining
    from vlmscale.train.safe_load import UnsafeCheckpoint

    if isinstance(exc, TooManyBadSamples):
        return EXIT_BAD_DATA
    if isinstance(exc, NonFiniteTraining):
        return EXIT_NONFINITE
    if isinstance(exc, (ResumeError, UnsafeCheckpoint)):
        return EXIT_RESUME
    if isinstance(exc, Preempted):
        return EXIT_PREEMPTED
    return 1


def run_recipe(config_cls: type[C], train: Callable[[C], int], argv: list[str]) -> NoReturn:
    """A recipe's ``__main__``: :func:`recipe_main`, then :func:`exit_process` with its code. By then the run
    has closed what it wrote (checkpoints committed, metrics and TensorBoard closed, the process group left)."""
    exit_process(recipe_main(config_cls, train, argv))


def recipe_main(config_cls: type[C], train: Callable[[C], int], argv: list[str]) -> int:
    try:
        config_path, overrides = parse_cli(argv)
        cfg = load_config(config_cls, path=config_path, overrides=overrides)
        check_config(cfg)
    except ConfigError as exc:
        print(f"config error ({_where()}): {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from vlmscale.config.schema import DEPRECATIONS

    if env_dist_info().rank == 0:
        for notice in sorted(DEPRECATIONS):
            print(f"warning: {notice}", file=sys.stderr)
    if not _agree_on_checks(cfg):
        return EXIT_CONFIG
    from vlmscale.train.preemption import Preempted
    from vlmscale.train.watchdog import PeerFailures, kill_children

    info = init_distributed()
    failures = PeerFailures(cfg.output_dir, rank=info.rank, world_size=info.world_size)
    try:
        code = train(cfg)
    except Preempted as exc:  # every rank stops at the same step (an all-reduced flag): a clean exit
        log.warning("%s", exc)
        _leave(failures)
        return exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - every failure ends the run; the others are told first
        code = exit_code(exc)
        first = failures.report(code, f"{type(exc).__name__}: {exc}")
        if code == 1:
            log.error("stopping on an unexpected error", exc_info=exc)
        else:
            log.error("%s: %s", "cannot resume" if code == EXIT_RESUME else "stopping", exc)
        if first.rank != info.rank:
            log.error("stopping: %s", first)
            code = first.code
        kill_children()
        shutdown(barrier=False)
        return code
    _leave(failures)
    return code


def _leave(failures) -> None:
    """A clean exit: the peer-failure watch stays on through the final barrier (a rank failing at the very
    end still ends the others with its code), then the process group goes."""
    barrier()
    failures.close()
    shutdown(barrier=False)
