"""Settings: one TOML file, then environment variables, then command-line flags; later sources win.

Each layer's settings are a frozen dataclass whose fields are documented where it is
declared (`flywheel.proxy.config`, `flywheel.learner.config`, `flywheel.up`). Section
`[learner]` of the TOML file fills `LearnerConfig`; a field that is itself a dataclass is a
sub-table (`[learner.loss]` fills `LearnerConfig.loss`), and a tuple of dataclasses an array of
tables (`[[proxy.keys]]`, TOML only). The environment variable of a field
is its path in capitals: `FLYWHEEL_LEARNER_LOSS_EPSILON`, `FLYWHEEL_PROXY_PORT`. Flags set
top-level fields only.

Every value is checked against its field's type when it is loaded, so a typo fails at start
with the allowed values: unknown names, wrong types and modes (`Literal` fields) outside
their allowed set raise `ConfigError`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union

C = TypeVar("C")

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A setting that cannot be used: an unknown name, a wrong type or a value outside its allowed set."""


def load_config(cls: type[C], section: str, config_path: str | None, flags: Mapping[str, Any]) -> C:
    """`cls` from [section] of the TOML file (default ./flywheel.toml if present), env vars and non-None flags.

    `section` may name a sub-table by its dotted path: `flywheel export` reads `learner.credit`
    alone, since LearnerConfig imports the trainer (torch), which a plain install lacks."""
    path = Path(config_path or "flywheel.toml")
    values: Any = {}
    if config_path or path.exists():
        try:
            with path.open("rb") as f:
                values = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as bad:
            raise ConfigError(f"{path}: {bad}") from None
        for name in section.split("."):
            values = values.get(name, {}) if isinstance(values, dict) else values
    if isinstance(values, dict):
        _apply_env(cls, values, f"FLYWHEEL_{section.upper().replace('.', '_')}")
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if flags.get(field.name) is not None:
            values[field.name] = flags[field.name]
    return build(cls, values, f"{path}: [{section}]")


def _apply_env(cls: type, values: dict[str, Any], prefix: str) -> None:
    """Overlay FLYWHEEL_<SECTION>_<FIELD>[_<FIELD>...] variables onto `values` (nested tables too)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        name = f"{prefix}_{field.name.upper()}"
        if dataclasses.is_dataclass(hints[field.name]):
            table = values.setdefault(field.name, {})
            if isinstance(table, dict):
                _apply_env(hints[field.name], table, name)
        elif name in os.environ:
            values[field.name] = os.environ[name]


def build(cls: type[C], values: Mapping[str, Any], where: str) -> C:
    """`cls(**values)`, each value checked (and, from text, converted) to its field's type."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a table of settings, not {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = build(kind, value, f"{where.rstrip(']')}.{name}]")
        else:
            kwargs[name] = coerce(value, kind, f"{where} {name}")
    return cls(**kwargs)


def coerce(value: Any, kind: Any, what: str) -> Any:
    """`value` as type `kind`: TOML values as they are when they fit, text (env vars) parsed."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{what} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is Union:  # X | None: "" or "none" from the environment means None
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        return coerce(value, next(a for a in args if a is not type(None)), what)
    if origin in (collections.abc.Mapping, dict):
        return _mapping(value, args[1] if args else float, what)
    if origin is tuple:
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{what} must be a list, got {value!r}")
        if dataclasses.is_dataclass(args[0]):  # an array of tables, [[section.name]] in TOML
            return tuple(_table(item, args[0], f"{what}[{i}]") for i, item in enumerate(items))
        return tuple(coerce(item, args[0], what) for item in items)
    return _scalar(value, kind, what)


def _table(value: Any, kind: type, what: str) -> Any:
    """One table of an array of tables, built and checked as `kind` (its own checks raise ValueError)."""
    try:
        return build(kind, value, what)
    except (TypeError, ValueError) as bad:
        if isinstance(bad, ConfigError):
            raise
        raise ConfigError(f"{what}: {bad}") from None


def _scalar(value: Any, kind: type, what: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind in (int, float):  # an int where a float is asked is fine; never a bool, never a float for an int
        numbers = (int,) if kind is int else (int, float)
        if isinstance(value, numbers) and not isinstance(value, bool):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
    raise ConfigError(f"{what} must be {getattr(kind, '__name__', kind)}, got {value!r}")


def _mapping(value: Any, value_kind: type, what: str) -> dict[str, Any]:
    """A TOML table, or text "name=value,name=value" from the environment."""
    if isinstance(value, str):
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ConfigError(f"{what} must be name=value pairs separated by commas, got {value!r}")
        value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} must be a table {{name = value}}, got {value!r}")
    return {str(k): coerce(v, value_kind, f"{what}.{k}") for k, v in value.items()}
