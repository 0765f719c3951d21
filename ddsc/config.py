"""Strict, typed configuration: YAML + ``key=value`` overrides -> nested dataclasses.

Every run is described by one dataclass tree (see ``ddsc.train.config.RunConfig``). This module turns a
YAML file plus command-line overrides into that tree and refuses anything it does not understand: an
unknown or misspelt key, a value of the wrong type, or a missing required value stops the run at once
with a one-line message that names the full key and, for typos, the closest valid key. Failing here, before
any worker process starts, is far cheaper than failing an hour into a multi-node job.

The loader is generic over dataclasses so each concept keeps its own config class next to its code
(``ModelConfig`` beside the model, ``BinningConfig`` beside the binning, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ddsc.errors import ConfigError, InputError

__all__ = ["MISSING", "ConfigError", "InputError", "from_dict", "load_config", "save_config", "to_dict"]

T = TypeVar("T")

MISSING = dataclasses.MISSING


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(sorted(valid))})"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where the conversion is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}: {value!r} is not one of {list(choices)}{_suggest(str(value), [str(c) for c in choices])}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string; accept plain float literals only.
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a bug in a config class, not user input


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, strictly (see module docstring)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"unknown config key '{prefix}{key}'{_suggest(str(key), list(fields))}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
        elif field.default is MISSING and field.default_factory is MISSING:
            raise ConfigError(f"missing required config value '{prefix}{name}'")
    try:
        return cls(**kwargs)
    except ValueError as err:  # __post_init__ validation (ConfigError or a plain ValueError): add the prefix
        raise ConfigError(f"{prefix}{err}" if prefix and not str(err).startswith(prefix) else str(err)) from None


def to_dict(obj: Any) -> Any:
    """The inverse of :func:`from_dict`: a plain, YAML/JSON-serialisable tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


BASE_KEY = "base"


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Load one YAML file; a top-level ``base: other.yaml`` (relative to the file) is loaded first and
    overridden, so presets state only what differs from the production config."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        tree = OmegaConf.load(path)
    except yaml.YAMLError as err:  # a syntax error: say where, as the YAML parser does, on one line
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: YAML syntax error: {problem}") from None
    base = tree.pop(BASE_KEY, None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a path to another YAML file")
    return OmegaConf.merge(_load_yaml(path.parent / base, (*seen, path.resolve())), tree)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load ``cls`` from a YAML file (optional; see ``_load_yaml`` for ``base:``) and ``key=value`` overrides,
    validating strictly.

    OmegaConf merges the file and the dotted overrides and resolves ``${section.key}`` interpolations; the
    strict conversion to dataclasses is ours, so every error names the key and the closest valid one.
    """
    try:
        tree = OmegaConf.create() if path is None else _load_yaml(Path(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override '{bad[0]}' must look like key=value")
        tree = OmegaConf.merge(tree, OmegaConf.from_dotlist(list(overrides)))
        plain = OmegaConf.to_container(tree, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path or 'overrides'}: {err}".splitlines()[0]) from None
    if not isinstance(plain, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return from_dict(cls, plain)


def save_config(obj: Any, path: str | Path) -> None:
    """Write the exact resolved config as YAML (kept next to every checkpoint and export)."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
