"""Value classes that are cheap to define: pinwarden's stand-in for ``dataclasses``.

Every pinwarden command and every libvirt hook call is a fresh process, and its start is
in the path of a VM start (issue #12 sets ``status`` at ≤ 2.5× and ``plan`` at ≤ 3× a bare
Python). On the Python 3.11 most hosts run, ``@dataclass(frozen=True, slots=True)``
compiles six functions per class, one ``exec`` each, and ``import dataclasses`` brings in
``inspect`` (with ``ast``, ``dis`` and ``tokenize``): together about a third of what a
command's imports cost, before it reads anything. :func:`record` makes the same kind of
class with one ``exec`` a class and nothing beyond the standard library's core.

It covers only what pinwarden uses, with the semantics of ``dataclasses``:

* fields are the class's annotations in order (``ClassVar`` ones excepted), with
  defaults, :func:`field` (``default`` / ``default_factory``) and ``__post_init__``;
* ``__init__`` (positional or keyword), ``__repr__``, ``__eq__`` (same class, fields
  compared as a tuple), ``__match_args__`` and ``__slots__``; a method the class defines
  itself is kept;
* ``frozen`` (the default): assignment raises :class:`FrozenInstanceError` (an
  ``AttributeError``), ``__hash__`` hashes the fields, and ``copy`` / ``pickle`` work;
  ``frozen=False`` gives a mutable, unhashable class;
* :func:`replace` and :func:`fields`; ``weakref=True`` adds a ``__weakref__`` slot.

``tests/test_record.py`` checks all of this against ``dataclasses`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform, overload

__all__ = ["FrozenInstanceError", "field", "fields", "record", "replace"]

T = TypeVar("T")
_MISSING: Any = type("_Missing", (), {"__repr__": lambda self: "MISSING"})()


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a frozen record."""


class _Field:
    __slots__ = ("default", "factory")

    def __init__(self, default: Any, factory: Any) -> None:
        self.default = default
        self.factory = factory


def field(*, default: Any = _MISSING, default_factory: Callable[[], Any] = _MISSING) -> Any:
    """A field's default given as a value (``default``) or as a callable called for each
    instance (``default_factory``), as in ``dataclasses.field``."""
    if default is not _MISSING and default_factory is not _MISSING:
        raise ValueError("cannot specify both default and default_factory")
    return _Field(default, default_factory)


def _is_classvar(annotation: object) -> bool:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return isinstance(text, str) and text.split("[", 1)[0].strip() in (
        "ClassVar", "typing.ClassVar")


def _frozen_setattr(self: object, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def _reduce(self: Any) -> tuple[Any, ...]:
    return (_rebuild, (self.__class__, tuple(getattr(self, n) for n in self.__match_args__)))


def _rebuild(cls: type[T], values: tuple[Any, ...]) -> T:
    obj = cls.__new__(cls)
    for name, value in zip(cls.__match_args__, values, strict=True):  # type: ignore[attr-defined]
        object.__setattr__(obj, name, value)
    return obj


def _build(cls: type[T], frozen: bool, weakref: bool) -> type[T]:
    own = cls.__dict__
    names = tuple(n for n, t in own.get("__annotations__", {}).items()
                  if not _is_classvar(t))
    env: dict[str, Any] = {"_MISSING": _MISSING, "_set": object.__setattr__}
    params: list[str] = []
    body: list[str] = []
    seen_default = False
    for name in names:
        if name in ("self", "_set", "_MISSING") or name.startswith(("_f_", "_d_")):
            raise TypeError(f"field name {name!r} is reserved by pinwarden.record")
        given = own.get(name, _MISSING)
        if isinstance(given, _Field):
            given = given.default if given.factory is _MISSING else given
        if given is _MISSING:
            if seen_default:
                raise TypeError(f"non-default argument {name!r} follows default argument")
            params.append(name)
        elif isinstance(given, _Field):
            seen_default = True
            env[f"_f_{name}"] = given.factory
            params.append(f"{name}=_MISSING")
            body.append(f" if {name} is _MISSING: {name} = _f_{name}()")
        else:
            if isinstance(given, (list, dict, set)):
                raise ValueError(f"mutable default {type(given).__name__} for field {name!r}"
                                 f" is not allowed: use default_factory")
            seen_default = True
            env[f"_d_{name}"] = given
            params.append(f"{name}=_d_{name}")
    store = "_set(self, {0!r}, {0})" if frozen else "self.{0} = {0}"
    body += [" " + store.format(name) for name in names]
    if hasattr(cls, "__post_init__"):
        body.append(" self.__post_init__()")
    fields_of = "".join(f"self.{n}," for n in names)
    others = "".join(f"other.{n}," for n in names)
    shown = ", ".join(f"{n}={{self.{n}!r}}" for n in names)
    source = (f"def __init__(self, {', '.join(params)}) -> None:\n"
              + ("\n".join(body) or " pass") + "\n"
              f"def __repr__(self):\n return f'{{self.__class__.__qualname__}}({shown})'\n"
              "def __eq__(self, other):\n"
              f" if other.__class__ is self.__class__:\n  return ({fields_of}) == ({others})\n"
              " return NotImplemented\n"
              f"def __hash__(self):\n return hash(({fields_of}))\n")
    exec(source, env)  # one compile for the whole class
    made: dict[str, Any] = {k: v for k, v in own.items()
                            if k not in names and k not in ("__dict__", "__weakref__")}
    made["__slots__"] = names + (("__weakref__",) if weakref else ())
    made["__match_args__"] = names
    for method in ("__init__", "__repr__", "__eq__"):
        if method not in own:
            env[method].__qualname__ = f"{cls.__qualname__}.{method}"
            made[method] = env[method]
    if frozen:
        made["__setattr__"] = _frozen_setattr
        made["__delattr__"] = _frozen_delattr
        made["__reduce__"] = _reduce
        if "__hash__" not in own or own["__hash__"] is None:
            made["__hash__"] = env["__hash__"]
    elif "__eq__" not in own:
        made["__hash__"] = None
    built: type[T] = type(cls.__name__, cls.__bases__, made)
    return built


@overload
def record(cls: type[T], /) -> type[T]: ...


@overload
def record(*, frozen: bool = True, weakref: bool = False) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: type[T] | None = None, /, *, frozen: bool = True,
           weakref: bool = False) -> type[T] | Callable[[type[T]], type[T]]:
    """Make ``cls`` a value class: ``@record`` (frozen, the usual case) or
    ``@record(frozen=False)`` / ``@record(weakref=True)``."""
    if cls is None:
        return lambda c: _build(c, frozen, weakref)
    return _build(cls, frozen, weakref)


def fields(obj: object) -> tuple[str, ...]:
    """The field names of a record class or instance, in order."""
    names: tuple[str, ...] = obj.__match_args__  # type: ignore[attr-defined]
    return names


def replace(obj: T, /, **changes: Any) -> T:
    """A copy of ``obj`` with ``changes``, built through ``__init__`` (so
    ``__post_init__`` checks it again), as ``dataclasses.replace``."""
    names = fields(obj)
    unknown = set(changes).difference(names)
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no field {sorted(unknown)[0]!r}")
    values = {n: changes[n] if n in changes else getattr(obj, n) for n in names}
    return type(obj)(**values)
