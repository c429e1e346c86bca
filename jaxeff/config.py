"""Experiment configs: nested dataclasses, ``--set a.b=value`` overrides, JSON round trips.

Kept free of jax imports so that ``jaxeff --help`` and the CLI's error paths stay instant.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad config key or value; the message names it and what is allowed."""


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` (converting where lossless)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} does not fit type {_type_name(tp)}")
    if tp is Any:
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f'{key}={value!r} must be a list (JSON, e.g. ["a", "b"])')
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a JSON object")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=key + ".")
        raise ConfigError(f"{key} must be a JSON object of {tp.__name__} fields")
    return value


def parse_value(text: str) -> Any:
    """JSON when it parses, else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_path(cfg: Any, dotted: str, value: Any) -> Any:
    """A copy of dataclass ``cfg`` with ``dotted`` (``a.b.c``) set to ``value`` (type-checked)."""
    head, _, rest = dotted.partition(".")
    names = [f.name for f in dataclasses.fields(cfg)]
    if head not in names:
        where = type(cfg).__name__
        raise ConfigError(f"unknown config key {dotted!r} in {where}; allowed: {', '.join(names)}")
    current = getattr(cfg, head)
    if rest:
        if current is None:
            current = _default_section(_field_types(type(cfg))[head], head, rest)
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {head!r} is a value, not a section: cannot set {rest!r}")
        new = set_path(current, rest, value)
    else:
        new = _coerce(value, _field_types(type(cfg))[head], head)
    try:
        return dataclasses.replace(cfg, **{head: new})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{dotted}={value!r}: {err}") from err


def _default_section(tp, head: str, rest: str):
    """The section to set ``rest`` in when field ``head`` is None: the default instance of
    its dataclass type (``moe: MoEConfig | None`` -> ``MoEConfig()``), so that
    ``--set model.moe.num_experts=8`` turns the section on with its defaults."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    classes = [o for o in typing.get_args(tp) if union and dataclasses.is_dataclass(o)]
    if len(classes) != 1:
        return None  # a plain value: set_path reports it
    try:
        return classes[0]()
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"config key {head!r} is None and {classes[0].__name__}() has no defaults to set "
            f"{rest!r} in ({err}); set it whole, e.g. --set {head}='{{...}}'"
        ) from err


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Applies ``key=value`` strings; the value is parsed as JSON when it can be."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        cfg = set_path(cfg, key.strip(), parse_value(text))
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict, prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from a dict, checking keys and types."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!r}; allowed: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)
