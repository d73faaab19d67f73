"""bench-noise's pure half (bench/pwbench/latency.py) against real output of Debian 12's
cyclictest (rt-tests 2.4) and real /proc/interrupts and /proc/softirqs of this host.

``tests/data/cyclictest/cyclictest-2.4-h400.{json,hist}`` are one run, both outputs:
``cyclictest -q -m -t 1 -a 1 -i 1000 -D 3s -h 400 --histfile=… --json=… --policy=other``
beside two CPU hogs on CPU 1, so 532 of its 2,339 samples lie beyond the 400 µs histogram
(cyclictest's own "Histogram Overflows").  ``interrupts-{before,after}.txt`` bracket 300
``dd oflag=dsync`` writes (virtio-blk, IRQ 36 on CPU 1).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from pwbench import latency  # noqa: E402
from pwbench.latency import CyclictestError, Histogram  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "cyclictest"


def expanded(hist: Histogram) -> list[float]:
    """Every binned sample as a value, sorted (the overflowed ones as +infinity)."""
    values = [float(us) for us, n in sorted(hist.buckets.items()) for _ in range(n)]
    return values + [math.inf] * hist.overflow


def test_json_of_a_real_run_is_read_completely() -> None:
    (run,) = latency.parse_cyclictest_json((DATA / "cyclictest-2.4-h400.json").read_text())
    assert run.version == "2.40" and run.cpu == 1
    assert run.cmdline is not None and "--policy=other" in run.cmdline
    hist = run.histogram
    assert run.cycles == hist.samples == 2339
    assert hist.overflow == 532  # cycles − binned: what cyclictest calls overflows
    assert (hist.min_us, hist.max_us) == (28, 60010)  # the true max, beyond the range
    assert max(hist.buckets) < 400


def test_histfile_of_a_real_run_read_by_hand() -> None:
    # the figures below are read off cyclictest-2.4-h400.hist itself: rows 000000-000399,
    # "# Total: 000001807", "# Min Latencies: 00028", "# Max Latencies: 60010",
    # "# Histogram Overflows: 00532"; the "# Thread 0: …" cycle numbers are not buckets
    (hist,) = latency.parse_histfile((DATA / "cyclictest-2.4-h400.hist").read_text())
    assert len(hist.buckets) == 181  # rows with a count other than 000000
    assert sum(hist.buckets.values()) == 1807 and hist.overflow == 532
    assert hist.samples == 2339
    assert (min(hist.buckets), max(hist.buckets)) == (28, 395)
    assert hist.buckets[28] == 2 and hist.buckets[80] == 125 and hist.buckets[395] == 1
    assert max(hist.buckets.values()) == 125  # 000080 000125, the fullest bucket
    assert (hist.min_us, hist.max_us) == (28, 60010)
    # p50 is rank 1,170 of 2,339: the running count is 1,138 at 87 µs and 1,196 at 88 µs
    assert hist.percentile(0.5) == 88


def test_json_and_histfile_of_one_run_agree() -> None:
    (from_json,) = latency.parse_cyclictest_json(
        (DATA / "cyclictest-2.4-h400.json").read_text())
    (from_hist,) = latency.parse_histfile((DATA / "cyclictest-2.4-h400.hist").read_text())
    assert from_hist.buckets == from_json.histogram.buckets
    assert from_hist.overflow == from_json.histogram.overflow == 532
    assert from_hist.max_us == from_json.histogram.max_us
    assert from_hist.min_us == from_json.histogram.min_us


@pytest.mark.parametrize("fraction", [0.0001, 0.25, 0.5, 0.7, 0.77, 0.99, 0.999, 1.0])
def test_percentiles_are_nearest_rank_over_the_samples(fraction: float) -> None:
    (run,) = latency.parse_cyclictest_json((DATA / "cyclictest-2.4-h400.json").read_text())
    values = expanded(run.histogram)
    want = values[max(1, math.ceil(fraction * len(values))) - 1]
    got = run.histogram.percentile(fraction)
    # a rank among the overflowed samples has no value: None, never a made-up number
    assert got == (None if want == math.inf else want)


def test_summary_of_the_real_run() -> None:
    (run,) = latency.parse_cyclictest_json((DATA / "cyclictest-2.4-h400.json").read_text())
    summary = run.histogram.summary()
    assert summary["samples"] == 2339 and summary["max_us"] == 60010
    # 1,807 of 2,339 samples (77.3 %) are binned: p50 has a value, p99 and p99.9 overflow
    assert isinstance(summary["p50_us"], int) and summary["p50_us"] < 400
    assert summary["p99_us"] is None and summary["p99.9_us"] is None


def test_merging_runs_adds_counts_and_keeps_extremes() -> None:
    a = Histogram({10: 3, 20: 1}, overflow=0, max_us=20, min_us=10)
    b = Histogram({10: 1, 30: 5}, overflow=2, max_us=900, min_us=9)
    m = latency.merged([a, b])
    assert m.buckets == {10: 4, 20: 1, 30: 5} and m.overflow == 2
    assert (m.min_us, m.max_us, m.samples) == (9, 900, 12)
    assert m.percentile(0.5) == 30 and m.percentile(1.0) is None
    assert Histogram().percentile(0.5) is None


def test_ratios_side_by_side() -> None:
    summaries: dict[str, dict[str, int | None]] = {
        "shared": {"p50_us": 90, "p99_us": 4000, "p99.9_us": 30000, "max_us": 150000},
        "exclusive": {"p50_us": 90, "p99_us": 800, "p99.9_us": 3000, "max_us": 5000},
        "exclusive+isolation": {"p50_us": 60, "p99_us": 400, "p99.9_us": None,
                                "max_us": 0},
    }
    got = latency.ratios(summaries)
    assert got["shared/exclusive"] == {"p50": 1.0, "p99": 5.0, "p99.9": 10.0, "max": 30.0}
    assert got["exclusive/exclusive+isolation"] == {"p50": 1.5, "p99": 2.0, "p99.9": None,
                                                    "max": None}
    assert latency.ratios({"shared": summaries["shared"]}) == {}


def test_interrupts_on_one_cpu_from_real_proc_files() -> None:
    before = (DATA / "interrupts-before.txt").read_text()
    after = (DATA / "interrupts-after.txt").read_text()
    on1 = latency.on_cpu(before, after, 1)
    assert on1["irq 36"] == 3508183 - 3507092  # virtio1-req.0, the disk
    assert on1["LOC"] == 4834374 - 4834128
    assert on1["devices"] == sum(v for k, v in on1.items() if k.startswith("irq "))
    assert "ERR" not in on1  # a one-column row, unchanged
    rows = latency.parse_interrupts(before)
    assert rows["ERR"] == [0, 0] and rows["36"] == [0, 3507092]
    soft = latency.on_cpu((DATA / "softirqs-before.txt").read_text(),
                          (DATA / "softirqs-after.txt").read_text(), 0)
    assert soft["devices"] == 0 and set(soft) <= {"devices", "HI", "TIMER", "NET_TX", "NET_RX",
                                                  "BLOCK", "IRQ_POLL", "TASKLET", "SCHED",
                                                  "HRTIMER", "RCU"}
    with pytest.raises(ValueError):
        latency.on_cpu(before, after, 7)


def test_not_cyclictest_output_is_refused() -> None:
    with pytest.raises(CyclictestError):
        latency.parse_cyclictest_json("{}")
    with pytest.raises(CyclictestError):
        latency.parse_cyclictest_json('{"thread": {"0": {"cycles": 1, "max": 1, "min": 1}}}')
    with pytest.raises(CyclictestError):
        latency.parse_histfile("000001 000002\n")
