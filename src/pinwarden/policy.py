"""Placement policy: a pure function of (domain spec, host, current leases) → plan or refusal.

No I/O here.  See DEVELOPERS.md for the rule table.
"""

from __future__ import annotations

from collections.abc import Sequence

from pinwarden.domain import DomainSpec
from pinwarden.model import Lease, Plan
from pinwarden.partition import Host


def decide(spec: DomainSpec, host: Host, leases: Sequence[Lease], *,
           driver: str = "qemu") -> Plan:
    """Plan ``spec`` on ``host`` beside ``leases``, or raise :class:`~pinwarden.errors.Refusal`.

    Leases already held by the same holder (``driver``, ``spec.key``) are ignored, so
    re-planning a holder replaces its own leases.
    """
    raise NotImplementedError
