"""YAML configs into frozen dataclasses, with `key.sub=value` command-line overrides.

Unknown keys are errors that name the key and the file; override values are parsed as YAML scalars
(`lr=1e-4`, `mesh.data=2`, `name=foo`) and checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML reads it, except that `1e-4` is a float (YAML 1.2), not the string YAML 1.1 makes it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Reads `path` (YAML) into `cls`, applying `overrides` ("a.b=value") on top."""
    raw, source = read_config(path, overrides)
    return from_dict(cls, raw, source)


def read_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
    """The YAML mapping in `path` with `overrides` applied, and the name to give in errors (the file's)."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise FileNotFoundError(f"config file does not exist: {path}")
        try:
            raw = yaml.load(path.read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        try:
            parsed = yaml.load(value, Loader=_Loader) if value else ""
        except yaml.YAMLError:
            raise ValueError(f"override {item!r}: {value!r} is not a valid YAML value") from None
        _set_dotted(raw, key.strip().split("."), parsed)
    return raw, source


def from_dict(cls: type[T], raw: dict[str, Any], source: str, prefix: str = "", base: T | None = None) -> T:
    """Builds dataclass `cls` from a nested dict; unknown or mistyped keys raise ValueError naming them.

    A key left out keeps `base`'s value (default: the class default), and a mapping given for a field whose
    default is a config of its own overrides that default's fields one by one: `sampling: {max_new_tokens: 32}`
    keeps the rest of the field's default sampling settings, not those of a bare `SamplingConfig()`.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(raw) - set(fields)))
    if unknown:
        raise ValueError(f"{source}: unknown key {prefix + unknown[0]!r} (known: {', '.join(sorted(fields))})")
    kwargs = {} if base is None else {name: getattr(base, name) for name in fields}
    for name, value in raw.items():
        default = kwargs.get(name, fields[name].default)
        kwargs[name] = _coerce(hints[name], value, source, prefix + name,
                               default if dataclasses.is_dataclass(default) else None)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _coerce(hint, value, source: str, key: str, default=None):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, source, key, default if isinstance(default, option) else None)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {key} must be a mapping, got {value!r}")
        return from_dict(hint, value, source, key + ".", default if isinstance(default, hint) else None)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return tuple(_coerce(item, v, source, key) for v in value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
    if hint in (int, float, str) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
    return value


def _set_dotted(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        node = tree.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {'.'.join(keys)}: {k} is not a mapping")
        tree = node
    tree[keys[-1]] = value
