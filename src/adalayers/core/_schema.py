"""Build dataclass configs from plain mappings, checking keys and types (no imports of ours)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation; return it (ints promoted to float)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(
            errors[0]
            if len(errors) == 1
            else f"{key}: {value!r} is not a valid {_type_name(annotation)}"
        )
    if origin is Literal:
        word = {False: "no", True: "yes"}.get(value) if isinstance(value, bool) else None
        if word in typing.get_args(annotation):  # YAML 1.1 reads a bare no / yes as a bool
            return word
        if value not in typing.get_args(annotation):
            raise ValueError(f"{key}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise ValueError(f"{key}: expected a {origin.__name__}, got {value!r}")
        args = typing.get_args(annotation)
        if origin is list:
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return {
            _coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()
        }
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, key)
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise ValueError(f"{key}: expected {annotation.__name__}, got {value!r}")
        return value
    return value


def build(cls: type, values: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types.

    Raises:
        ValueError: an unknown key (with the known ones), a wrong type, or an invalid value;
            the message names the dotted key.
    """
    where = prefix or "config"
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in known]
    if unknown:
        hints_text = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), known, n=1)
            hints_text.append(
                f"{prefix + '.' if prefix else ''}{k}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
            )
        raise ValueError(
            f"unknown key(s) {', '.join(hints_text)}; known keys in {where}: {', '.join(known)}"
        )
    kwargs = {
        k: _coerce(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in values.items()
    }
    try:
        return cls(**kwargs)
    except ValueError as err:
        message = str(err)
        if prefix and not message.startswith(prefix):
            message = f"{prefix}: {message}"
        raise ValueError(message) from None
