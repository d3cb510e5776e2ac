"""Strict typing for config dataclasses: ``ConfigError`` and the ``Section`` base class.

Every config section is a frozen, kw-only dataclass that derives from :class:`Section`. Its
``__post_init__`` coerces each field to its annotation (lists -> tuples, ints -> floats, dicts ->
nested sections), rejects wrong types, then runs the section's own ``check``. Errors are
:class:`ConfigError` values whose message names the key path (``allocation.candidate_bits[2]``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING
from typing import Any, ClassVar, Literal

from hawq import validation
from hawq.validation import InvalidValue


class ConfigError(ValueError):
    """A bad config value: names the key path, the file (when known) and the fix."""

    def __init__(self, path: str, message: str, *, file: str | None = None) -> None:
        self.path = path
        self.message = message
        self.file = file
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.path}: " if self.path else ""
        src = f"{self.file}: " if self.file else ""
        return f"{src}{where}{self.message}"

    def __str__(self) -> str:
        return self._render()

    def __reduce__(self):
        return (_rebuild_error, (self.path, self.message, self.file))

    def under(self, prefix: str) -> ConfigError:
        """The same error one level down: ``prefix`` + this path."""
        if not self.path:
            path = prefix
        elif not prefix or self.path.startswith("["):
            path = prefix + self.path
        else:
            path = f"{prefix}.{self.path}"
        return ConfigError(path, self.message, file=self.file)

    def in_file(self, file: str | None) -> ConfigError:
        """The same error, attributed to ``file``."""
        return ConfigError(self.path, self.message, file=file)


def _rebuild_error(path: str, message: str, file: str | None) -> ConfigError:
    return ConfigError(path, message, file=file)


def join_path(prefix: str, key: str) -> str:
    """``a`` + ``b`` -> ``a.b``; keys that are not identifiers are bracketed: ``a['x.y']``."""
    if key.startswith("["):
        return prefix + key
    if not key.replace("_", "a").isalnum():
        return f"{prefix}[{key!r}]"
    return f"{prefix}.{key}" if prefix else key


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin in (dict, Mapping):
        return f"a mapping of str to {_describe(typing.get_args(tp)[1])}"
    if isinstance(tp, type) and issubclass(tp, Section):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Return ``value`` converted to annotation ``tp`` or raise ``ConfigError`` at ``path``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return _plain(value, path)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"null is not allowed; expected {_describe(tp)}")
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(value, a, path)
            except ConfigError as exc:
                errors.append(exc)
        scalar = len(inner) == 1 and inner[0] in (bool, int, float, str)
        raise errors[0] if len(inner) == 1 and not scalar else _bad_type(value, tp, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        valid = ", ".join(repr(c) for c in choices)
        raise ConfigError(path, f"{value!r} is not a valid choice; valid choices: {valid}")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise _bad_type(value, tp, path)
        (item,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return tuple(coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _bad_type(value, tp, path)
        _, val_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(path, f"key {k!r} must be a string")
            out[k] = coerce(v, val_tp, join_path(path, k))
        return out
    if isinstance(tp, type) and issubclass(tp, Section):
        if isinstance(value, tp):
            return value
        if value is None:  # an empty YAML section ("backend:") means all defaults
            value = {}
        if not isinstance(value, Mapping):
            raise _bad_type(value, tp, path)
        return tp.from_dict(value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad_type(value, tp, path)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad_type(value, tp, path)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(path, f"{value!r} is not a finite number")
            return float(value)
        raise _bad_type(value, tp, path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad_type(value, tp, path)
    raise TypeError(f"{path}: unsupported annotation {tp!r}")  # a schema bug, not user input


def _bad_type(value: Any, tp: Any, path: str) -> ConfigError:
    return ConfigError(path, f"expected {_describe(tp)}, got {_type_name(value)} {value!r}")


def _plain(value: Any, path: str) -> Any:
    """Free-form values (model kwargs) must still be YAML scalars, lists or mappings."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, join_path(path, str(k))) for k, v in value.items()}
    raise ConfigError(path, f"{_type_name(value)} is not a YAML scalar, list or mapping")


class Section:
    """Base of every config dataclass: typed coercion, then :meth:`check`, in ``__post_init__``."""

    _hints: ClassVar[dict[type, dict[str, Any]]] = {}

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        """Field name -> resolved annotation, in declaration order."""
        if cls not in Section._hints:
            hints = typing.get_type_hints(cls)
            Section._hints[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
        return Section._hints[cls]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "") -> Section:
        """Build from a mapping; unknown keys fail and list the valid ones."""
        valid = cls.field_types()
        for key in data:
            if key not in valid:
                raise ConfigError(
                    join_path(path, str(key)),
                    f"unknown key; valid keys{' under ' + path if path else ''}: "
                    + ", ".join(valid),
                )
        for f in dataclasses.fields(cls):
            required = f.default is MISSING and f.default_factory is MISSING
            if required and f.name not in data:
                raise ConfigError(
                    join_path(path, f.name), "required key is missing; add it to the config"
                )
        try:
            return cls(**data)
        except ConfigError as exc:
            raise exc.under(path) from None

    def __post_init__(self) -> None:
        for name, tp in self.field_types().items():
            object.__setattr__(self, name, coerce(getattr(self, name), tp, name))
        self.check()

    def check(self) -> None:
        """Section-specific validation; raise :func:`fail` errors with paths relative to it."""

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready dict (tuples -> lists); ``from_dict`` of it gives an equal value."""
        return {name: _to_plain(getattr(self, name)) for name in self.field_types()}


def _to_plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def fail(path: str, message: str) -> typing.NoReturn:
    """Raise a :class:`ConfigError` at ``path`` (relative to the section being checked)."""
    raise ConfigError(path, message)


def _as_config_error(check: Callable[..., Any], path: str, value: Any, **bounds: Any) -> None:
    """Run a ``hawq.validation`` check with the key path as its name; raise ``ConfigError``."""
    try:
        check(path, value, **bounds)
    except InvalidValue as exc:
        raise ConfigError(path, exc.problem) from None


def check_bits(path: str, bits: int) -> None:
    """Bit widths are 2..8, or 32 for a layer kept in floating point."""
    _as_config_error(validation.check_bits, path, bits)


def check_number(path: str, value: float | None, **bounds: Any) -> None:
    """``value`` (when set) lies within ``bounds`` (``hawq.validation.check_number``)."""
    if value is not None:
        _as_config_error(validation.check_number, path, value, **bounds)


def check_positive(path: str, value: float | None, *, allow_zero: bool = False) -> None:
    """``value`` (when set) must be > 0, or >= 0 with ``allow_zero``."""
    check_number(path, value, low=0, low_open=not allow_zero)


def check_seed(path: str, seed: int) -> None:
    """Seeds are integers in 0 .. 2**63 - 1."""
    _as_config_error(validation.check_seed, path, seed)
