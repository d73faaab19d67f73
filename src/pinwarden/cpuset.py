"""`CpuSet`: an immutable set of CPU (or NUMA node) numbers and its textual forms.

Formats understood:

* libvirt syntax, ``0-3,^2,8`` (ranges, single CPUs, ``^N`` exclusions, spaces tolerated);
* the kernel list format, ``0-3,8`` (``/sys/devices/system/cpu/online``, ``cpuset.cpus``);
* hex masks as in ``/proc/PID/status`` ``Cpus_allowed`` and sysfs ``cpumap``: 32-bit words
  separated by commas, most significant word first (``00000000,0000000f``);
* systemd's D-Bus ``AllowedCPUs`` byte array: CPU *i* is bit ``i % 8`` of byte ``i // 8``.

Every parse error is a :class:`CpuSetError` naming the offending text and its position.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from pinwarden.errors import PinwardenError
from pinwarden.record import record

#: Largest CPU number accepted from text.  Linux's NR_CPUS tops out at 8192; anything
#: above is a typo or hostile input, and refusing it keeps masks and arrays small.
MAX_CPU = 8191


class CpuSetError(PinwardenError):
    """Text that is not a valid CPU list or mask."""

    code = "bad-cpuset"

    def __init__(self, text: str, pos: int, why: str) -> None:
        self.text = text
        self.pos = pos
        shown = text
        if len(text) > 64:  # a one-line message: the neighbourhood of the error
            start = max(0, pos - 24)
            shown = ("…" if start else "") + text[start:start + 48] + \
                ("…" if start + 48 < len(text) else "")
        super().__init__(f"invalid CPU list {shown!r} at position {pos}: {why}")


_NUMBER = re.compile(r"[0-9]+")
_SPACES = " \t\n\v\f\r"  # libvirt's virSkipSpaces: g_ascii_isspace


@record
class CpuSet:
    """An immutable, ordered set of non-negative integers (CPU or node numbers)."""

    cpus: frozenset[int] = frozenset()

    # -- construction -------------------------------------------------------------------

    @classmethod
    def of(cls, cpus: Iterable[int]) -> CpuSet:
        values = frozenset(cpus)
        for cpu in values:
            if not 0 <= cpu <= MAX_CPU:
                raise ValueError(f"CPU number {cpu} out of range 0-{MAX_CPU}")
        return cls(values)

    @classmethod
    def range(cls, first: int, last: int) -> CpuSet:
        """CPUs ``first`` to ``last`` inclusive."""
        return cls.of(range(first, last + 1))

    @classmethod
    def parse(cls, text: str) -> CpuSet:
        """Parse libvirt syntax (``0-3,^2,8``) as libvirt's ``virBitmapParse`` does: items
        apply in order (``^1,0-2`` is 0-2: a later range adds back what an earlier ``^``
        took), ``^`` comes right before its number, a trailing comma is allowed, and spaces
        are any ASCII white space around numbers, ``-`` and ``,``; a range's end may carry a
        sign (``0-+1``; ``0--0`` is CPU 0)."""
        return cls._parse(text, allow_negation=True, allow_spaces=True)

    @classmethod
    def parse_kernel(cls, text: str) -> CpuSet:
        """Parse the kernel list format (``0-3,8``); an empty string is the empty set.

        A trailing newline and NUL bytes (seen in real sysfs dumps) are ignored.
        """
        return cls._parse(text.replace("\x00", "").strip(), allow_negation=False,
                          allow_spaces=False)

    @classmethod
    def _parse(cls, text: str, *, allow_negation: bool, allow_spaces: bool) -> CpuSet:
        cpus: set[int] = set()
        pos = 0
        n = len(text)

        def skip_spaces(i: int) -> int:
            while allow_spaces and i < n and text[i] in _SPACES:
                i += 1
            return i

        def number(i: int) -> tuple[int, int]:
            m = _NUMBER.match(text, i)
            if m is None:
                found = repr(text[i]) if i < n else "end of text"
                raise CpuSetError(text, i, f"expected a number, found {found}")
            digits = m.group().lstrip("0") or "0"
            if len(digits) > len(str(MAX_CPU)):  # also keeps int() off hostile digit runs
                raise CpuSetError(text, i, f"CPU {digits[:12]}{'…' if len(digits) > 12 else ''}"
                                           f" exceeds the maximum {MAX_CPU}")
            value = int(digits)
            if value > MAX_CPU:
                raise CpuSetError(text, i, f"CPU {value} exceeds the maximum {MAX_CPU}")
            return value, m.end()

        pos = skip_spaces(pos)
        if pos == n:
            if allow_negation:  # libvirt: an empty cpuset attribute is an error
                raise CpuSetError(text, 0, "empty CPU list")
            return cls()
        while True:
            pos = skip_spaces(pos)
            negate = False
            if pos < n and text[pos] == "^":
                if not allow_negation:
                    raise CpuSetError(text, pos, "'^' exclusions are not allowed here")
                negate = True
                pos += 1  # libvirt: the number follows the '^' at once
            start_pos = pos
            first, pos = number(pos)
            last = first
            pos = skip_spaces(pos)
            if pos < n and text[pos] == "-":
                if negate:
                    raise CpuSetError(text, pos, "a '^' exclusion takes a single CPU")
                pos = skip_spaces(pos + 1)
                sign = ""
                if allow_spaces and pos < n and text[pos] in "+-":
                    # libvirt reads the range's end with strtol: a sign may come first
                    # ('0-+1' is 0-1, '0--0' is 0; '2--1' ends below its start)
                    sign, pos = text[pos], pos + 1
                last, pos = number(pos)
                if sign == "-" and last:
                    raise CpuSetError(text, start_pos, f"range {first}--{last} ends below "
                                                       "its start")
                if last < first:
                    raise CpuSetError(text, start_pos, f"range {first}-{last} is reversed")
                pos = skip_spaces(pos)
            if negate:
                cpus.discard(first)
            else:
                cpus.update(range(first, last + 1))
            if pos == n:
                break
            if text[pos] != ",":
                raise CpuSetError(text, pos, f"expected ',' or '-', found {text[pos]!r}")
            pos += 1
            if allow_negation and skip_spaces(pos) == n:
                break  # libvirt: a trailing comma ends the list
        if allow_negation and not cpus:
            raise CpuSetError(text, 0, "the list selects no CPU")
        return cls(frozenset(cpus))

    @classmethod
    def from_mask(cls, text: str) -> CpuSet:
        """Parse a hex mask of comma-separated 32-bit words, most significant first."""
        clean = text.replace("\x00", "").strip()
        if not clean:
            raise CpuSetError(text, 0, "empty mask")
        cpus: set[int] = set()
        words = clean.split(",")
        offset = 0
        for word in words:
            if not word or len(word) > 8 or any(c not in "0123456789abcdefABCDEF" for c in word):
                raise CpuSetError(text, offset, f"{word!r} is not a 32-bit hex word")
            offset += len(word) + 1
        for index, word in enumerate(reversed(words)):
            value = int(word, 16)
            base = index * 32
            bit = 0
            while value:
                if value & 1:
                    if base + bit > MAX_CPU:
                        raise CpuSetError(text, 0, f"CPU {base + bit} exceeds {MAX_CPU}")
                    cpus.add(base + bit)
                value >>= 1
                bit += 1
        return cls(frozenset(cpus))

    @classmethod
    def from_dbus(cls, data: bytes | bytearray | Iterable[int]) -> CpuSet:
        """Decode systemd's ``AllowedCPUs``/``AllowedMemoryNodes`` byte array."""
        raw = bytes(data).rstrip(b"\x00")  # senders may pad to a word size
        if len(raw) * 8 > MAX_CPU + 1:
            raise ValueError(f"CPU byte array of {len(raw)} bytes is too long")
        return cls(frozenset(i * 8 + b for i, byte in enumerate(raw) for b in range(8)
                             if byte >> b & 1))

    # -- formatting ---------------------------------------------------------------------

    def ranges(self) -> list[tuple[int, int]]:
        """Maximal runs of consecutive members, in order."""
        out: list[tuple[int, int]] = []
        members = sorted(self.cpus)
        if not members:
            return out
        start = last = members[0]
        for cpu in members:
            if cpu > last + 1:
                out.append((start, last))
                start = cpu
            last = cpu
        out.append((start, last))
        return out

    def to_list(self) -> str:
        """Kernel list format, also valid libvirt syntax: ``0-3,8``; empty set is ``""``."""
        return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.ranges())

    def to_mask(self, min_words: int = 1) -> str:
        """Hex mask in the ``Cpus_allowed`` form (32-bit words, comma separated)."""
        value = 0
        for cpu in self.cpus:
            value |= 1 << cpu
        words: list[str] = []
        while value or len(words) < min_words:
            words.append(f"{value & 0xFFFFFFFF:08x}")
            value >>= 32
        return ",".join(reversed(words))

    def to_dbus(self) -> bytes:
        """systemd ``AllowedCPUs`` byte array (empty set → empty array)."""
        if not self.cpus:
            return b""
        out = bytearray(max(self.cpus) // 8 + 1)
        for cpu in self.cpus:
            out[cpu // 8] |= 1 << (cpu % 8)
        return bytes(out)

    def named(self, noun: str = "CPU", *, empty: str | None = None) -> str:
        """The set in a sentence: ``CPU 3``, ``CPUs 2-3,8``, ``no CPU`` (or ``empty``);
        ``noun`` for sets of other things: ``node 1``, ``nodes 0-1``."""
        if not self.cpus:
            return f"no {noun}" if empty is None else empty
        return f"{noun if len(self.cpus) == 1 else noun + 's'} {self.to_list()}"

    def __str__(self) -> str:
        return self.to_list()

    def __repr__(self) -> str:
        return f"CpuSet({self.to_list()!r})"

    # -- set algebra --------------------------------------------------------------------

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.cpus))

    def __len__(self) -> int:
        return len(self.cpus)

    def __bool__(self) -> bool:
        return bool(self.cpus)

    def __contains__(self, cpu: object) -> bool:
        return cpu in self.cpus

    def __or__(self, other: CpuSet) -> CpuSet:
        return CpuSet(self.cpus | other.cpus)

    def __and__(self, other: CpuSet) -> CpuSet:
        return CpuSet(self.cpus & other.cpus)

    def __sub__(self, other: CpuSet) -> CpuSet:
        return CpuSet(self.cpus - other.cpus)

    def __le__(self, other: CpuSet) -> bool:
        return self.cpus <= other.cpus

    def __lt__(self, other: CpuSet) -> bool:
        return self.cpus < other.cpus

    def issubset(self, other: CpuSet) -> bool:
        return self.cpus <= other.cpus

    def isdisjoint(self, other: CpuSet) -> bool:
        return self.cpus.isdisjoint(other.cpus)

    def first(self) -> int:
        if not self.cpus:
            raise ValueError("empty CpuSet has no first CPU")
        return min(self.cpus)

    def as_list(self) -> list[int]:
        return sorted(self.cpus)


EMPTY = CpuSet()


def plural(n: int, noun: str) -> str:
    """``n`` of ``noun`` in a sentence: ``1 CPU``, ``2 CPUs``, ``0 whole free cores``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def union(sets: Iterable[CpuSet]) -> CpuSet:
    return CpuSet(frozenset().union(*[s.cpus for s in sets]))
