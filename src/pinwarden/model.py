"""Value types shared by policy, ledger, enforcement and the adapters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pinwarden.cpuset import CpuSet, union
from pinwarden.record import field, record

#: Lease roles: ``vcpuN``, ``emulator``, ``iothreadN``, ``sibling-hold`` (a thread held
#: empty under the ``isolate`` thread policy), ``task`` (``pinwarden run``).
SIBLING_HOLD = "sibling-hold"


#: Kinds of holder keys: a key is ``KIND:VALUE`` and keys of different kinds never collide
#: (a domain named like another domain's UUID is a different holder).
KEY_UUID, KEY_NAME, KEY_JOB = "uuid", "name", "job"
JOB_DRIVER = "run"
VM_DRIVERS = ("qemu", "lxc")

#: The change-record keys of the user threads and kernel threads moved off leased CPUs
#: (:mod:`pinwarden.isolation`; their pid and start time follow), here for ``status``.
TASK_PREFIX = "task:"
KTHREAD_PREFIX = "kthread:"


@record
class HolderRef:
    """Who holds leases: a libvirt domain (driver ``qemu``/``lxc``) or a ``run`` job.

    Build it with :func:`domain_holder` or :func:`job_holder` — the one place that decides
    a holder's identity — never by hand."""

    driver: str  # "qemu", "lxc", "run"
    key: str  # "uuid:<uuid>" (domains with a UUID), "name:<name>" (without), "job:<name>"
    name: str  # human name (domain name, job name)

    @property
    def uuid(self) -> str | None:
        """The domain's UUID, when its identity is one."""
        kind, _, value = self.key.partition(":")
        return value if kind == KEY_UUID else None

    def describe(self) -> str:
        """``qemu domain 'web' (uuid 6f…)``: unambiguous where the name alone is not."""
        uuid = self.uuid
        return f"{self} (uuid {uuid})" if uuid else str(self)

    def __str__(self) -> str:
        return f"{self.driver} domain {self.name!r}" if self.driver != JOB_DRIVER \
            else f"job {self.name!r}"


def domain_holder(driver: str, name: str, uuid: str | None) -> HolderRef:
    """The identity of a libvirt domain: its UUID when it has one (libvirt always gives
    one; a bare XML file may not), else its name.  ``uuid`` must be canonical (lowercase,
    dashed), as :func:`pinwarden.domain.parse_domain` and libvirt give it."""
    if driver not in VM_DRIVERS:
        raise ValueError(f"unknown domain driver {driver!r}")
    return HolderRef(driver, f"{KEY_UUID}:{uuid}" if uuid else f"{KEY_NAME}:{name}", name)


def job_holder(name: str) -> HolderRef:
    """The identity of a ``pinwarden run`` job: its (unique) name."""
    return HolderRef(JOB_DRIVER, f"{KEY_JOB}:{name}", name)


#: The key kind of :func:`unrecorded_holder`.
KEY_GROUP = "group"


def unrecorded_holder(group: str, stem: str) -> HolderRef | None:
    """Who runs in holder group ``group`` (``STEM-vm-NAME.partition``: NAME is the domain's
    or job's name, or its UUID) when no record says it — the lease database lost or
    replaced while it ran; None when ``group`` is not named so."""
    kind, _, name = group.removeprefix(f"{stem}-").removesuffix(".partition").partition("-")
    driver = {"vm": "qemu", "lxc": "lxc", "run": JOB_DRIVER}.get(kind)
    if driver is None or not name or not group.startswith(f"{stem}-"):
        return None
    return HolderRef(driver, f"{KEY_GROUP}:{group}", name)


def is_unrecorded(holder: HolderRef) -> bool:
    """``holder`` comes from :func:`unrecorded_holder`."""
    return holder.key.startswith(f"{KEY_GROUP}:")


def driver_of_type(domain_type: str | None) -> str:
    """The libvirt driver of a domain XML's ``<domain type=…>``: ``lxc`` or ``qemu``."""
    return "lxc" if domain_type == "lxc" else "qemu"


#: The role of a CPU of a holder freed by a forced release while its processes run on in
#: its group (a ``kept:`` record): no lease, but a new plan keeps off it until they end.
KEPT_ROLE = "kept"


@record
class Lease:
    """One CPU leased exclusively to one holder."""

    cpu: int
    holder: HolderRef
    role: str
    created: float  # Unix time
    owner_pid: int | None = None  # process whose death frees the lease, where there is one


@record
class Plan:
    """Where every thread of one domain (or job) may run, and which CPUs it leases."""

    domain: str
    uuid: str | None
    exclusive: bool
    vcpus: Mapping[int, CpuSet]  # vCPU number -> allowed CPUs
    emulator: CpuSet
    iothreads: Mapping[int, CpuSet] = field(default_factory=dict)  # iothread id -> CPUs
    leases: Mapping[int, str] = field(default_factory=dict)  # cpu -> role (exclusive only)
    default_cpus: CpuSet | None = None  # <vcpu cpuset=...> for the whole domain, if set
    #: The NUMA nodes of the CPUs of a domain that asked numad to place it (``<vcpu
    #: placement='auto'>``), taken off numad: its ``<numatune><memory>`` goes there too, as
    #: numad's advice would (not stored: the render at start is its only use).
    memory_nodes: CpuSet | None = None
    notes: tuple[str, ...] = ()  # warnings to show the user (one line each)
    #: The holder's cgroup is an ``isolated`` partition (no scheduler load balancing) where
    #: the kernel has them: domains whose vCPUs are pinned one to one, jobs that ask.
    isolated: bool = False

    def cpus(self) -> CpuSet:
        """Every CPU any thread of the domain may run on."""
        return union([*self.vcpus.values(), self.emulator, *self.iothreads.values()])

    def leased(self) -> CpuSet:
        return CpuSet(frozenset(self.leases))

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "uuid": self.uuid,
            "exclusive": self.exclusive,
            "vcpus": {str(v): str(c) for v, c in sorted(self.vcpus.items())},
            "emulator": str(self.emulator),
            "iothreads": {str(i): str(c) for i, c in sorted(self.iothreads.items())},
            "leases": {str(cpu): role for cpu, role in sorted(self.leases.items())},
            "notes": list(self.notes),
            "isolated": self.isolated,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of :meth:`to_json` (which the ledger stores); an optional
        ``"default_cpus"`` key restores :attr:`default_cpus`.

        Raises ``ValueError`` (or a ``CpuSetError``) on data of the wrong shape.
        """
        def cpus(value: Any) -> CpuSet:
            if not isinstance(value, str):
                raise ValueError(f"CPU list must be a string, not {type(value).__name__}")
            return CpuSet.parse_kernel(value)

        def table(name: str) -> Mapping[str, Any]:
            value = data.get(name, {})
            if not isinstance(value, Mapping):
                raise ValueError(f"plan {name} must be an object")
            return value

        uuid = data.get("uuid")
        domain = data.get("domain")
        notes = data.get("notes", [])
        default = data.get("default_cpus")
        if not isinstance(domain, str) or not (uuid is None or isinstance(uuid, str)):
            raise ValueError("plan domain/uuid must be strings")
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise ValueError("plan notes must be a list of strings")
        leases: dict[int, str] = {}
        for cpu, role in table("leases").items():
            if not isinstance(role, str):
                raise ValueError(f"plan lease role for CPU {cpu} must be a string")
            leases[int(cpu)] = role
        return cls(
            domain=domain,
            uuid=uuid,
            exclusive=bool(data.get("exclusive", False)),
            vcpus={int(v): cpus(c) for v, c in table("vcpus").items()},
            emulator=cpus(data.get("emulator", "")),
            iothreads={int(i): cpus(c) for i, c in table("iothreads").items()},
            leases=leases,
            default_cpus=None if default is None else cpus(default),
            notes=tuple(notes),
            isolated=data.get("isolated") is True,
        )


def command_line(command: str, operand: str, *options: str) -> str:
    """A command a message advises, working as typed: ``pinwarden stop 'my vm'`` —
    ``operand`` quoted for the shell, after ``--`` where it would read as an option."""
    import shlex  # only when a message needs it: model is on every command's path

    word = shlex.quote(operand)
    if operand.startswith("-"):
        return " ".join((command, *options, "--", word))
    return " ".join((command, word, *options))


def by_holder(leases: Iterable[Lease]) -> dict[HolderRef, list[Lease]]:
    """``leases`` grouped by holder, in the order each holder first appears."""
    out: dict[HolderRef, list[Lease]] = {}
    for lease in leases:
        out.setdefault(lease.holder, []).append(lease)
    return out


def stop_command(holder: HolderRef, pid: int | None) -> str:
    """The command that ends ``holder``, whose process ``pid`` runs: its leases go with it
    (``pinwarden release`` refuses a running holder).  A domain name the terminal would not
    show as typed is replaced by its UUID, which ``virsh`` takes."""
    unprintable = holder.uuid is not None and not holder.name.isprintable()
    if holder.driver == "qemu":
        return f"virsh destroy {holder.uuid}" if unprintable \
            else command_line("pinwarden stop", holder.name)
    if holder.driver == "lxc":
        return f"virsh -c lxc:/// destroy {holder.uuid}" if unprintable \
            else command_line("virsh -c lxc:/// destroy", holder.name)
    return f"kill {pid}" if pid is not None else "end its process"


def kept_why(holder: HolderRef) -> str:
    """Why ``holder`` keeps CPUs without a lease, in a few words."""
    return ("it runs in its holder group, which the lease database does not record"
            if is_unrecorded(holder) else "released with --force, it still runs there")


def kept_text(holder: HolderRef, cpus: CpuSet, pid: int | None) -> str:
    """What ``status`` and ``audit`` say of CPUs kept by ``holder`` without a lease (role
    :data:`KEPT_ROLE`): a forced release while it ran, or a holder group the lease
    database does not record (:func:`unrecorded_holder`)."""
    if is_unrecorded(holder):
        group = holder.key.partition(":")[2]
        stop = (f"virsh{' -c lxc:///' if holder.driver == 'lxc' else ''} destroy "
                f"{holder.name}" if holder.driver != JOB_DRIVER else f"kill {pid}")
        return (f"{cpus.named()} held by {holder} in its holder group {group}, pid {pid}, "
                f"which the lease database does not record (lost or replaced while it ran, "
                f"or another state directory): no plan takes them; put the database back, "
                f"or '{stop}' frees them")
    return (f"{cpus.named()} kept by {holder} after 'release --force': pid {pid} still runs "
            f"there ('{stop_command(holder, pid)}' frees it)")


def release_command(holder: HolderRef) -> str:
    """The command that frees ``holder``: ``pinwarden release 'my vm' --driver qemu`` (a
    job and a domain may share a name).  A name the terminal would not show as typed is
    replaced by the domain's UUID."""
    if holder.uuid is not None and not holder.name.isprintable():
        return f"pinwarden release {holder.uuid}"
    return command_line("pinwarden release", holder.name, "--driver", holder.driver)
