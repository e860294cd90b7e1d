"""Typed configs: frozen dataclasses, serialised to JSON and overridable as ``a.b.c=value``."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from nps.errors import ConfigError

C = TypeVar("C")


def check_models(models: tuple[str, ...], allowed: tuple[str, ...], field: str = "models") -> None:
    """A non-empty selection of known model names, or an error that lists them."""
    unknown = [m for m in models if m not in allowed]
    if unknown or not models:
        raise ConfigError(f"{field}={models}: choose from {list(allowed)}")


def config_to_dict(config) -> dict[str, Any]:
    """JSON-ready dict of a (nested) config dataclass; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of {annotation.__name__} fields, got {value!r}")
        return config_from_dict(annotation, value, path)
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(annotation) or (Any,)
        return tuple(_coerce(v, item_type, path) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        raise ConfigError(f"{path}={value!r} must be of type {annotation.__name__}")
    return value


def config_from_dict(cls: type[C], data: dict[str, Any], path: str = "") -> C:
    """Build ``cls`` from a dict (e.g. a checkpoint's JSON); unknown keys are errors."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config field {where}{unknown[0]}; known fields: {sorted(types_)}")
    kwargs = {k: _coerce(v, types_[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str, current: Any, path: str) -> Any:
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{path}={text!r}: expected true or false")
    for kind in (int, float):
        if isinstance(current, kind):
            try:
                return kind(text)
            except ValueError:
                raise ConfigError(f"{path}={text!r}: expected a number of type {kind.__name__}") from None
    return text


def apply_overrides(config: C, overrides: list[str]) -> C:
    """Return ``config`` with ``["train.steps=200", "eval.context_sizes=0,1,10"]`` applied."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like field.path=value")
        path, text = item.split("=", 1)
        config = _override(config, path.strip().split("."), text.strip(), path.strip())
    return config


def _override(config, keys: list[str], text: str, full_path: str):
    head, rest = keys[0], keys[1:]
    fields = {f.name for f in dataclasses.fields(config)}
    if head not in fields:
        raise ConfigError(f"unknown config field {full_path!r}; fields here: {sorted(fields)}")
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{full_path!r}: {head} has no sub-fields")
        value = _override(current, rest, text, full_path)
    elif dataclasses.is_dataclass(current):
        raise ConfigError(f"{full_path!r} is a group of fields; set one of {[f.name for f in dataclasses.fields(current)]}")
    elif isinstance(current, tuple):
        sample = current[0] if current else ""
        value = tuple(_parse_scalar(t.strip(), sample, full_path) for t in text.split(",") if t.strip())
    else:
        value = _parse_scalar(text, current, full_path)
    return dataclasses.replace(config, **{head: value})
