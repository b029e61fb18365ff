"""Reading a `Config` from text: `--set section.field=value` overrides and saved JSON.

`config.py` holds the schema and its validation; this module turns strings into it, parsing
each value by the field's type hint (int, float, bool, str, a `Literal`'s choices, `X | None`).
Every mistake raises `ConfigError` with one sentence naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Literal

from lmjax.config import Config, ConfigError

RUN_LENGTHS = ("steps", "tokens", "budget_flops")


def config_from_dict(d: dict) -> Config:
    """Inverse of `Config.to_dict`; unknown keys raise ConfigError."""
    return _from_dict(Config, d, "")


def read_config(path) -> Config:
    """The Config saved as JSON at `path` (a run's config.json); ConfigError when the file
    is missing, is not JSON, or does not describe a Config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path.parent} is not a run directory (no config.json).")
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ConfigError("it is not a JSON object")
        return config_from_dict(saved)
    except (ValueError, TypeError) as e:  # JSONDecodeError and ConfigError are ValueErrors
        raise ConfigError(f"{path} is corrupt ({str(e).rstrip('.')}); restore it from "
                          "checkpoints/<step>/config, which every checkpoint keeps.") from None


def _from_dict(cls, d: dict, prefix: str):
    """Build dataclass `cls` from a nested dict, recursing into dataclass-typed fields."""
    types_ = typing.get_type_hints(cls)
    unknown = set(d) - set(types_)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in sorted(unknown))}.")
    values = {}
    for name, value in d.items():
        if dataclasses.is_dataclass(types_[name]):
            value = _from_dict(types_[name], value, f"{prefix}{name}.")
        values[name] = value
    return cls(**values)


def override(config: Config, assignments: list[str]) -> Config:
    """Apply `section.field=value` strings (nested: `model.moe.n_experts=8`), parsing each
    value by the field's type. All assignments are applied before validation runs. Giving
    one of train.steps / train.tokens / train.budget_flops replaces the base's run length;
    giving model.parametrization=standard turns off the base's µP-only model.mup_scale_adam_eps.

    >>> override(Config(), ["model.d_model=512", "train.budget_flops=3e13"]).model.d_model
    512
    """
    updates: dict = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise ConfigError(f"--set expects section.field=value, got {assignment!r}.")
        key = key.strip()
        node, cls, path = updates, Config, key.split(".")
        for name in path[:-1]:
            field_type = typing.get_type_hints(cls).get(name)
            if not dataclasses.is_dataclass(field_type):
                raise ConfigError(_unknown_key(key))
            node, cls = node.setdefault(name, {}), field_type
        field_type = typing.get_type_hints(cls).get(path[-1])
        if field_type is None or dataclasses.is_dataclass(field_type):
            raise ConfigError(_unknown_key(key))
        node[path[-1]] = _parse_value(key, text.strip(), field_type)
    _one_run_length(updates.get("train", {}))
    _standard_drops_mup_only(updates.get("model", {}))
    return _replace_nested(config, updates)


def _one_run_length(train_updates: dict) -> None:
    """Setting one run length (e.g. train.budget_flops) clears the others the base config
    had, unless they are set explicitly too (then validation reports the conflict)."""
    if any(train_updates.get(name) is not None for name in RUN_LENGTHS):
        for name in RUN_LENGTHS:
            train_updates.setdefault(name, None)


def _standard_drops_mup_only(model_updates: dict) -> None:
    """Setting model.parametrization=standard turns off mup_scale_adam_eps, which the base
    config (a µP experiment, e.g. experiments/mup_base.py) may have on, unless it is set
    explicitly too (then validation reports the conflict): the standard model at the same
    constants is one --set away."""
    if model_updates.get("parametrization") == "standard":
        model_updates.setdefault("mup_scale_adam_eps", False)


def _replace_nested(node, updates: dict):
    """`dataclasses.replace` through nested dataclasses: inner ones are rebuilt first."""
    changes = {name: _replace_nested(getattr(node, name), value) if isinstance(value, dict) else value
               for name, value in updates.items()}
    return dataclasses.replace(node, **changes)


def _unknown_key(key: str) -> str:
    return f"unknown config key {key!r}; valid keys: {', '.join(_valid_keys(Config))}."


def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, type_ in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(type_):
            keys += _valid_keys(type_, f"{prefix}{name}.")
        elif prefix:
            keys.append(prefix + name)
    return keys


def _parse_value(key: str, text: str, field_type):
    """Parse `text` as `field_type` (int, float, bool, str, Literal, or X | None)."""
    options = typing.get_args(field_type) if isinstance(field_type, types.UnionType) or \
        typing.get_origin(field_type) is typing.Union else (field_type,)
    if type(None) in options and text.lower() in ("none", "null"):
        return None
    errors = []
    for option in (o for o in options if o is not type(None)):
        try:
            return _parse_one(text, option)
        except ValueError as e:
            errors.append(str(e))
    raise ConfigError(f"{key}: cannot use {text!r} ({'; '.join(errors)}).")


def _parse_one(text: str, option):
    if typing.get_origin(option) is Literal:
        choices = typing.get_args(option)
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}")
        return text
    if option is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError("expected true or false")
        return text.lower() in ("true", "1")
    if option is int:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("expected an integer") from None
        if not value.is_integer():
            raise ValueError("expected an integer")
        return int(value)
    if option is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    return text
