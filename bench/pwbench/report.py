"""Verdicts, the Markdown table and the plots."""

from __future__ import annotations

import importlib
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

Row = dict[str, Any]
NOVAS = ("nova", "nova-pack")


#: The speed goals: pinwarden's p99 at most this fraction of the faster Nova configuration's
#: (hosts with 8 NUMA nodes or more / the others), and under 1 ms on the 1,024-CPU host.
RATIO_BIG, RATIO_SMALL = 10.0, 3.0
BIG_HOST_CPUS = 1000
BIG_HOST_P99_US = 1000.0


def speed_ratio(ours: Row, others: dict[str, Row]) -> float | None:
    """The faster Nova configuration's p99 over pinwarden's (None without Nova)."""
    novas = [others[n]["p99_us"] for n in NOVAS if n in others and others[n]["p99_us"] > 0]
    if not novas or ours["p99_us"] <= 0:
        return None
    return float(min(novas)) / float(ours["p99_us"])


def verdict(ours: Row, others: dict[str, Row]) -> str:
    """pinwarden's row against the targets: "ok" or "MISSES: " and what.

    Targets: no refusal while there was room; no more NUMA splits than any Nova
    configuration; no isolate or whole VM sharing a core; at least as many vCPUs placed as
    the k8s baseline; p99 under 1 ms on the 1,024-CPU host; p99 at least 10× (hosts with 8+
    NUMA nodes) or 3× (others) faster than the faster Nova configuration.  VM counts are
    not judged (see vs_nova)."""
    misses: list[str] = []
    if ours["refused_with_room"]:
        misses.append(f"refused {ours['refused_with_room']} VMs with room")
    for name in NOVAS:
        nova = others.get(name)
        if nova is not None and ours["numa_split_vms"] > nova["numa_split_vms"]:
            misses.append(f"splits {ours['numa_split_vms']} > {name} {nova['numa_split_vms']}")
    for kind in ("isolate", "whole"):
        if ours.get(f"{kind}_shared_vms"):
            misses.append(f"{ours[f'{kind}_shared_vms']} {kind} VMs share a core")
    base = others.get("k8s")
    if base is not None and ours["accepted_vcpus"] < base["accepted_vcpus"]:
        misses.append(f"vCPUs {ours['accepted_vcpus']} < k8s {base['accepted_vcpus']}"
                      + k8s_context(ours, base))
    if ours.get("cpus", 0) >= BIG_HOST_CPUS and ours["p99_us"] >= BIG_HOST_P99_US:
        misses.append(f"p99 {ours['p99_us']}us >= 1 ms")
    ratio = speed_ratio(ours, others)
    goal = RATIO_BIG if ours.get("nodes", 1) >= 8 else RATIO_SMALL
    if ratio is not None and ratio < goal:
        misses.append(f"p99 only {ratio:.1f}x faster than Nova (goal {goal:.0f}x)")
    return "ok" if not misses else "MISSES: " + "; ".join(misses)


def k8s_context(ours: Row, base: Row) -> str:
    """What goes with a vCPU shortfall against k8s (shown; the target stays missed): the
    admit-all result (admitting in arrival order without ever fragmenting) and the VMs k8s
    refused although enough CPUs were free in number."""
    if "admit_all_vcpus" not in ours:
        return ""
    parts = [f"admit-all {ours['admit_all_vcpus']}"]
    if base.get("refused_fragmented"):
        parts.append(f"k8s refused {base['refused_fragmented']} fragmented")
    return f" ({', '.join(parts)})"


def vs_nova(ours: Row, others: dict[str, Row]) -> str:
    """VM counts against each Nova configuration, with what explains a difference (shown,
    not judged)."""
    parts = []
    for name in NOVAS:
        nova = others.get(name)
        if nova is None:
            continue
        diff = nova["accepted"] - ours["accepted"]
        if diff == 0:
            parts.append(f"{name} =")
            continue
        why = []
        if nova["refused_with_room"]:
            why.append(f"it refused {nova['refused_with_room']} with room")
        if nova.get("no_decision"):
            why.append(f"{nova['no_decision']} undecided")
        if nova.get("claim_failed"):
            why.append(f"{nova['claim_failed']} failed claims")
        if nova.get("smt_shared_vms", 0) > ours.get("smt_shared_vms", 0) and \
                ours["mix"] == "whole":
            why.append("its require leaves spare threads unheld")
        dv = ours["accepted_vcpus"] - nova["accepted_vcpus"]
        why.append(f"pinwarden {dv:+d} vCPUs")
        parts.append(f"{name} {diff:+d} VMs ({', '.join(why)})")
    return "; ".join(parts)


def verdicts(rows: list[Row]) -> None:
    """Set ``verdict``, ``vs_nova`` and ``nova_ratio`` on pinwarden's rows (empty elsewhere)."""
    by_workload: dict[str, dict[str, Row]] = defaultdict(dict)
    for row in rows:
        by_workload[row["workload"]][row["allocator"]] = row
    for row in rows:
        row["verdict"] = row["vs_nova"] = ""
        row["nova_ratio"] = None
        if row["allocator"] == "pinwarden":
            others = {k: v for k, v in by_workload[row["workload"]].items() if v is not row}
            row["verdict"] = verdict(row, others)
            row["vs_nova"] = vs_nova(row, others)
            ratio = speed_ratio(row, others)
            row["nova_ratio"] = None if ratio is None else round(ratio, 1)


COLUMNS = ("workload", "allocator", "offered", "accepted", "bound_vms", "admit_all_vms",
           "accepted_vcpus", "bound_vcpus", "refused_with_room", "refused_fragmented",
           "no_decision", "claim_failed", "numa_split_vms", "smt_shared_vms",
           "isolate_shared_vms", "whole_shared_vms", "p50_us", "p99_us", "nova_ratio",
           "verdict", "vs_nova")
TEXT = ("workload", "allocator", "verdict", "vs_nova")


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    ours = [r for r in rows if r["allocator"] == "pinwarden"]
    missing = [r for r in ours if r["verdict"].startswith("MISSES")]
    keys = ("accepted", "accepted_vcpus", "refused_with_room", "refused_fragmented",
            "no_decision", "no_decision_s", "claim_failed", "numa_split_vms",
            "isolate_shared_vms", "whole_shared_vms")
    totals: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(keys, 0))
    p99s: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        for k in keys:
            totals[r["allocator"]][k] += r.get(k, 0)
        p99s[r["allocator"]].append(r["p99_us"])
    bound_vms = sum(r["bound_vms"] for r in ours)
    bound_vcpus = sum(r["bound_vcpus"] for r in ours)
    inexact = sum(1 for r in ours if not r["bound_exact"])
    ratios = sorted(r["nova_ratio"] for r in ours if r["nova_ratio"] is not None)
    load = meta.get("loadavg_before"), meta.get("loadavg_after")
    lines = [
        f"# Allocator benchmark ({meta['mode']})",
        "",
        f"{len(ours)} workloads; pinwarden meets every target on "
        f"{len(ours) - len(missing)} and misses one on {len(missing)} (the verdict column; "
        "bench/README.md says what the targets and columns are). Generated by "
        f"`python -m pwbench {meta['mode']}` in {meta['seconds']} s (Python "
        f"{meta['python']}, {meta.get('cpus')} CPUs shared with other work: load average "
        f"{load[0]} before, {load[1]} after; Nova's time budget {meta.get('nova_budget_s')} s "
        "a decision).",
        "",
        "| allocator | accepted VMs | accepted vCPUs | refused with room | refused, "
        "fragmented | no decision (s spent) | failed claims | NUMA splits | isolate / whole "
        "VMs sharing a core | median p99 µs | worst p99 µs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, t in sorted(totals.items()):
        values = sorted(p99s[name])
        lines.append(
            f"| {name} | {t['accepted']:.0f} | {t['accepted_vcpus']:.0f} | "
            f"{t['refused_with_room']:.0f} | {t['refused_fragmented']:.0f} | "
            f"{t['no_decision']:.0f} ({t['no_decision_s']:.1f}) | {t['claim_failed']:.0f} | "
            f"{t['numa_split_vms']:.0f} | {t['isolate_shared_vms']:.0f} / "
            f"{t['whole_shared_vms']:.0f} | {values[len(values) // 2]} | {values[-1]} |")
    lines += [
        f"| *offline bound* | {bound_vms} | {bound_vcpus} | | | | | | | | |",
        "",
        "The offline bound (bench/README.md) bounds every allocator on every workload"
        + (f"; {inexact} of its optima were stopped by the time limit (dual bound used)."
           if inexact else "; every optimum was proven."),
    ]
    if ratios:
        lines += ["", f"pinwarden's p99 against the faster Nova configuration's, per workload: "
                  f"{ratios[0]}x to {ratios[-1]}x faster (median {ratios[len(ratios) // 2]}x)."]
    decide = meta.get("decide")
    if decide:
        lines += ["", f"In-process decisions on {meta['decide_host']} (1,024 CPUs, 8 nodes), "
                  f"{next(iter(decide.values()))['n']} states of a replayed mixed+emu "
                  "workload, fastest of 3 runs each (goal: p99 < 1 ms):", "",
                  "| what | p50 µs | p99 µs | max µs |", "| --- | ---: | ---: | ---: |"]
        labels = {"allocate": "allocate, layout cached",
                  "allocate_fresh": "allocate, fresh Topology object",
                  "decide": "policy.decide, layout cached",
                  "decide_fresh": "policy.decide, fresh Topology object"}
        for key, label in labels.items():
            d = decide[key]
            lines.append(f"| {label} | {d['p50_us']} | {d['p99_us']} | {d['max_us']} |")
    if missing:
        lines += ["", "Targets missed:", ""]
        lines += [f"* `{r['workload']}`: {r['verdict'].removeprefix('MISSES: ')}"
                  for r in missing]
    sweep = meta.get("k8s_sweep")
    if sweep:
        lines += ["", *k8s_sweep_text(sweep)]
    more = [r for r in ours if any(f"{n} +" in r["vs_nova"] for n in NOVAS)]
    lines += ["", f"VM counts (not judged): a Nova configuration accepted more VMs than "
              f"pinwarden on {len(more)} of {len(ours)} workloads; the vs_nova column says "
              "by how many and what goes with it.", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |",
              "| " + " | ".join("---" if c in TEXT else "---:" for c in COLUMNS) + " |"]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c, ""))
                                       for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def k8s_sweep_text(sweep: dict[str, Any]) -> list[str]:
    """The paragraph on the pinwarden-against-k8s sweep (``__main__.k8s_sweep``)."""
    v, frag, room = sweep["vcpus"], sweep["refused_fragmented"], sweep["refused_with_room"]
    seeds, loads = sweep["seeds"], sweep["loads"]
    return [
        f"Against k8s on more workloads (not judged; context for the vCPU target, which "
        f"stays judged row by row above): every host but the 1,024-CPU one, every mix, "
        f"loads {', '.join(map(str, loads))}, seeds {seeds[0]}–{seeds[-1]} "
        f"({sweep['workloads']} workloads, {sweep['seconds']} s, no Nova). pinwarden placed "
        f"more vCPUs than k8s on {sweep['above_k8s']} of them and fewer on "
        f"{sweep['below_k8s']} ({sweep['deficit_vcpus']} "
        f"vCPUs in all); on {sweep['below_k8s_at_admit_all']} of those it had already "
        "placed as many as admit-all, so only a refusal with room could have matched k8s. "
        f"In total pinwarden placed {v['pinwarden']} vCPUs and k8s {v['k8s']}; refusals "
        f"without room although enough CPUs were free in number: pinwarden "
        f"{frag['pinwarden']}, k8s {frag['k8s']}; refusals with room: pinwarden "
        f"{room['pinwarden']}, k8s {room['k8s']}.",
    ]


def _pyplot() -> Any:
    matplotlib: Any = importlib.import_module("matplotlib")  # bench/.venv has it
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def plot_comparison(rows: list[Row], path: Path) -> None:
    """Per host: decision time (p99 per workload: median and worst, log scale) and refusals
    (with room, and without a decision), one bar per allocator."""
    plt = _pyplot()
    names = sorted({r["allocator"] for r in rows})
    size = {r["host"]: r["cpus"] for r in rows}
    hosts = sorted(size, key=lambda h: (size[h], h))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 8.5), sharex=True)
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(hosts))]
        p99 = [sorted(r["p99_us"] for r in rows if r["host"] == h and r["allocator"] == name)
               for h in hosts]
        median = [v[len(v) // 2] if v else 0 for v in p99]
        worst = [v[-1] if v else 0 for v in p99]
        bars = top.bar(xs, median, width, label=name)
        top.scatter(xs, worst, marker="_", s=120, color=bars.patches[0].get_facecolor())
        room = [sum(r["refused_with_room"] for r in rows
                    if r["host"] == h and r["allocator"] == name) for h in hosts]
        undecided = [sum(r.get("no_decision", 0) for r in rows
                         if r["host"] == h and r["allocator"] == name) for h in hosts]
        bottom.bar(xs, room, width, color=bars.patches[0].get_facecolor(), label=name)
        bottom.bar(xs, undecided, width, bottom=room, color="none", hatch="///",
                   edgecolor=bars.patches[0].get_facecolor())
    top.set_yscale("log")
    top.set_ylabel("p99 decision time, µs (bar: median workload, dash: worst)")
    top.axhline(1000, color="grey", linestyle=":", linewidth=1)
    top.legend(fontsize=8, ncol=len(names))
    top.grid(alpha=0.3, axis="y")
    bottom.set_ylabel("refusals with room (solid)\n+ without a decision (hatched)")
    bottom.set_xticks(range(len(hosts)))
    bottom.set_xticklabels([f"{_wrap(h)}\n{size[h]} CPUs" for h in hosts], fontsize=7)
    bottom.grid(alpha=0.3, axis="y")
    fig.suptitle("pinwarden vs Nova vs k8s: decision time and refusals, all workloads per host")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _wrap(name: str, width: int = 22) -> str:
    """A host name broken after a '-' or '+' so that neighbouring tick labels do not run
    into each other."""
    lines = [""]
    for part in re.split(r"(?<=[-+])", name):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def plot_acceptance(rows: list[Row], path: Path) -> None:
    """Acceptance against offered load, "mixed" workloads, one column per host that was run
    at three loads or more: VMs accepted / offered on top, vCPUs below; the offline bound
    dashed, the admit-all ceiling dotted."""
    plt = _pyplot()

    Series = dict[str, dict[str, dict[float, list[float]]]]
    kinds: dict[str, Series] = {}
    for kind in ("VMs", "vCPUs"):
        kinds[kind] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if r["mix"] != "mixed" or not r["offered"]:
            continue
        vms, vcpus = kinds["VMs"][r["host"]], kinds["vCPUs"][r["host"]]
        vms[r["allocator"]][r["load"]].append(r["accepted"] / r["offered"])
        vcpus[r["allocator"]][r["load"]].append(r["accepted_vcpus"] / r["offered_vcpus"])
        if r["allocator"] == "pinwarden":
            vms["offline bound"][r["load"]].append(r["bound_vms"] / r["offered"])
            vcpus["offline bound"][r["load"]].append(r["bound_vcpus"] / r["offered_vcpus"])
            vms["admit-all"][r["load"]].append(r["admit_all_vms"] / r["offered"])
            vcpus["admit-all"][r["load"]].append(r["admit_all_vcpus"] / r["offered_vcpus"])
    size = {r["host"]: r["cpus"] for r in rows}
    hosts = sorted((h for h, s in kinds["VMs"].items() if len(s.get("pinwarden", {})) >= 3),
                   key=lambda h: (-size[h], h))[:4]
    if not hosts:
        return
    fig, axes = plt.subplots(2, len(hosts), figsize=(5 * len(hosts), 7.5), squeeze=False)
    for row, kind in enumerate(("VMs", "vCPUs")):
        for ax, host in zip(axes[row], hosts, strict=True):
            for name, points in sorted(kinds[kind][host].items()):
                loads = sorted(points)
                values = [sum(points[x]) / len(points[x]) for x in loads]
                style = {"offline bound": "--", "admit-all": ":"}.get(name, "-o")
                ax.plot(loads, values, style, label=name, markersize=4)
            ax.set_title(f"{host} (mixed prefer/isolate)", fontsize=9)
            ax.set_xlabel("offered load (CPU demand / pool)")
            ax.set_ylabel(f"{kind} accepted / offered")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
