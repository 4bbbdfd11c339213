"""Typed dataclass configs from YAML, validated on load.

``load_config(path, Cls)`` turns a YAML mapping into a (nested) dataclass and
rejects unknown keys, wrong types and out-of-range values with a one-line
:class:`ConfigError` naming the file and the dotted key. Dataclasses may define
``validate(self, key)`` for cross-field checks; it is called after the fields
are set, with the dotted prefix of the section for error messages.

Supported field types: bool, int, float, str, Optional[...], Literal[...],
list[...], dict[str, ...] and nested dataclasses. A YAML key may differ from
the Python field name through ``field(metadata={"key": "lambda"})``.

Range checks are declared on the field, ``epochs: Annotated[int, Gt(0)]``, with the
bound types of ``annotated_types`` (what pydantic's ``Field(gt=...)`` builds on):
``Gt``, ``Ge``, ``Lt``, ``Le`` and ``Interval``; a null value is not checked.
``validate`` keeps the checks that are not one bound on one field.
"""

from __future__ import annotations

import dataclasses
import operator
import types
from pathlib import Path
from typing import (
    Annotated,
    Any,
    Literal,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml
from annotated_types import Ge, Gt, Interval, Le, Lt

from raycompat.errors import ConfigError

T = TypeVar("T")


def yaml_key(f: dataclasses.Field) -> str:
    """The YAML key of a dataclass field (``metadata['key']`` or the field name)."""
    return f.metadata.get("key", f.name)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, validating every key (see module doc)."""
    where = prefix or "<top level>"
    if data is None:
        # A section written with no keys (``eval:``) takes its defaults; an empty file is
        # refused earlier, by read_yaml.
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {yaml_key(f): f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        dotted = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        raise ConfigError(f"unknown config key {dotted} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for ykey, f in fields.items():
        if ykey in data:
            kwargs[f.name] = _convert(data[ykey], hints[f.name], f"{prefix}.{ykey}" if prefix else ykey)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing config key {prefix + '.' if prefix else ''}{ykey}")
    obj = cls(**kwargs)
    validate_tree(obj, prefix)
    return obj


def _bounds(tp: Any) -> list[Any]:
    """The bounds an ``Annotated[...]`` field type declares (none for other types)."""
    if get_origin(tp) is not Annotated:
        return []
    return [m for m in tp.__metadata__ if isinstance(m, (Gt, Ge, Lt, Le, Interval))]


_COMPARE = {Gt: ("gt", operator.gt), Ge: ("ge", operator.ge), Lt: ("lt", operator.lt), Le: ("le", operator.le)}


def _within(value: Any, bound: Any) -> bool:
    if isinstance(bound, Interval):
        return all(_within(value, b) for b in bound)
    name, compare = _COMPARE[type(bound)]
    return compare(value, getattr(bound, name))


def _describe(bound: Any) -> str:
    """The error text of a bound, in the words the hand-written checks used ("must be positive")."""
    if isinstance(bound, Interval):
        low, high = (f"({bound.gt:g}" if bound.gt is not None else f"[{bound.ge:g}",
                     f"{bound.lt:g})" if bound.lt is not None else f"{bound.le:g}]")
        return f"must be in {low}, {high}"
    if isinstance(bound, Gt):
        return "must be positive" if bound.gt == 0 else f"must be > {bound.gt:g}"
    symbol = {Ge: ">=", Lt: "<", Le: "<="}[type(bound)]
    return f"must be {symbol} {getattr(bound, _COMPARE[type(bound)][0]):g}"


def check_bounds(obj: Any, prefix: str = "") -> None:
    """Raise ConfigError ``key: must be ..., got value`` for the first field of dataclass ``obj``
    outside its declared bounds (this level only: nested sections check themselves on build)."""
    hints = get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not f.init or value is None:
            continue
        for bound in _bounds(hints[f.name]):
            if not _within(value, bound):
                raise ConfigError(f"{join(prefix, yaml_key(f))}: {_describe(bound)}, got {value}")


def validate_tree(obj: Any, prefix: str = "") -> None:
    """Check ``obj``'s field bounds, then call its ``validate(key)`` (its nested sections
    validate themselves on build)."""
    if dataclasses.is_dataclass(obj):
        check_bounds(obj, prefix)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(prefix)


def to_dict(obj: Any) -> Any:
    """The YAML-ready mapping of a config dataclass (inverse of :func:`from_dict`)."""
    if dataclasses.is_dataclass(obj):
        return {yaml_key(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning a missing or empty file or a syntax error into a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        # An empty file is almost always a mistake (a wrong path, an unsaved editor buffer):
        # taken as "all defaults" it would start a full-size run into the default output_dir.
        raise ConfigError(f"{path}: the file is empty (or only comments); an all-defaults config must say so, e.g. {{}}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path, cls: type[T], overrides: dict | None = None) -> T:
    """Load YAML file ``path`` into dataclass ``cls``; errors name the file and key."""
    data = read_yaml(path)
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` merged in, recursing into nested mappings."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def dump_config(obj: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML that :func:`load_config` reads back unchanged."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError ``key: msg`` unless ``cond``; for ``validate`` methods."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_dir_name(name: str, key: str) -> None:
    """Raise ConfigError unless ``name`` is a plain directory name (not empty, no ``/``, not ``.`` or ``..``)."""
    check(bool(name) and "/" not in name and name not in (".", ".."), key, f"must be a plain directory name, got {name!r}")


def join(prefix: str, key: str) -> str:
    """Dotted key ``prefix.key`` (just ``key`` at the top level)."""
    return f"{prefix}.{key}" if prefix else key


__all__ = [
    "load_config", "from_dict", "to_dict", "dump_config", "read_yaml", "deep_merge", "check", "check_dir_name", "join",
    "validate_tree", "check_bounds", "yaml_key",
]
