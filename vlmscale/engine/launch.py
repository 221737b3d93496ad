"""What every recipe's ``__main__`` does: parse and validate the config, run, map failures to exit codes.

Exit codes: 0 done; 2 configuration error (before any process group starts); 3 too much bad data.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, TypeVar

from vlmscale.config import ConfigError, load_config, parse_cli
from vlmscale.data.dataset import TooManyBadSamples

log = logging.getLogger(__name__)
C = TypeVar("C")

EXIT_CONFIG = 2
EXIT_BAD_DATA = 3


def recipe_main(config_cls: type[C], train: Callable[[C], int], argv: list[str]) -> int:
    try:
        config_path, overrides = parse_cli(argv)
        cfg = load_config(config_cls, path=config_path, overrides=overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return train(cfg)
    except TooManyBadSamples as exc:
        log.error("stopping: %s", exc)
        return EXIT_BAD_DATA
