"""Typed configs: frozen dataclasses, validated once when built, serialised to JSON, overridable as ``a.b.c=value``.

Every config checks its own fields in ``__post_init__`` (a config that exists is valid) and
an experiment's config checks only what relates its parts. Overrides are applied to the JSON
form and the config is rebuilt once, so ``--set episodes.max_context=20 --set
episodes.num_targets=30`` is judged as a whole, never through an invalid half-way state.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from nps.errors import ConfigError, invalid

C = TypeVar("C")


def check_models(models: tuple[str, ...], allowed: tuple[str, ...], field: str = "models") -> None:
    """A non-empty selection of known model names, or an error that lists them."""
    unknown = [m for m in models if m not in allowed]
    if unknown or not models:
        raise invalid(field, models, f"must choose from {list(allowed)}")


def check_positive(config, *names: str) -> None:
    """Each named field of ``config`` is at least 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise invalid(name, getattr(config, name), "must be a positive integer")


def config_to_dict(config) -> dict[str, Any]:
    """JSON-ready dict of a (nested) config dataclass; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def differing_fields(a: Any, b: Any, path: str = "") -> list[str]:
    """The dotted paths at which two JSON forms (of configs, fingerprints) differ, in sorted order."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [found for key in sorted(set(a) | set(b), key=str)
                for found in differing_fields(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))]
    return [] if a == b else [path or "(the whole value)"]


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of {annotation.__name__} fields, got {value!r}", path)
        return config_from_dict(annotation, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise invalid(path, value, "must be a list")
        (item_type, *_rest) = typing.get_args(annotation) or (Any,)
        return tuple(_coerce(v, item_type, path) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and (
        not isinstance(value, annotation) or (annotation is not bool and isinstance(value, bool))
    ):
        raise invalid(path, value, f"must be of type {annotation.__name__}")
    return value


def config_from_dict(cls: type[C], data: dict[str, Any], path: str = "") -> C:
    """Build ``cls`` from a dict (e.g. a checkpoint's JSON); unknown keys are errors."""
    types_ = typing.get_type_hints(cls)
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__} must be a mapping of fields, got {data!r}", path or None)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config field {where}{unknown[0]}; known fields: {sorted(types_)}")
    kwargs = {k: _coerce(v, types_[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise error.under(path) from None


def _parse_scalar(text: str, current: Any, path: str) -> Any:
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{path}={text!r}: expected true or false", path)
    for kind in (int, float):
        if isinstance(current, kind):
            try:
                return kind(text)
            except ValueError:
                raise ConfigError(f"{path}={text!r}: expected a number of type {kind.__name__}", path) from None
    return text


def apply_overrides(config: C, overrides: list[str]) -> C:
    """Return ``config`` with ``["train.steps=200", "eval.context_sizes=0,1,10"]`` applied (validated once)."""
    data = config_to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like field.path=value")
        path, text = (part.strip() for part in item.split("=", 1))
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            if key not in node:
                raise ConfigError(f"unknown config field {path!r}; fields here: {sorted(node)}")
            node = node[key]
            if not isinstance(node, dict):
                raise ConfigError(f"{path!r}: {key} has no sub-fields")
        if leaf not in node:
            raise ConfigError(f"unknown config field {path!r}; fields here: {sorted(node)}")
        current = node[leaf]
        if isinstance(current, dict):
            raise ConfigError(f"{path!r} is a group of fields; set one of {sorted(current)}")
        if isinstance(current, list):
            sample = current[0] if current else ""
            node[leaf] = [_parse_scalar(t.strip(), sample, path) for t in text.split(",") if t.strip()]
        else:
            node[leaf] = _parse_scalar(text, current, path)
    return config_from_dict(type(config), data)
