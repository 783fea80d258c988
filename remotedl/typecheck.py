"""Checking JSON values against type hints: the checker behind ``schema``'s records and requests.

Standard library only (it ships inside the agent). A record class (a dataclass) is checked
field by field, by a plan made once per shape of record (its keys and the types of their
values): a listing of thousands of records holds a handful of shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_type_hints


class SchemaError(ValueError):
    """Data from the other side does not have the promised shape."""


def plain(value: Any) -> Any:
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _what(cls: type) -> str:
    return str(getattr(cls, "WHAT", "job record"))


Check = Callable[[Any, str], Any]
_FIELDS: dict[type, list[tuple[str, bool, Check, str]]] = {}
_CHECKS: dict[Any, Check] = {}


_DEFAULTS: dict[type, list[tuple[str, Any]]] = {}


def _defaults(cls: type) -> list[tuple[str, Any]]:
    """(name, default) per field of a record class, in order (None for a required field, which
    ``check_dict`` never lets be missing); made once."""
    if cls not in _DEFAULTS:
        _DEFAULTS[cls] = [
            (f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else
             None if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls)
        ]  # fmt: skip
    return _DEFAULTS[cls]


def field_checks(cls: type) -> list[tuple[str, bool, Check, str]]:
    """(name, required, checker, where) per field of a record class, made once: a listing of
    thousands of records checks each one's fields without looking at type hints again."""
    if cls not in _FIELDS:
        hints = get_type_hints(cls)
        _FIELDS[cls] = [
            (
                f.name,
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                checker(hints[f.name]),
                f"{_what(cls)} field '{f.name}'",
            )
            for f in dataclasses.fields(cls)
        ]
    return _FIELDS[cls]


@dataclass(frozen=True)
class _ShapePlan:
    """What checking a record of one shape (its keys and the types of their values) takes.
    A listing of thousands of records holds a handful of shapes: most fields are decided by
    their value's type alone (a ``str | None`` holding a str), which the shape already says;
    only the others are looked at per record."""

    unknown: tuple[str, ...]  # keys that are no field (a newer agent's): ignored
    fresh: tuple[tuple[str, Callable[[], Any]], ...]  # fields missing whose default is a list
    # or an object: what makes a new one
    checks: tuple[tuple[str, Check, str], ...]  # values whose type alone does not decide
    nonempty: tuple[tuple[str, Check, str], ...]  # lists and objects: checked when not empty


_ANY = None  # ``_as_is``: every type is taken as it is
_PLANS: dict[tuple[type, tuple[str, ...], tuple[type, ...]], _ShapePlan] = {}
_AS_IS: dict[type, list[tuple[frozenset[type] | None, frozenset[type]]]] = {}
_TEMPLATES: dict[type, dict[str, Any]] = {}


def _as_is(hint: Any) -> tuple[frozenset[type] | None, frozenset[type]]:
    """(the types whose values ``checker(hint)`` passes unchanged whatever they hold, or None
    for every type; the container types it passes unchanged when empty)."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is Any:
        return _ANY, frozenset()
    if origin in (typing.Union, types.UnionType):
        kept: set[type] = set()
        empty: set[type] = set()
        for arg in typing.get_args(hint):
            as_is, if_empty = _as_is(arg)
            if as_is is _ANY:
                return _ANY, frozenset()
            kept |= as_is
            empty |= if_empty
        return frozenset(kept), frozenset(empty)
    if origin is Literal:
        return frozenset(), frozenset()
    if origin is list:
        args = typing.get_args(hint)
        if not args or args[0] is Any:
            return frozenset({list}), frozenset()
        return frozenset(), frozenset({list})
    if origin is dict:
        return frozenset(), frozenset({dict})
    if hint in (str, int, float, bool, type(None)):
        return frozenset({hint}), frozenset()
    return frozenset(), frozenset()


def template(cls: type) -> dict[str, Any]:
    """Every field of a record class by its default, in order (a required field's None is
    always overwritten: a record without one is refused)."""
    if cls not in _TEMPLATES:
        _TEMPLATES[cls] = dict(_defaults(cls))
    return _TEMPLATES[cls]


def shape_plan(cls: type, data: dict[str, Any]) -> _ShapePlan:
    """The plan for ``data``'s shape, made once per shape (raises for a missing field)."""
    key = (cls, tuple(data), tuple(map(type, data.values())))
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    if cls not in _AS_IS:
        _AS_IS[cls] = [_as_is(hint) for hint in _hints(cls)]
    types_of = dict(zip(key[1], key[2], strict=True))
    fresh: list[tuple[str, Callable[[], Any]]] = []
    checks: list[tuple[str, Check, str]] = []
    nonempty: list[tuple[str, Check, str]] = []
    for (name, required, check, where), (as_is, if_empty), (_, default) in zip(
        field_checks(cls), _AS_IS[cls], _defaults(cls), strict=True
    ):
        if name not in types_of:
            if required:
                raise SchemaError(f"{_what(cls)} without '{name}'")
            if isinstance(default, (list, dict)):
                fresh.append((name, type(default) if not default else functools.partial(plain, default)))
        elif as_is is _ANY or types_of[name] in as_is:
            continue
        elif types_of[name] in if_empty:
            nonempty.append((name, check, where))
        else:  # converted (an int where a float goes) or refused: by the field's checker
            checks.append((name, check, where))
    names = {name for name, _, _, _ in field_checks(cls)}
    plan = _ShapePlan(
        tuple(k for k in key[1] if k not in names), tuple(fresh), tuple(checks), tuple(nonempty)
    )
    if len(_PLANS) >= 1024:  # a hostile answer of ever new shapes: the memory stays bounded
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def run_checks(plan: _ShapePlan, data: dict[str, Any], out: dict[str, Any]) -> None:
    """The per-record part of a plan: the checkers of the fields whose type did not decide,
    their results into ``out``."""
    for name, check, where in plan.checks:
        out[name] = check(data[name], where)
    for name, check, where in plan.nonempty:
        value = data[name]
        if value:
            out[name] = check(value, where)


def _hints(cls: type) -> list[Any]:
    """The type hint of each field of a record class, in order."""
    hints = get_type_hints(cls)
    return [hints[f.name] for f in dataclasses.fields(cls)]


def check_type(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it matches the type ``hint`` (the few shapes the schema uses), else raise."""
    return checker(hint)(value, where)


def checker(hint: Any) -> Check:
    """A function that checks a value against ``hint`` (made once per hint)."""
    try:
        return _CHECKS[hint]
    except KeyError:
        pass
    except TypeError:  # an unhashable hint: made afresh
        return _make_checker(hint)
    _CHECKS[hint] = made = _make_checker(hint)
    return made


def _make_checker(hint: Any) -> Check:
    import types
    import typing

    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [checker(a) for a in args if a is not type(None)]
        optional = type(None) in args

        def union(value: Any, where: str) -> Any:
            if value is None and optional:
                return None
            for option in options:
                try:
                    return option(value, where)
                except SchemaError:
                    continue
            raise SchemaError(f"{where}: unexpected {type(value).__name__}")

        return union
    if origin is Literal:

        def literal(value: Any, where: str) -> Any:
            if value in args:
                return value
            raise SchemaError(f"{where}: {str(value)[:40]!r} is not one of {', '.join(map(str, args))}")

        return literal
    if hint is type(None):

        def none(value: Any, where: str) -> Any:
            if value is None:
                return None
            raise SchemaError(f"{where}: expected nothing")

        return none
    if origin is list:
        item = checker(args[0]) if args else None

        def listed(value: Any, where: str) -> Any:
            if not isinstance(value, list):
                raise SchemaError(f"{where}: expected a list")
            return [item(v, where) for v in value] if item is not None else value

        return listed
    if origin is dict:

        def mapping(value: Any, where: str) -> Any:
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise SchemaError(f"{where}: expected an object")
            return value

        return mapping
    if hint is Any:
        return lambda value, where: value
    if hint is float:

        def number(value: Any, where: str) -> Any:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            raise SchemaError(f"{where}: expected a number")

        return number
    if hint is int:

        def integer(value: Any, where: str) -> Any:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise SchemaError(f"{where}: expected an integer")

        return integer

    def other(value: Any, where: str) -> Any:
        if isinstance(hint, type) and isinstance(value, hint):
            return value
        raise SchemaError(f"{where}: expected {getattr(hint, '__name__', hint)}")

    return other
