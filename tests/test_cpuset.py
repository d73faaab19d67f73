"""CpuSet: every textual round trip as a property, each checked against an independent model
(Python ints for masks, the byte rule for systemd arrays, set semantics for libvirt lists),
and parse errors that name the offending text and position."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from pinwarden.cpuset import MAX_CPU, CpuSet, CpuSetError, plural, union

cpus = st.integers(min_value=0, max_value=MAX_CPU)
small_cpus = st.integers(min_value=0, max_value=300)
# sets of both kinds: sparse over the whole range and dense runs (long ranges)
cpu_sets = st.one_of(
    st.frozensets(cpus, max_size=40),
    st.frozensets(small_cpus, max_size=200),
    st.tuples(small_cpus, st.integers(0, 2000)).map(lambda t: frozenset(range(t[0], t[0] + t[1]))),
).map(CpuSet)
nonempty_sets = cpu_sets.filter(bool)
#: no per-example deadline: this is a shared, busy machine and speed is not what we test
relaxed = settings(deadline=None)


# -- kernel list ---------------------------------------------------------------------------


@relaxed
@given(cpu_sets)
def test_kernel_list_round_trip(s: CpuSet) -> None:
    text = s.to_list()
    assert CpuSet.parse_kernel(text) == s
    assert CpuSet.parse_kernel(text + "\n\x00") == s  # sysfs newline, NUL from dumps
    assert re.fullmatch(r"(\d+(-\d+)?(,\d+(-\d+)?)*)?", text)


@relaxed
@given(cpu_sets)
def test_kernel_list_is_canonical(s: CpuSet) -> None:
    """Maximal runs, ascending, singletons without a dash: what the kernel prints."""
    runs = s.ranges()
    assert all(a <= b for a, b in runs)
    assert all(b1 + 1 < a2 for (_, b1), (a2, _) in itertools.pairwise(runs))
    assert sum(b - a + 1 for a, b in runs) == len(s)


def test_kernel_list_examples() -> None:
    assert CpuSet.parse_kernel("0-3,8") == CpuSet.of([0, 1, 2, 3, 8])
    assert CpuSet.parse_kernel("") == CpuSet() == CpuSet.parse_kernel("\n")
    assert CpuSet.of([0, 1, 2, 5, 7, 8]).to_list() == "0-2,5,7-8"
    assert str(CpuSet.range(4, 15)) == "4-15"


# -- libvirt syntax ---------------------------------------------------------------------------

items = st.one_of(
    small_cpus.map(lambda a: (a, a)),
    st.tuples(small_cpus, st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1])),
)
spaces = st.sampled_from(["", "", " ", "  ", "\t"])


@st.composite
def libvirt_text(draw: st.DrawFn) -> tuple[str, frozenset[int]]:
    """A libvirt cpuset string with exclusions and spaces, and the set it means."""
    includes = draw(st.lists(items, min_size=1, max_size=8))
    excludes = draw(st.lists(small_cpus, max_size=5))
    tokens: list[str] = []
    for a, b in includes:
        sp1, sp2 = draw(spaces), draw(spaces)
        tokens.append(f"{a}" if a == b and draw(st.booleans()) else f"{a}{sp1}-{sp2}{b}")
    for n in excludes:
        tokens.insert(draw(st.integers(0, len(tokens))), f"^{n}")
    text = draw(spaces) + ",".join(draw(spaces) + t + draw(spaces) for t in tokens)
    if draw(st.booleans()):
        text += "," + draw(spaces)  # libvirt allows a trailing comma
    meaning: set[int] = set()
    for t in tokens:  # in order, as libvirt applies them
        if t.startswith("^"):
            meaning.discard(int(t[1:]))
        else:
            a, _, b = t.partition("-")
            meaning.update(range(int(a), int(b or a) + 1))
    return text, frozenset(meaning)


@relaxed
@given(libvirt_text())
@example(("0-3,^2,8", frozenset({0, 1, 3, 8})))
@example((" 0 - 3 , ^2 ", frozenset({0, 1, 3})))
@example(("^1,0-2", frozenset({0, 1, 2})))  # libvirt: a later range adds 1 back
@example(("0-3,^1,1", frozenset({0, 1, 2, 3})))
@example(("2-5,", frozenset({2, 3, 4, 5})))
@example(("1\r,\v2\f", frozenset({1, 2})))
def test_libvirt_syntax(case: tuple[str, frozenset[int]]) -> None:
    text, meaning = case
    if meaning:
        assert CpuSet.parse(text) == CpuSet(meaning)
    else:
        with pytest.raises(CpuSetError, match="selects no CPU"):
            CpuSet.parse(text)


@relaxed
@given(nonempty_sets)
def test_libvirt_round_trip(s: CpuSet) -> None:
    assert CpuSet.parse(s.to_list()) == s


# -- hex masks ------------------------------------------------------------------------------


def model_mask(s: CpuSet) -> int:
    return sum(1 << c for c in s)


@relaxed
@given(cpu_sets, st.integers(1, 8))
def test_mask_round_trip(s: CpuSet, min_words: int) -> None:
    text = s.to_mask(min_words)
    words = text.split(",")
    assert all(re.fullmatch(r"[0-9a-f]{8}", w) for w in words)
    assert len(words) >= min_words
    assert int("".join(words), 16) == model_mask(s)  # most significant word first
    assert CpuSet.from_mask(text) == s
    assert CpuSet.from_mask(text.upper() + "\n") == s


@relaxed
@given(cpu_sets, st.integers(0, 3))
def test_mask_parses_sysfs_cpumap_forms(s: CpuSet, pad_words: int) -> None:
    """sysfs cpumap: leading zero words (kernel NR_CPUS) and a short top word ("fffff")."""
    value = model_mask(s)
    hexa = f"{value:x}"
    chunks: list[str] = []
    while hexa:
        chunks.insert(0, hexa[-8:])
        hexa = hexa[:-8]
    text = ",".join(["00000000"] * pad_words + (chunks or ["0"]))
    assert CpuSet.from_mask(text) == s


def test_mask_examples() -> None:
    assert CpuSet.from_mask("00000000,0000000f") == CpuSet.range(0, 3)
    assert CpuSet.from_mask("00000001,00000000") == CpuSet.of([32])
    assert CpuSet.from_mask("fffff") == CpuSet.range(0, 19)  # 20em64t-hybrid dump
    assert CpuSet.from_mask("3") == CpuSet.range(0, 1)  # 2arm dump
    assert CpuSet.of([0, 33]).to_mask() == "00000002,00000001"
    assert CpuSet().to_mask() == "00000000"
    assert CpuSet().to_mask(2) == "00000000,00000000"


# -- systemd D-Bus byte arrays ------------------------------------------------------------------


@relaxed
@given(cpu_sets)
def test_dbus_round_trip(s: CpuSet) -> None:
    data = s.to_dbus()
    for c in range(len(data) * 8):  # CPU i is bit i % 8 of byte i // 8
        assert bool(data[c // 8] >> (c % 8) & 1) == (c in s)
    assert not data or data[-1] != 0  # no trailing zero bytes
    assert CpuSet.from_dbus(data) == s
    assert CpuSet.from_dbus([*data, 0, 0]) == s  # systemd may pad


def test_dbus_examples() -> None:
    assert CpuSet.parse("0-3").to_dbus() == b"\x0f"
    assert CpuSet.parse("8").to_dbus() == b"\x00\x01"
    assert CpuSet.parse("1,9").to_dbus() == bytes([0b10, 0b10])
    assert CpuSet().to_dbus() == b""
    assert CpuSet.from_dbus(b"") == CpuSet()
    with pytest.raises(ValueError, match="too long"):
        CpuSet.from_dbus(bytes(MAX_CPU // 8 + 1) + b"\x01")


# -- set algebra -----------------------------------------------------------------------------


@relaxed
@given(cpu_sets, cpu_sets)
def test_algebra_matches_frozenset(a: CpuSet, b: CpuSet) -> None:
    assert (a | b).cpus == a.cpus | b.cpus
    assert (a & b).cpus == a.cpus & b.cpus
    assert (a - b).cpus == a.cpus - b.cpus
    assert (a <= b) == (a.cpus <= b.cpus) == a.issubset(b)
    assert (a < b) == (a.cpus < b.cpus)
    assert a.isdisjoint(b) == a.cpus.isdisjoint(b.cpus)
    assert union([a, b]) == a | b
    assert list(a) == sorted(a.cpus) == a.as_list()
    assert len(a) == len(a.cpus) and bool(a) == bool(a.cpus)
    if a:
        assert a.first() == min(a.cpus)


def test_construction_limits() -> None:
    with pytest.raises(ValueError, match="out of range"):
        CpuSet.of([MAX_CPU + 1])
    with pytest.raises(ValueError, match="out of range"):
        CpuSet.of([-1])
    with pytest.raises(ValueError, match="empty CpuSet"):
        CpuSet().first()
    assert repr(CpuSet.parse("1-2")) == "CpuSet('1-2')"


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("parse", "text", "pos", "why"), [
    (CpuSet.parse, "0-3,x", 4, "expected a number, found 'x'"),
    (CpuSet.parse, "0-", 2, "expected a number, found end of text"),
    (CpuSet.parse, "0,^ 2", 3, "expected a number, found ' '"),
    (CpuSet.parse, ",1", 0, "expected a number, found ','"),
    (CpuSet.parse_kernel, "0-3,", 4, "expected a number, found end of text"),
    (CpuSet.parse, "1,,2", 2, "expected a number, found ','"),
    (CpuSet.parse, "5-2", 0, "range 5-2 is reversed"),
    (CpuSet.parse, "0,^2-3", 4, "a '^' exclusion takes a single CPU"),
    (CpuSet.parse, "0;1", 1, "expected ',' or '-', found ';'"),
    (CpuSet.parse, "", 0, "empty CPU list"),
    (CpuSet.parse, "  ", 0, "empty CPU list"),
    (CpuSet.parse, "^1", 0, "the list selects no CPU"),
    (CpuSet.parse, "0-8192", 2, "CPU 8192 exceeds the maximum 8191"),
    (CpuSet.parse, "1" * 5000, 0, "exceeds the maximum 8191"),
    (CpuSet.parse, "-1", 0, "expected a number, found '-'"),
    (CpuSet.parse, "0x3", 1, "expected ',' or '-', found 'x'"),
    (CpuSet.parse_kernel, "0-3,^2", 4, "'^' exclusions are not allowed here"),
    (CpuSet.parse_kernel, "0 - 3", 1, "expected ',' or '-', found ' '"),
    (CpuSet.from_mask, "", 0, "empty mask"),
    (CpuSet.from_mask, "0000000g", 0, "'0000000g' is not a 32-bit hex word"),
    (CpuSet.from_mask, "ff,123456789", 3, "'123456789' is not a 32-bit hex word"),
    (CpuSet.from_mask, "ff,,ff", 3, "'' is not a 32-bit hex word"),
])
def test_errors_name_text_and_position(parse: object, text: str, pos: int, why: str) -> None:
    assert callable(parse)
    with pytest.raises(CpuSetError) as err:
        parse(text)
    exc = err.value
    assert exc.pos == pos
    assert why in exc.message
    shown = text if len(text) < 100 else text[:20]
    assert shown[:20] in exc.message or text.strip() == ""
    assert f"at position {pos}" in exc.message
    assert "\n" not in exc.message
    assert exc.code == "bad-cpuset"


def test_long_text_is_excerpted_around_the_error() -> None:
    text = ",".join(str(i) for i in range(200)) + ",oops," + "7" * 100
    with pytest.raises(CpuSetError) as err:
        CpuSet.parse(text)
    message = err.value.message
    assert err.value.pos == text.index("oops") and err.value.text == text
    assert "oops" in message and len(message) < 160 and "…" in message


def test_error_on_masked_cpu_beyond_limit() -> None:
    text = "00000001," + ",".join(["00000000"] * 256)  # bit 8192
    with pytest.raises(CpuSetError, match="exceeds"):
        CpuSet.from_mask(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789-,^ \tx\n\x00abcdef", max_size=30))
def test_any_text_parses_or_raises_cpuseterror(text: str) -> None:
    """No input makes a parser fail with anything but a CpuSetError inside the text."""
    for parse in (CpuSet.parse, CpuSet.parse_kernel, CpuSet.from_mask):
        try:
            result = parse(text)
        except CpuSetError as exc:
            assert 0 <= exc.pos <= len(text)
            assert "invalid CPU list" in exc.message
        else:
            assert all(0 <= c <= MAX_CPU for c in result)


# -- against libvirt's own parser ----------------------------------------------------------

def libvirt_cpuset(text: str) -> frozenset[int] | None:
    """What libvirt makes of ``<vcpu cpuset=TEXT>``: the CPUs, or None when it refuses."""
    import re
    from xml.sax.saxutils import quoteattr

    from libvirt_form import libvirt_form

    form = libvirt_form(f"<vcpu cpuset={quoteattr(text)}>1</vcpu>", "pw-cpuset-oracle")
    if form is None:
        return None
    found = re.search(r"<vcpu[^>]*cpuset='([^']*)'", form)
    assert found is not None, form
    return frozenset(CpuSet.parse(found.group(1)))  # libvirt's canonical form: plain


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["0", "1", "2", "3", "5", "12", "40", "-", ",", "^", " ",
                                 "  ", "+"]), min_size=1, max_size=12).map("".join))
@example("^1,0-2")
@example("0-3,^1,1")
@example("2-5,")
@example("2-5, ")
@example("1, ^2")
@example("1,^ 2")
@example(" 1 - 3 ")
@example("1,,2")
@example("0,^0")
@example("3-1")
@example("0--0")  # the end of a range is read with strtol: a sign may come first
@example("0- +1")
@example("0-- 0")
@example("2--1")
@example("+1")
def test_libvirt_syntax_is_what_libvirt_parses(text: str) -> None:
    """CpuSet.parse accepts exactly the cpusets libvirt's own parser (virBitmapParse,
    through the domain XML of libvirt's test driver: no daemon) accepts, with the same
    CPUs — the items in order, ``^`` only right before a number, a trailing comma."""
    import re

    # CPUs past pinwarden's MAX_CPU (the kernel's largest NR_CPUS) are refused on purpose;
    # libvirt takes up to 16383 (the case below)
    assume(all(len(run) <= 3 for run in re.findall(r"[0-9]+", text)))
    theirs = libvirt_cpuset(text)
    try:
        ours: frozenset[int] | None = frozenset(CpuSet.parse(text))
    except CpuSetError:
        ours = None
    assert ours == theirs, text


def test_libvirt_takes_cpus_past_the_kernel_limit_pinwarden_does_not() -> None:
    """The one deliberate difference: libvirt's cpusets reach CPU 16383, the kernel's
    NR_CPUS at most 8192; pinwarden refuses such a CPU with a clear error."""
    from libvirt_form import libvirt_form

    form = libvirt_form("<vcpu cpuset='1,9000'>1</vcpu>", "pw-cpuset-oracle")
    assert form is not None and "cpuset='1,9000'" in form
    with pytest.raises(CpuSetError, match="CPU 9000 exceeds the maximum 8191"):
        CpuSet.parse("1,9000")


def test_named_and_plural_agree_in_number() -> None:
    """One wording for a set in a sentence, used by every message that names CPUs."""
    assert CpuSet.parse("3").named() == "CPU 3"
    assert CpuSet.parse("2-3,8").named() == "CPUs 2-3,8"
    assert CpuSet().named() == "no CPU"
    assert CpuSet().named(empty="CPUs -") == "CPUs -"  # where a header wants a dash
    assert CpuSet.parse("1").named("node") == "node 1"  # sets of NUMA nodes too
    assert CpuSet.parse("0-1").named("node") == "nodes 0-1"
    assert CpuSet().named("node") == "no node"
    assert [plural(n, "whole free core") for n in (0, 1, 2)] == [
        "0 whole free cores", "1 whole free core", "2 whole free cores"]
