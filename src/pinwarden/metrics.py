"""Prometheus metrics from a snapshot of the host, the ledger and the audit.  Pure: no I/O.

:class:`Snapshot` holds values read elsewhere (``pinwarden metrics`` gathers them);
:func:`registry` turns one into a fresh :class:`prometheus_client.CollectorRegistry` (never
the library's global one), :func:`render` into the exposition text.

Metrics (every name starts with ``pinwarden_``):

``pinwarden_info{version, partition_mode}``
    1; the partition mode (``isolcpus``, ``cgroup``, ``none``; empty when the host could
    not be read).
``pinwarden_vm_cpus{node, state}``
    VM CPUs per NUMA node, ``state="leased"`` (leased exclusively, including CPUs held
    empty under the ``isolate`` thread policy) or ``"free"`` (VM CPUs nobody leases).
    Absent while the lease database cannot be read (every CPU "free" would be a guess).
``pinwarden_housekeeping_cpus{node}``
    online CPUs kept for the host.
``pinwarden_holder_leased_cpus{driver, name, key}``
    CPUs leased to each holder (a domain: driver ``qemu``/``lxc``, key its UUID; a
    ``pinwarden run`` job: driver ``run``).
``pinwarden_holder_created_timestamp_seconds{…}``, ``pinwarden_holder_age_seconds{…}``
    when the holder's leases were recorded, and their age at the snapshot.
``pinwarden_audit_intruders{kind, severity}``
    what ``pinwarden audit`` finds, per kind (every kind, 0 included), when it ran.
``pinwarden_audit_checked{what}``
    threads, cgroups and IRQs the audit looked at.
``pinwarden_read_error{source}``
    1 when pinwarden could not read ``source`` for this snapshot, else 0: ``host``
    (topology and partition), ``ledger`` (lease database), ``proc`` (the audit's /proc
    scan), ``cgroups`` (the cpuset hierarchy).  Alert on ``pinwarden_read_error == 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics

from pinwarden import __version__
from pinwarden.audit import KIND_ORDER, SEVERITY, Report
from pinwarden.cpuset import CpuSet
from pinwarden.ledger import HolderRecord
from pinwarden.model import Lease
from pinwarden.partition import Host
from pinwarden.record import field, record

#: What a snapshot reads, each reported by ``pinwarden_read_error``.
SOURCES = ("host", "ledger", "proc", "cgroups")
UNKNOWN_NODE = "unknown"


@record
class Snapshot:
    taken: float  # Unix time of the snapshot (holder ages are relative to it)
    host: Host | None = None  # None: could not be read (see errors)
    leases: tuple[Lease, ...] = ()
    holders: tuple[HolderRecord, ...] = ()
    audit: Report | None = None  # None: not run, or could not be made
    #: source (one of SOURCES) -> one-line reason it could not be read
    errors: Mapping[str, str] = field(default_factory=dict)


def _node_label(host: Host, cpu: int) -> str:
    info = host.topology.cpus.get(cpu)
    return UNKNOWN_NODE if info is None else str(info.node)


def _per_node(host: Host, cpus: CpuSet) -> dict[str, int]:
    counts: dict[str, int] = {}
    for cpu in cpus:
        label = _node_label(host, cpu)
        counts[label] = counts.get(label, 0) + 1
    return counts


def _nodes(host: Host) -> list[str]:
    """Every node with a present CPU, numerically."""
    nodes = {c.node for c in host.topology.cpus.values()}
    return [str(n) for n in sorted(nodes)]


class SnapshotCollector:
    """A prometheus_client custom collector over one :class:`Snapshot`."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics())

    def _metrics(self) -> Iterator[Metric]:
        snap = self.snapshot
        mode = snap.host.partition.mode if snap.host is not None else ""
        yield InfoMetricFamily("pinwarden", "pinwarden version and host partition mode",
                               value={"version": __version__, "partition_mode": mode})
        if snap.host is not None:
            yield from self._cpus(snap.host)
        yield from self._holders()
        if snap.audit is not None:
            yield from self._audit(snap.audit)
        errors = GaugeMetricFamily(
            "pinwarden_read_error",
            "1 when pinwarden could not read this source for the snapshot, else 0",
            labels=["source"])
        for source in SOURCES:
            errors.add_metric([source], 1.0 if source in snap.errors else 0.0)
        yield errors

    def _cpus(self, host: Host) -> Iterator[Metric]:
        leased = CpuSet.of(lease.cpu for lease in self.snapshot.leases)
        part = host.partition
        nodes = _nodes(host)
        house_n = _per_node(host, part.host_cpus)
        if "ledger" not in self.snapshot.errors:  # (unread: leased unknown, not none)
            leased_n = _per_node(host, leased)
            free_n = _per_node(host, part.vm_cpus - leased)
            vm = GaugeMetricFamily("pinwarden_vm_cpus",
                                   "VM CPUs per NUMA node: leased exclusively, or free",
                                   labels=["node", "state"])
            extra = [UNKNOWN_NODE] if UNKNOWN_NODE in leased_n else []
            for node in [*nodes, *extra]:
                vm.add_metric([node, "leased"], float(leased_n.get(node, 0)))
                vm.add_metric([node, "free"], float(free_n.get(node, 0)))
            yield vm
        house = GaugeMetricFamily("pinwarden_housekeeping_cpus",
                                  "online CPUs kept for the host, per NUMA node",
                                  labels=["node"])
        for node in nodes:
            house.add_metric([node], float(house_n.get(node, 0)))
        yield house

    def _holders(self) -> Iterator[Metric]:
        labels = ["driver", "name", "key"]
        cpus = GaugeMetricFamily("pinwarden_holder_leased_cpus",
                                 "CPUs leased exclusively to the holder", labels=labels)
        created = GaugeMetricFamily("pinwarden_holder_created_timestamp_seconds",
                                    "when the holder's leases were recorded (Unix time)",
                                    labels=labels)
        age = GaugeMetricFamily("pinwarden_holder_age_seconds",
                                "age of the holder's leases at the snapshot", labels=labels)
        count: dict[tuple[str, str], int] = {}
        for lease in self.snapshot.leases:
            key = (lease.holder.driver, lease.holder.key)
            count[key] = count.get(key, 0) + 1
        for held in self.snapshot.holders:
            ref = held.ref
            values = [ref.driver, ref.name, ref.key]
            cpus.add_metric(values, float(count.get((ref.driver, ref.key), 0)))
            created.add_metric(values, held.created)
            age.add_metric(values, max(0.0, self.snapshot.taken - held.created))
        yield from (cpus, created, age)

    def _audit(self, report: Report) -> Iterator[Metric]:
        intruders = GaugeMetricFamily(
            "pinwarden_audit_intruders",
            "threads, VM cgroups and IRQs that can run on a CPU leased to another holder",
            labels=["kind", "severity"])
        for kind in KIND_ORDER:
            n = sum(1 for i in report.intruders if i.kind == kind)
            intruders.add_metric([kind, SEVERITY[kind]], float(n))
        yield intruders
        checked = GaugeMetricFamily("pinwarden_audit_checked",
                                    "what the audit looked at", labels=["what"])
        for what, n in (("threads", report.threads), ("cgroups", report.cgroups),
                        ("irqs", report.irqs)):
            checked.add_metric([what], float(n))
        yield checked


def registry(snapshot: Snapshot) -> CollectorRegistry:
    """A fresh registry holding the snapshot's metrics only."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(snapshot))
    return reg


def render(snapshot: Snapshot, *, openmetrics_format: bool = False) -> bytes:
    """The Prometheus text exposition format (or OpenMetrics, ending in ``# EOF``)."""
    reg = registry(snapshot)
    if openmetrics_format:
        generate: Callable[[CollectorRegistry], bytes] = openmetrics.generate_latest  # untyped
        return generate(reg)
    return generate_latest(reg)


class LiveCollector:
    """A fresh :class:`Snapshot` at every scrape (the daemon's ``--metrics`` endpoint)."""

    def __init__(self, gather: Callable[[], Snapshot]) -> None:
        self.gather = gather

    def collect(self) -> Iterable[Metric]:
        return SnapshotCollector(self.gather()).collect()


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``:PORT`` (localhost) → (host, port); ``ValueError`` otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9848)")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve(address: str, gather: Callable[[], Snapshot]) -> tuple[str, int]:
    """Serve ``/metrics`` over HTTP at ``address`` in a background thread (prometheus_client's
    server), a fresh snapshot per scrape; returns the address bound (port 0: the one the
    kernel chose)."""
    from prometheus_client import start_http_server

    host, port = parse_address(address)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(LiveCollector(gather))
    server, _thread = start_http_server(port, addr=host, registry=reg)
    bound = server.server_address
    return str(bound[0]), int(bound[1])
