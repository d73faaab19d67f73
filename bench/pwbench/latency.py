"""The pure half of ``make bench-noise`` (bench/noise.py): cyclictest's output → latency
histograms → percentiles and side-by-side ratios; ``/proc/interrupts`` and
``/proc/softirqs`` → counts on one CPU; the Markdown table.

cyclictest (Debian's rt-tests 2.4) writes, with ``--json=FILE`` and ``-h US``, one object
per measurement thread under ``"thread"``: ``"histogram"`` maps a latency in whole
microseconds (as a string) to its count — only buckets that are not empty, and only below
``US``; ``"cycles"`` counts every sample, so ``cycles − Σ histogram`` is the samples at
``US`` µs or more (cyclictest's "Histogram Overflows"); ``"max"`` is the true maximum, also
when it overflowed.  Percentiles are nearest-rank over 1 µs buckets, like
:func:`pwbench.metrics.percentile`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The percentiles reported, as (name, fraction).
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999))
#: The three configurations, in the order they are reported.
CONFIGS: tuple[str, ...] = ("shared", "exclusive", "exclusive+isolation")
#: The ratios reported: (name, numerator configuration, denominator configuration).
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("shared/exclusive", "shared", "exclusive"),
    ("exclusive/exclusive+isolation", "exclusive", "exclusive+isolation"),
    ("shared/exclusive+isolation", "shared", "exclusive+isolation"),
)


class CyclictestError(ValueError):
    """cyclictest's output is not what this parser knows."""


@dataclass
class Histogram:
    """Latency samples of one or more runs: ``buckets`` µs → count, ``overflow`` samples
    beyond the histogram's range, the true ``max_us`` and ``min_us``."""

    buckets: dict[int, int] = field(default_factory=dict)
    overflow: int = 0
    max_us: int = 0
    min_us: int | None = None

    @property
    def samples(self) -> int:
        return sum(self.buckets.values()) + self.overflow

    def add(self, other: Histogram) -> None:
        for us, count in other.buckets.items():
            self.buckets[us] = self.buckets.get(us, 0) + count
        self.overflow += other.overflow
        self.max_us = max(self.max_us, other.max_us)
        if other.min_us is not None:
            self.min_us = other.min_us if self.min_us is None else min(self.min_us,
                                                                       other.min_us)

    def percentile(self, fraction: float) -> int | None:
        """Nearest-rank percentile in µs; ``None`` when that rank lies among the
        overflowed samples (beyond the histogram's range) or there are no samples."""
        total = self.samples
        if total == 0:
            return None
        rank = max(1, math.ceil(fraction * total))
        seen = 0
        for us in sorted(self.buckets):
            seen += self.buckets[us]
            if seen >= rank:
                return us
        return None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": self.samples}
        for name, fraction in PERCENTILES:
            out[f"{name}_us"] = self.percentile(fraction)
        out["max_us"] = self.max_us
        out["min_us"] = self.min_us
        out["overflow"] = self.overflow
        return out


@dataclass(frozen=True)
class CyclictestRun:
    """One cyclictest thread's result: where it ran and its histogram."""

    cpu: int | None
    cycles: int
    avg_us: float | None
    histogram: Histogram
    version: str | None = None
    cmdline: str | None = None


def parse_cyclictest_json(text: str) -> list[CyclictestRun]:
    """Every measurement thread of cyclictest's ``--json`` file (run with ``-h``)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CyclictestError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("thread"), dict):
        raise CyclictestError("no 'thread' object (was cyclictest run with --json?)")
    # rt-tests 2.4 writes these two keys with a stray colon
    version = doc.get("rt_test_version:", doc.get("rt_test_version"))
    cmdline = doc.get("cmdline:", doc.get("cmdline"))
    runs: list[CyclictestRun] = []
    for tid in sorted(doc["thread"], key=int):
        entry = doc["thread"][tid]
        raw = entry.get("histogram")
        if not isinstance(raw, dict):
            raise CyclictestError(f"thread {tid} has no histogram (run cyclictest with -h)")
        buckets = {int(us): int(count) for us, count in raw.items() if int(count)}
        cycles = int(entry["cycles"])
        binned = sum(buckets.values())
        if binned > cycles:
            raise CyclictestError(f"thread {tid}: {binned} samples binned of {cycles}")
        hist = Histogram(buckets, overflow=cycles - binned, max_us=int(entry["max"]),
                         min_us=int(entry["min"]) if cycles else None)
        runs.append(CyclictestRun(
            cpu=int(entry["cpu"]) if entry.get("cpu") is not None else None,
            cycles=cycles, avg_us=float(entry["avg"]) if "avg" in entry else None,
            histogram=hist, version=str(version) if version is not None else None,
            cmdline=str(cmdline) if cmdline is not None else None))
    return runs


def parse_histfile(text: str) -> list[Histogram]:
    """cyclictest's classic histogram (``-h US``, on stdout or ``--histfile=FILE``): one
    line per bucket, ``µs count [count…]`` (one column per thread), then ``# Min
    Latencies:``, ``# Max Latencies:`` and ``# Histogram Overflows:`` with one value per
    thread.  The same histograms as :func:`parse_cyclictest_json` gives for that run."""
    columns: list[dict[int, int]] = []
    totals: dict[str, list[int]] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            key, sep, values = line[1:].partition(":")
            if sep and key.strip() in ("Min Latencies", "Max Latencies",
                                       "Histogram Overflows"):
                totals[key.strip()] = [int(v) for v in values.split()]
            continue
        words = line.split()
        if not words or not all(w.isdigit() for w in words):
            continue
        us, counts = int(words[0]), [int(w) for w in words[1:]]
        columns += [{} for _ in range(len(counts) - len(columns))]
        for column, count in zip(columns, counts, strict=False):
            if count:
                column[us] = count
    if "Max Latencies" not in totals or "Histogram Overflows" not in totals:
        raise CyclictestError("no '# Max Latencies' / '# Histogram Overflows' lines")
    out: list[Histogram] = []
    for i, column in enumerate(columns):
        samples = sum(column.values()) + totals["Histogram Overflows"][i]
        mins = totals.get("Min Latencies", [])
        out.append(Histogram(column, overflow=totals["Histogram Overflows"][i],
                             max_us=totals["Max Latencies"][i],
                             min_us=mins[i] if i < len(mins) and samples else None))
    return out


def merged(histograms: Iterable[Histogram]) -> Histogram:
    out = Histogram()
    for hist in histograms:
        out.add(hist)
    return out


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` to 2 decimals; ``None`` if either is unknown or the
    denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 2)


def ratios(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """For each of :data:`RATIOS` whose configurations were measured: the ratio of every
    percentile and of the maximum (``> 1``: the numerator's latency is that many times
    longer)."""
    keys = [f"{name}_us" for name, _ in PERCENTILES] + ["max_us"]
    out: dict[str, dict[str, float | None]] = {}
    for name, num, den in RATIOS:
        if num in summaries and den in summaries:
            out[name] = {key.removesuffix("_us"): ratio(summaries[num].get(key),
                                                        summaries[den].get(key))
                         for key in keys}
    return out


# -- /proc/interrupts and /proc/softirqs ---------------------------------------------------

def parse_interrupts(text: str) -> dict[str, list[int]]:
    """``/proc/interrupts`` (or ``/proc/softirqs``) → row name → count per CPU column (the
    header's ``CPUn``; a row with fewer numbers, such as ``ERR:``, is padded with 0)."""
    lines = text.splitlines()
    if not lines:
        return {}
    ncpu = len(lines[0].split())
    out: dict[str, list[int]] = {}
    for line in lines[1:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        counts: list[int] = []
        for word in rest.split()[:ncpu]:
            if not word.isdigit():
                break
            counts.append(int(word))
        out[name.strip()] = counts + [0] * (ncpu - len(counts))
    return out


def cpu_column(text: str, cpu: int) -> int:
    """The column of CPU ``cpu`` in the header of ``/proc/interrupts`` (offline CPUs have
    no column)."""
    header = text.splitlines()[0].split() if text else []
    try:
        return header.index(f"CPU{cpu}")
    except ValueError:
        raise ValueError(f"CPU{cpu} is not in /proc/interrupts") from None


def on_cpu(before: str, after: str, cpu: int) -> dict[str, int]:
    """What changed on CPU ``cpu`` between two reads of ``/proc/interrupts`` (or
    ``/proc/softirqs``): every named row (``LOC``, ``RES``, ``CAL``…; softirq names) by
    itself, and the numbered rows (device interrupts) summed as ``devices`` — with the
    busiest of them listed as ``irq N`` (non-zero rows only)."""
    col_b, col_a = cpu_column(before, cpu), cpu_column(after, cpu)
    rows_b, rows_a = parse_interrupts(before), parse_interrupts(after)
    out: dict[str, int] = {}
    devices = 0
    for name, counts in rows_a.items():
        old = rows_b.get(name)
        if old is None:
            continue
        delta = counts[col_a] - old[col_b]
        if name.isdigit():
            devices += delta
            if delta:
                out[f"irq {name}"] = delta
        elif delta:
            out[name] = delta
    out["devices"] = devices
    return out


def irq_totals(before: str, after: str) -> dict[str, int]:
    """Per row of ``/proc/interrupts``: the increase summed over every CPU."""
    rows_b, rows_a = parse_interrupts(before), parse_interrupts(after)
    return {name: sum(counts) - sum(rows_b[name]) for name, counts in rows_a.items()
            if name in rows_b}


def irq_names(text: str) -> dict[str, str]:
    """Numbered rows of ``/proc/interrupts`` → their description (chip, hardware IRQ and
    the handlers' names, e.g. ``PCI-MSIX-0000:00:02.0 1-edge virtio1-req.0``)."""
    lines = text.splitlines()
    if not lines:
        return {}
    ncpu = len(lines[0].split())
    out: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, rest = line.partition(":")
        if sep and name.strip().isdigit():
            out[name.strip()] = " ".join(rest.split()[ncpu:])
    return out


def per_second(counts: Mapping[str, int], seconds: float) -> dict[str, float]:
    return {k: round(v / seconds, 1) for k, v in counts.items()} if seconds > 0 else {}


def summed(dicts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


# -- Markdown -------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.2f}".rstrip("0").rstrip(".") if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_section(title: str, env: Mapping[str, Any]) -> list[str]:
    """One environment's table (``env`` as bench/noise.py writes it)."""
    lines = [f"## {title}", ""]
    about = env.get("about", {})
    lines.append(
        f"{about.get('kernel', '?')}, {about.get('cpus', '?')} CPUs, cgroup "
        f"{about.get('cgroup', '?')}; cyclictest on CPU {env.get('cpu', '?')} "
        f"({env.get('policy', '?')}, interval {env.get('interval_us', '?')} µs), "
        f"{env.get('rounds', '?')} rounds × {env.get('duration_s', '?')} s per configuration, "
        f"interleaved; load: {env.get('load', {}).get('summary', '?')}.")
    lines += ["", "| configuration | samples | p50 µs | p99 µs | p99.9 µs | max µs "
                  "| p99 per round µs | device IRQs/s | timer IRQs/s | others % | steal % |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for name in CONFIGS:
        cfg = env.get("configs", {}).get(name)
        if cfg is None:
            continue
        irq = cfg.get("interrupts_per_s", {})
        use = cfg.get("cpu_use_pct", {})
        rounds = ", ".join(_fmt(v) for v in cfg.get("p99_per_round_us", []))
        lines.append(f"| {name} | {_fmt(cfg.get('samples'))} | {_fmt(cfg.get('p50_us'))} "
                     f"| {_fmt(cfg.get('p99_us'))} | {_fmt(cfg.get('p99.9_us'))} "
                     f"| {_fmt(cfg.get('max_us'))} | {rounds} | {_fmt(irq.get('devices'))} "
                     f"| {_fmt(irq.get('LOC'))} | {_fmt(use.get('others_pct'))} "
                     f"| {_fmt(use.get('steal_pct'))} |")
    lines += ["", "Per configuration, on the measured CPU during the measurements: device "
                  "interrupts and local timer interrupts per second (/proc/interrupts), the "
                  "share of its time spent running anything but cyclictest (others) and "
                  "taken by the hypervisor (steal) (/proc/stat)."]
    rat = env.get("ratios", {})
    if rat:
        lines += ["", "| ratio | p50 | p99 | p99.9 | max |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, values in rat.items():
            lines.append(f"| {name} | {_fmt(values.get('p50'))} | {_fmt(values.get('p99'))} "
                         f"| {_fmt(values.get('p99.9'))} | {_fmt(values.get('max'))} |")
    checks = env.get("checks", {})
    if checks:
        said = [f"{name} {'ok' if value is True or value in ({}, []) else 'NO'}"
                for name, value in checks.items()]
        lines += ["", f"Checks: {', '.join(said)}."]
    for note in env.get("notes", []):
        lines += ["", f"* {note}"]
    return [*lines, ""]


def markdown(results: Mapping[str, Any], sections: Sequence[tuple[str, str]]) -> str:
    lines = ["# bench-noise: wake-up latency under load", "",
             "Generated by `make bench-noise` (bench/noise.py) from `noise.json`; how to read "
             "it: bench/README.md, section bench-noise. Ratios > 1: the first configuration's "
             "latency is that many times longer.", ""]
    for key, title in sections:
        if key in results:
            lines += markdown_section(title, results[key])
    return "\n".join(lines).rstrip() + "\n"
