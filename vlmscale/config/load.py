"""Build typed configs from YAML files plus dotted ``key=value`` overrides.

Unknown keys, wrong types and invalid values raise :class:`ConfigError` (a ``ValueError``) that
names the field and how to fix it. Nothing here touches torch.distributed, so a bad config fails
before any process group exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-facing configuration mistake."""


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units; ``GiB`` and friends are binary); ints pass through."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _hint(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(options))}."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be null")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported config type {tp} at {where}")


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            path = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown config key '{path}'.{_hint(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (what ``config.yaml`` holds)."""
    return dataclasses.asdict(cfg)


def _leaf_keys(tree: Any, prefix: str) -> set[str]:
    if not isinstance(tree, dict):
        return {prefix}
    out = {prefix} if prefix else set()
    for key, value in tree.items():
        out |= _leaf_keys(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def load_config(cls: type[T], *, path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Defaults <- YAML file <- ``key=value`` overrides, then ``validate()``.

    The dotted keys the file and the overrides set are recorded as ``cfg.explicit_keys`` (e.g.
    ``data.max_tiles``): some defaults yield to a checkpoint's own setting unless set explicitly.
    """
    tree: dict[str, Any] = to_dict(cls())
    explicit: set[str] = set()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping")
        _merge(tree, loaded)
        explicit |= _leaf_keys(loaded, "")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        _set_dotted(tree, key.strip(), value)
        explicit |= _leaf_keys(value, key.strip())
    cfg = _build(cls, tree, "")
    cfg.explicit_keys = frozenset(explicit)
    cfg.validate()
    return cfg


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def parse_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split ``[--config F] [key=value ...]`` and drop launcher-injected ``--local_rank``."""
    config_path = None
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            config_path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            if "=" not in arg:
                i += 1  # skip its value
        elif arg.startswith("--"):
            raise ConfigError(f"unknown option {arg}: use --config FILE and key=value overrides")
        else:
            overrides.append(arg)
        i += 1
    return config_path, overrides
