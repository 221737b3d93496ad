"""What every recipe's ``__main__`` does: parse and validate the config, run, map failures to exit codes.

Exit codes: 0 done; 2 configuration error (before any process group starts); 3 too much bad data.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, TypeVar

from vlmscale.config import ConfigError, load_config, parse_cli
from vlmscale.data.dataset import TooManyBadSamples
from vlmscale.engine.distributed import shutdown

log = logging.getLogger(__name__)
C = TypeVar("C")

EXIT_CONFIG = 2
EXIT_BAD_DATA = 3


def check_paths(cfg) -> None:
    """Inputs that must exist, checked before any process group starts."""
    from pathlib import Path

    from vlmscale.config.deepspeed import resolve_ds_path

    resolve_ds_path(cfg.deepspeed.config)
    for i, src in enumerate(cfg.data.sources):
        if not src.path.startswith("demo:") and not Path(src.path).exists():
            raise ConfigError(f"data.sources[{i}].path={src.path!r} does not exist")
    for key in ("init_from", "vision", "llm"):
        value = getattr(cfg.model, key)
        if value is not None and not (Path(value) / "config.json").is_file():
            raise ConfigError(f"model.{key}={value!r}: no config.json there (expected a Hugging Face model directory)")


def recipe_main(config_cls: type[C], train: Callable[[C], int], argv: list[str]) -> int:
    try:
        config_path, overrides = parse_cli(argv)
        cfg = load_config(config_cls, path=config_path, overrides=overrides)
        check_paths(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        code = train(cfg)
    except TooManyBadSamples as exc:
        log.error("stopping: %s", exc)
        return EXIT_BAD_DATA
    shutdown()
    return code
