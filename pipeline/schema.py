"""The typed-settings machinery every config section is written with: a field, its meaning, its allowed values.

Plain dataclasses, not pydantic or OmegaConf: a section is a dataclass whose
fields carry their default, one line of meaning and their range in
`setting(...)`; choices are `Literal[...]` types and lists are `list[...]`
types. That is all the schema needs, it imports only the standard library (so
loading a config stays cheap for every command and worker process), and the
checks below stay small enough to read. docs/ARCHITECTURE.md says more.
"""
from __future__ import annotations

import dataclasses
import math
import typing

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config problem; its message is one line and names the key."""


def setting(default=_MISSING, doc: str = "", *, ge=None, gt=None, le=None, lt=None, min_items: int = 0,
            factory=None):
    """A config field: its default, one line of meaning, and its range (inclusive ge/le, exclusive gt/lt).

    A list field takes `factory` (a fresh list per config) and `min_items`; its
    range applies to every element.
    """
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "min_items": min_items}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --------------------------------------------------------------- what a field allows

def field_types(section_cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(section_cls)


def is_list(tp) -> bool:
    return typing.get_origin(tp) is list


def element_type(tp):
    return typing.get_args(tp)[0] if is_list(tp) else tp


def choices(tp) -> tuple | None:
    """The allowed values of a Literal field (or of a list of Literals' elements), else None."""
    tp = element_type(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def is_numeric(tp) -> bool:
    return element_type(tp) in (int, float)


def bounds(f: dataclasses.Field) -> dict:
    return {k: f.metadata.get(k) for k in ("ge", "gt", "le", "lt") if f.metadata.get(k) is not None}


def range_text(f: dataclasses.Field) -> str:
    """'>= 0', '> 0 and <= 1', ... for messages and docs/CONFIG.md."""
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{words[k]} {v:g}" for k, v in bounds(f).items())


def type_text(tp) -> str:
    """The field's type in words: 'int', 'list of float', 'one of: a, b'."""
    options = choices(tp)
    inner = ("one of: " + ", ".join(map(str, options))) if options else element_type(tp).__name__
    return f"list of {inner}" if is_list(tp) else inner


# --------------------------------------------------------------- coercion

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def coerce(key: str, value, tp):
    """A YAML or command-line value as the field's type, or a one-line ConfigError naming the key."""
    if is_list(tp):
        if isinstance(value, str):     # the command line: a,b,c (or [a, b, c])
            value = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
        elif value is None:
            value = []
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(key, v, element_type(tp)) for v in value]
    options = choices(tp)
    if options is not None:
        text = "" if value is None else str(value).strip()
        for option in options:
            if text.lower() == str(option).lower():
                return option
        raise ConfigError(f"config key '{key}' must be one of: {', '.join(map(str, options))}; got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        # YAML 1.1 reads "1e-4" as a string, so floats are parsed here, not by YAML.
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}' expects a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(f"config key '{key}' has an unsupported type {tp!r}")


# --------------------------------------------------------------- checks

def check_field(key: str, f: dataclasses.Field, tp, value) -> None:
    """Refuse a value outside the field's range (every element of a list), or a list too short."""
    values = value if is_list(tp) else [value]
    if is_list(tp) and len(values) < f.metadata.get("min_items", 0):
        need = f.metadata["min_items"]
        raise ConfigError(f"config key '{key}' needs at least {need} item{'s' if need > 1 else ''}, got {value!r}")
    b = bounds(f)
    for v in values:
        if (("ge" in b and v < b["ge"]) or ("gt" in b and v <= b["gt"]) or
                ("le" in b and v > b["le"]) or ("lt" in b and v >= b["lt"])):
            raise ConfigError(f"config key '{key}' must be {range_text(f)}, got {value!r}")


def check_section(name: str, section) -> None:
    types = field_types(type(section))
    for f in dataclasses.fields(section):
        check_field(f"{name}.{f.name}", f, types[f.name], getattr(section, f.name))
