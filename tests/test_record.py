"""pinwarden.record against the real thing: every behaviour pinwarden relies on is checked
side by side with the standard library's ``@dataclass(frozen=True, slots=True)`` on the
same class body, and the speed it exists for is checked against it too."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import subprocess
import sys
import weakref
from typing import ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pinwarden.record import FrozenInstanceError, field, fields, record, replace


def _factory() -> tuple[int, ...]:
    return (7,)


# The same class body twice: made by dataclasses and by record.
class _Body:
    KIND: ClassVar[str] = "body"
    a: int
    b: str = "x"
    c: tuple[int, ...] = ()
    d: tuple[int, ...] = field(default_factory=_factory)

    def total(self) -> int:
        return self.a + sum(self.c)


def _twins() -> tuple[type, type]:
    ns = {k: v for k, v in vars(_Body).items() if k not in ("__dict__", "__weakref__")}
    ns_dc = dict(ns, d=dataclasses.field(default_factory=_factory))
    ns_dc["__annotations__"] = dict(_Body.__annotations__)
    dc = dataclasses.dataclass(frozen=True, slots=True)(type("Twin", (), ns_dc))
    ns_rec = dict(ns)
    ns_rec["__annotations__"] = dict(_Body.__annotations__)
    rec = record(type("Twin", (), ns_rec))
    return dc, rec


DC, REC = _twins()
values = st.tuples(st.integers(-5, 5), st.text(max_size=3),
                   st.lists(st.integers(0, 3), max_size=3).map(tuple))


@given(values, values)
def test_init_eq_hash_repr_match_the_dataclass(x: tuple, y: tuple) -> None:
    d1, d2, r1, r2 = DC(*x), DC(*y), REC(*x), REC(*y)
    assert (r1 == r2) == (d1 == d2)
    assert (r1 != r2) == (d1 != d2)
    assert hash(r1) == hash(d1)  # both hash the tuple of fields
    assert repr(r1) == repr(d1)
    assert REC(a=x[0], b=x[1], c=x[2]) == r1
    assert r1.total() == d1.total()
    assert r1 != d1 and d1 != r1  # a different class is never equal, as with dataclasses


def test_defaults_factories_and_class_attributes_match() -> None:
    assert repr(REC(1)) == repr(DC(1))
    assert REC(1).d == DC(1).d == (7,)
    assert REC.KIND == DC.KIND == "body"
    assert fields(REC) == tuple(f.name for f in dataclasses.fields(DC)) == ("a", "b", "c", "d")
    assert REC.__match_args__ == DC.__match_args__
    assert REC.__slots__ == DC.__slots__
    match REC(3, "y"):
        case REC(a, b):  # type: ignore[misc]
            assert (a, b) == (3, "y")
    with pytest.raises(TypeError):
        REC()
    with pytest.raises(TypeError):
        DC()


def test_frozen_like_the_dataclass() -> None:
    r, d = REC(1), DC(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.a = 2  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        r.a = 2
    with pytest.raises(AttributeError):  # both are AttributeErrors
        del r.a
    with pytest.raises(AttributeError):  # slots: no stray attributes either
        object.__setattr__(r, "other", 1)


def test_replace_copy_and_pickle() -> None:
    r = REC(1, "z", (2,))
    assert replace(r, a=5) == REC(5, "z", (2,))
    assert dataclasses.replace(DC(1, "z", (2,)), a=5) == DC(5, "z", (2,))
    with pytest.raises(TypeError, match="no field 'e'"):
        replace(r, e=1)
    assert copy.copy(r) == r and copy.deepcopy(r) == r
    p = Point(1, "two")
    assert pickle.loads(pickle.dumps(p)) == p


@record
class Point:  # pickle finds classes by module and name
    x: int
    label: str


def test_post_init_runs_on_init_and_replace() -> None:
    @record
    class Checked:
        n: int

        def __post_init__(self) -> None:
            if self.n < 0:
                raise ValueError("negative")

    assert Checked(1).n == 1
    with pytest.raises(ValueError):
        Checked(-1)
    with pytest.raises(ValueError):
        replace(Checked(1), n=-1)


def test_own_methods_kept_and_hash_follows_the_dataclass_rule() -> None:
    @record
    class Own:
        n: int

        def __repr__(self) -> str:
            return f"<{self.n}>"

    @record
    class OwnEq:
        n: int

        def __eq__(self, other: object) -> bool:
            return isinstance(other, OwnEq) and abs(self.n) == abs(other.n)

    assert repr(Own(2)) == "<2>"
    assert OwnEq(2) == OwnEq(-2)
    assert hash(OwnEq(2)) == hash((2,))  # the field hash, as dataclasses(frozen, eq) gives


def test_mutable_records_and_weakrefs() -> None:
    @record(frozen=False)
    class Node:
        tasks: set[int] = field(default_factory=set)

    n, m = Node(), Node()
    n.tasks.add(1)
    assert m.tasks == set() and n != m
    n.tasks = {2}
    assert n == Node({2})
    with pytest.raises(TypeError):
        hash(n)

    @record(weakref=True)
    class Weak:
        n: int

    w = Weak(1)
    assert weakref.ref(w)() is w
    with pytest.raises(TypeError):
        weakref.ref(REC(1))  # without the flag, slots leave no room for it (as dataclasses)


def test_names_the_generated_methods_use_are_refused() -> None:
    with pytest.raises(TypeError, match="reserved"):
        @record
        class Bad:
            self: int


def test_mutable_defaults_are_refused_like_dataclasses() -> None:
    with pytest.raises(ValueError, match="default_factory"):
        @record
        class Bad:
            items: list[int] = []  # noqa: RUF012
    with pytest.raises(ValueError):
        @dataclasses.dataclass(frozen=True)
        class BadDc:
            items: list[int] = []  # noqa: RUF008


_DEFINE = """
import time
{imp}
t = time.perf_counter()
for i in range(40):
    @{deco}
    class C:
        a: int
        b: str
        c: tuple = ()
        d: int = 0
print(time.perf_counter() - t)
"""


def _define_time(imp: str, deco: str) -> float:
    code = _DEFINE.format(imp=imp, deco=deco)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return float(done.stdout)


def test_defining_records_costs_well_under_dataclasses() -> None:
    """What the module is for: defining classes (a command's fixed cost, paid by every
    process) takes under half of ``dataclasses``' time, measured side by side in fresh
    processes, interleaved, best of seven. (Imports are left out of the timing: without
    bytecode on disk they measure the compiler; ``make bench-cli`` times whole commands.)"""
    rec, dc = [], []
    for _ in range(7):
        rec.append(_define_time("from pinwarden.record import record", "record"))
        dc.append(_define_time("from dataclasses import dataclass",
                               "dataclass(frozen=True, slots=True)"))
    assert min(rec) < min(dc) / 2, (min(rec), min(dc))
