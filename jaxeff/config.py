"""Experiment configs: nested dataclasses, ``--set a.b=value`` overrides, JSON round trips.

Kept free of jax imports so that ``jaxeff --help`` and the CLI's error paths stay instant.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad config key or value; the message names it and what is allowed."""


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    """``int``, ``tuple[str, ...] | None``, ``MoEConfig | None``: no module paths."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", str(tp))


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
            if not math.isfinite(value):
                raise ConfigError(f"{key}={value!r} must be a finite number")
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


def set_path(cfg: Any, dotted: str, value: Any, _prefix: str = "") -> Any:
    """A copy of dataclass ``cfg`` with ``dotted`` (``a.b.c``) set to ``value`` (type-checked;
    the dataclass's own ``__post_init__`` checks run too). Errors name the whole dotted key."""
    head, _, rest = dotted.partition(".")
    names = [f.name for f in dataclasses.fields(cfg)]
    key = _prefix + head
    if head not in names:
        raise _unknown_key(cfg, _prefix + dotted, head)
    current = getattr(cfg, head)
    if rest:
        if current is None:
            current = _default_section(_field_types(type(cfg))[head], key, rest)
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {key!r} is a value, not a section: cannot set {rest!r}")
        new = set_path(current, rest, value, key + ".")
    else:
        new = _checked_sign(type(cfg), key, _coerce(value, _field_types(type(cfg))[head], key))
    try:
        return dataclasses.replace(cfg, **{head: new})
    except (TypeError, ValueError) as err:
        message = " ".join(str(err).split())
        if head not in message:
            message = f"{key}={value!r}: {message}"
        raise ConfigError(message) from err


def _unknown_key(cfg: Any, key: str, head: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cfg)]
    return ConfigError(
        f"unknown config key {key!r} ({head!r} is not in {type(cfg).__name__}); "
        f"allowed: {', '.join(names)}"
    )


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
    kwargs = {
        k: _checked_sign(cls, prefix + k, _coerce(v, hints[k], prefix + k)) for k, v in data.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err


# Integer fields that are sizes, counts or cadences wherever they appear: 0 is never meaningful
# (a batch of 0, a model of width 0, "every 0 steps") and would divide by zero or loop forever.
POSITIVE_INT_FIELDS = frozenset(
    """steps batch batch_size epochs rounds dim heads depth seq_len vocab_size frames height width
    patch channels n_layers n_heads n_kv_heads ffn_dim hidden every log_every checkpoint_every
    keep_checkpoints eval_batches eval_batch eval_batch_size local_steps client_batch num_experts
    top_k expert_dim repeats timing_repeats matmul_repeats timed_steps seeds max_new_tokens bucket
    max_batch max_seq_len query_chunk iters k route_every max_len embed_dim patches image_size
    clips train_clips devices ep_devices mlp_ratio enc_layers dec_layers src_vocab tgt_vocab
    text_vocab num_frames""".split()
)


def _checked_sign(cls, key: str, value: Any) -> Any:
    """Integers in configs are counts, sizes and seeds: negative ones are rejected unless the
    dataclass names the field in ``SIGNED_FIELDS`` (e.g. a mesh axis of ``-1``: fill), and 0
    where the field's name is one of `POSITIVE_INT_FIELDS`."""
    if isinstance(value, int) and not isinstance(value, bool):
        name = key.rpartition(".")[2]
        if value < 0 and name not in getattr(cls, "SIGNED_FIELDS", ()):
            raise ConfigError(f"{key}={value} must be >= 0")
        if value == 0 and name in POSITIVE_INT_FIELDS:
            raise ConfigError(f"{key}=0 must be >= 1")
    return value


def describe(cfg: Any, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every leaf field of dataclass ``cfg``: ``(dotted key, type name, value)``, nested
    sections flattened (``model.dim``). A section that is None (``model.moe``) is one entry,
    followed by its keys with the defaults that setting one of them turns on."""
    rows = []
    hints = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            rows.extend(describe(value, key + "."))
            continue
        rows.append((key, _type_name(hints[f.name]), value))
        if value is None:
            try:
                section = _default_section(hints[f.name], key, "")
            except ConfigError:
                section = None
            if section is not None:
                rows.extend(describe(section, key + "."))
    return rows


def load_config_file(path: str) -> dict:
    """The JSON object of a config file for ``--config FILE`` (see `apply_mapping`): nested
    (``{"train": {"steps": 10}}``) or dotted (``{"train.steps": 10}``) keys, or the
    ``config.json`` a run writes (``{"name": ..., "preset": ..., "config": {...}}``)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror or err})") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must hold one JSON object, got {type(data).__name__}")
    if set(data) >= {"config", "preset"} and isinstance(data["config"], dict):
        data = data["config"]  # a run's config.json
    return data


def apply_mapping(cfg: Any, data: dict, prefix: str = "") -> Any:
    """``cfg`` with every key of ``data`` set, type-checked as by `set_path`: keys may be dotted
    (``{"train.steps": 10}``) or nested objects for sections (``{"train": {"steps": 10}}``); an
    object given for a dict-typed field is that field's value. Each section is rebuilt once
    with all its new values, so fields that are checked together (``dim`` and ``n_heads``) may
    change together."""
    nested: dict = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key or "" in key.split("."):
            raise ConfigError(f"config keys must be non-empty dotted names, got {key!r}")
        head, _, rest = key.partition(".")
        if rest:
            value = {rest: value}
        if isinstance(value, dict) and isinstance(nested.get(head), dict):
            nested[head] = {**nested[head], **value}
        else:
            nested[head] = value
    names = [f.name for f in dataclasses.fields(cfg)]
    hints = _field_types(type(cfg))
    changes = {}
    for head, value in nested.items():
        key = prefix + head
        if head not in names:
            raise _unknown_key(cfg, key, head)
        if isinstance(value, dict) and _is_section(cfg, head):
            current = getattr(cfg, head)
            if current is None:
                current = _default_section(hints[head], key, "...")
            changes[head] = apply_mapping(current, value, key + ".")
        else:
            changes[head] = _checked_sign(type(cfg), key, _coerce(value, hints[head], key))
    try:
        return dataclasses.replace(cfg, **changes)
    except (TypeError, ValueError) as err:
        message = f"{prefix.rstrip('.') or type(cfg).__name__}: {err}"
        raise ConfigError(" ".join(message.split())) from err


def _is_section(cfg: Any, name: str) -> bool:
    """Whether field ``name`` of ``cfg`` is dataclass-typed (a section; possibly None now)."""
    if dataclasses.is_dataclass(getattr(cfg, name)):
        return True
    tp = _field_types(type(cfg))[name]
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return any(dataclasses.is_dataclass(o) for o in (typing.get_args(tp) if union else (tp,)))
