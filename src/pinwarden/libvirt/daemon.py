"""``pinwarden daemon``: follow libvirt's lifecycle events and reconcile (the I/O adapter).

The decisions are :func:`pinwarden.libvirt.reconcile.reconcile`'s; this module only reads
snapshots, applies the actions and keeps a connection: libvirt's default event loop runs
in a thread, a lifecycle or tunable (vcpupin) event or a timer wakes the main loop, and a
lost connection (libvirtd restarted) is re-opened with exponential backoff.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from typing import Any

from pinwarden import procs
from pinwarden.cpuset import CpuSet
from pinwarden.errors import PinwardenError
from pinwarden.libvirt import connect as lv
from pinwarden.libvirt import pins
from pinwarden.libvirt.reconcile import Adopt, Drift, Free, Place, Report, reconcile
from pinwarden.libvirt.uri import check_uri
from pinwarden.manager import Manager
from pinwarden.record import record

log = logging.getLogger("pinwarden.daemon")

MAX_BACKOFF = 60.0
_LOST = "connection-lost"
_EVENT = "event"
_CGROUP = "cgroup"
#: The first pause after a failed sync before a cgroup event wakes the next pass.
FAILING_PAUSE = 1.0


@record(frozen=False)
class _Failing:
    """The syncs failing now: the last one's message (said once) and how many failed in a
    row.  A failing sync's own writes and rollback wake the cgroup watch: a layout the
    kernel cannot take (a leased CPU offline) was tried, rolled back and logged every few
    seconds (systemd-lab hunt).  But a cgroup event that finds the sync failing cannot
    wait for the interval either: a cgroup made at the root and given every CPU while a
    pass ran makes that pass fail (the holder partition it breaks is checked after the
    escapes were), and the next cgroup event must close the escape (the bookworm story
    waited 30 s).  So a cgroup event wakes the next pass :data:`FAILING_PAUSE` seconds
    later, twice as late after each failed pass, up to the interval."""

    message: str | None = None
    passes: int = 0

    def pause(self, longest: float) -> float:
        return min(longest, FAILING_PAUSE * 2.0 ** min(max(self.passes - 1, 0), 30))


_FAILING = _Failing()


def reconcile_once(manager: Manager, conn: Any, *, restore: bool,
                   seen: set[str] | None = None) -> int:
    """One full pass; returns the number of actions taken or reported.  ``seen``: problems
    reported by earlier passes, not repeated (the set is updated)."""
    seen = set() if seen is None else seen
    reported: set[str] = set()
    domains = lv.list_domains(conn, active_only=True)
    _reap(manager)
    # only the holders of the connection's driver: the domains of another (containers,
    # for a daemon on qemu:///system) are not in the listing, and not gone
    actions = reconcile(domains, manager.holders(), manager.libvirt_partition,
                        now=time.time(), drivers=(lv.driver_of(str(conn.getURI())),),
                        vm_cpus=_vm_cpus(manager))
    driver = lv.driver_of(str(conn.getURI()))
    elsewhere = lv.out_of_view(driver, [d.name for d in domains if d.driver == driver])
    if elsewhere is not None:
        # their threads read as none here: adopting, placing and drift were all wrong (a
        # daemon in a container "placed" a shared domain's emulator on every pass: hunt)
        why = (f"libvirt's processes are out of this daemon's PID namespace view (domain "
               f"{elsewhere[0]!r} runs as pid {elsewhere[1]} where libvirtd runs): it only "
               f"frees the leases of domains that end; run 'pinwarden daemon' where "
               f"libvirtd runs")
        reported.add(why)
        if why not in seen:
            log.warning("%s", why)
        actions = [a for a in actions if isinstance(a, Free)]
    for action in actions:
        try:
            if isinstance(action, Free):
                manager.drop(action.holder)
                log.info("freed the leases of %s: %s", action.holder, action.reason)
            elif isinstance(action, Adopt):
                _adopt(manager, action)
            elif isinstance(action, Place):
                _place(manager, action)
            elif isinstance(action, Report):
                reported.add(action.message)
                if action.message not in seen:
                    log.warning("%s", action.message)
            elif isinstance(action, Drift):
                if (restore or action.unpinned) and action.repin.after:
                    with pins.locked(manager):
                        if action.narrows:  # recorded first: a kill in between (hunt)
                            pins.note_moves(manager, [action.repin])
                        lv.apply_repin(conn, action.repin)
                    log.warning("restored %s (%s)", action.repin, action.reason)
                else:
                    reported.add(action.reason)
                    if action.reason not in seen:
                        log.warning("drift: %s", action.reason)
        except PinwardenError as exc:
            log.error("%s", exc.message)
    _sync(manager)  # a layout changed behind pinwarden's back is put back
    for attempt in (1, 2) if elsewhere is None else ():
        try:  # pins pinwarden narrowed get back the CPUs no longer leased
            for move in pins.give_back(manager, conn, place=False):  # (placed above)
                log.info("gave back %s", move)
            break
        except PinwardenError as exc:
            if attempt == 2:
                log.error("%s", exc.message)
            else:  # a lease this daemon's hook server freed meanwhile, in another thread,
                _sync(manager)  # may not have widened its cgroups yet: again after a sync
    seen.clear()
    seen.update(reported)
    return len(actions)


def _vm_cpus(manager: Manager) -> CpuSet | None:
    """The host's online VM CPUs (None: the host cannot be read; logged by the sync)."""
    try:
        host = manager.host()
    except PinwardenError:
        return None
    return host.partition.vm_cpus & host.topology.online


def _place(manager: Manager, action: Place) -> None:
    """Give a shared domain's threads without CPUs of their own its default placement, as
    the hook did at its start (the threads' own affinity; libvirt's XML is left alone)."""
    from pinwarden.libvirt.place import place_default

    dom = action.domain
    if dom.live is None:
        return
    with pins.locked(manager):  # (its placement narrowed by leases is recorded)
        cpus = place_default(manager, dom.name, dom.live)
    if cpus is not None:
        log.info("placed %s %s on %s: %s", dom.name, ", ".join(action.threads), cpus.named(),
                 action.reason)


def _adopt(manager: Manager, action: Adopt) -> None:
    dom = action.domain
    spec = dom.live
    if spec is None:
        log.error("cannot adopt %s: %s", dom.name, dom.problem or "no live XML")
        return
    if dom.pid is None:  # no process known (yet): an ownerless lease would outlive the
        return           # domain; a later pass adopts it
    try:
        reserved = manager.reserve_request(spec, holder=dom.holder, owner_pid=dom.pid)
    except PinwardenError:
        if procs.start_time(dom.pid) is not None:
            raise
        # stopped between the listing and now: nothing to adopt (the ledger refuses an
        # owner that has exited; a reservation that failed is undone whole)
        log.info("did not adopt %s: it stopped meanwhile", dom.name)
        return
    log.info("adopted running exclusive domain %s (CPUs %s)", dom.name,
             reserved.plan.leased())


def main(manager: Manager, uri: str, *, interval: float = 30.0, restore: bool = False,
         once: bool = False, verbose: bool = False) -> int:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    manager.warn = log.warning
    # a URI it could never work through ends the daemon at once, not in a retry loop
    check_uri(uri, root=os.geteuid() == 0)
    b = lv.binding()
    if once:
        conn = lv.open_connection(uri)
        try:
            reconcile_once(manager, conn, restore=restore)
        finally:
            conn.close()
        return 0
    stop = threading.Event()
    wake: queue.Queue[str] = queue.Queue()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()
        wake.put("stop")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from pinwarden.libvirt import hookserver

    server = hookserver.serve(manager)  # (one daemon a state directory: cli.vm's lock)
    try:
        return _run(manager, uri, b, stop, wake, interval=interval, restore=restore)
    finally:
        if server is not None:
            server.close()


def _run(manager: Manager, uri: str, b: Any, stop: threading.Event,
         wake: queue.Queue[str], *, interval: float, restore: bool) -> int:
    b.virEventRegisterDefaultImpl()
    loop = threading.Thread(target=_event_loop, args=(b, stop), name="libvirt-events",
                            daemon=True)
    loop.start()
    _start_cgroup_watch(manager, wake, stop)
    backoff = 1.0
    while not stop.is_set():
        try:
            conn = lv.open_connection(uri)
        except PinwardenError as exc:
            if exc.code == "uri":  # an alias libvirt resolved to a URI it cannot use
                raise
            log.warning("%s; retrying in %.0f s", exc.message, backoff)
            _wait_without_libvirt(manager, wake, stop, backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            continue
        backoff = 1.0
        log.info("connected to %s", uri)
        try:
            _serve(manager, uri, conn, b, wake, stop, interval=interval, restore=restore)
        finally:
            with contextlib.suppress(Exception):
                conn.close()
    log.info("stopped")
    return 0


def _start_cgroup_watch(manager: Manager, wake: queue.Queue[str],
                        stop: threading.Event) -> None:
    """On cgroup v2, watch the cgroup root (inotify), where the holder groups live: a cgroup that
    writes leased CPUs into its ``cpuset.cpus`` takes them from the holders' partitions
    (issue #14); every such event wakes the main loop, whose sync narrows it back within
    milliseconds."""
    from pinwarden.enforce.watch import CgroupWatcher
    from pinwarden.mounts import read_mounts

    try:
        if manager.backend().kind not in ("v2", "systemd"):
            return
        mount = read_mounts(manager.root).v2
        if mount is None:
            return
        from pinwarden.enforce.backend import kernel_path

        names = manager.names()  # the holders live beside the shared group
        watcher = CgroupWatcher(mount, tuple(dict.fromkeys(
            ("", kernel_path(manager.backend(), names.parent)))))
    except (PinwardenError, OSError, ValueError) as exc:
        log.warning("cannot watch the cgroup tree for escapes: %s",
                    getattr(exc, "message", exc))
        return

    def run() -> None:
        with watcher:
            while not stop.is_set():
                try:
                    if watcher.poll(timeout=1.0):
                        wake.put(_CGROUP)
                except OSError as exc:
                    log.error("cgroup watch stopped: %s", exc)
                    return

    threading.Thread(target=run, name="cgroup-watch", daemon=True).start()
    log.info("watching %s for cgroups that reach leased CPUs", mount)


def _reap(manager: Manager) -> None:
    for freed in manager.reap():  # owner process gone: the domain (or job) died
        log.info("freed the leases of %s: its process %s exited", freed.ref,
                 freed.owner_pid)


def _sync(manager: Manager) -> None:
    """Reap (logged), then make the kernel match the ledger; what that changed is logged:
    the layout was changed behind pinwarden's back (an operator, another tool), which the
    operator should know even though it is put back."""
    from pinwarden.enforce.backend import describe

    try:
        _reap(manager)
        result = manager.sync()
    except PinwardenError as exc:
        again = exc.message == _FAILING.message
        (log.debug if again else log.error)("cannot enforce the cgroup layout: %s%s",
                                            exc.message, "" if again else
                                            " (said once; tried again at each libvirt "
                                            "event, at cgroup changes less and less often, "
                                            "and every interval)")
        _FAILING.message = exc.message
        _FAILING.passes += 1
        return
    if _FAILING.message is not None:
        log.info("the cgroup layout is enforced again")
    _FAILING.message, _FAILING.passes = None, 0
    if result is not None and result.ops:
        log.warning("put the cgroup layout back (changed since pinwarden set it): %s",
                    "; ".join(describe(op) for op in result.ops))


def _wait_without_libvirt(manager: Manager, wake: queue.Queue[str], stop: threading.Event,
                          seconds: float) -> None:
    """Wait for libvirt to come back, still answering cgroup events; a wait that no event
    ended in a pass ends in one, which frees the holders that died meanwhile (jobs need no
    libvirt, and a domain whose QEMU died holds nothing; they waited for libvirtd before:
    systemd lab hunt).  A failing pass is so tried again no sooner than the connection
    (the waits double up to a minute), or after its pause at a cgroup event."""
    deadline = time.monotonic() + seconds
    synced = False
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        try:
            what = wake.get(timeout=left)
        except queue.Empty:
            break
        if what == _CGROUP:
            if _FAILING.message is not None:
                _past_cgroup_events(wake, stop, min(left, _FAILING.pause(MAX_BACKOFF)))
            _sync(manager)
            synced = True
    if not synced and not stop.is_set():
        _sync(manager)


def _past_cgroup_events(wake: queue.Queue[str], stop: threading.Event,
                        seconds: float) -> str:
    """Wait up to ``seconds`` for a wake that is not a cgroup event (which it returns),
    swallowing cgroup events meanwhile; :data:`_CGROUP` when the time is up."""
    deadline = time.monotonic() + seconds
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        try:
            what = wake.get(timeout=left)
        except queue.Empty:
            break
        if what != _CGROUP:
            return what
    return _CGROUP


def _event_loop(b: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        b.virEventRunDefaultImpl()


def _serve(manager: Manager, uri: str, conn: Any, b: Any, wake: queue.Queue[str],
           stop: threading.Event, *, interval: float, restore: bool) -> None:
    def on_lifecycle(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        log.debug("lifecycle event %s/%s of %s", event, detail, dom.name())
        wake.put(_EVENT)

    def on_tunable(_conn: Any, dom: Any, params: Any, _opaque: Any) -> None:
        log.debug("tunable event of %s: %s", dom.name(), params)
        wake.put(_EVENT)

    def on_close(_conn: Any, reason: int, _opaque: Any) -> None:
        wake.put(_LOST)

    conn.registerCloseCallback(on_close, None)
    conn.setKeepAlive(5, 3)
    ids = [conn.domainEventRegisterAny(None, b.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle,
                                       None),
           conn.domainEventRegisterAny(None, b.VIR_DOMAIN_EVENT_ID_TUNABLE, on_tunable, None)]
    seen: set[str] = set()
    try:
        while not stop.is_set():
            try:
                reconcile_once(manager, conn, restore=restore, seen=seen)
            except PinwardenError as exc:
                log.error("%s", exc.message)
                if not conn.isAlive():
                    return
            try:
                what = wake.get(timeout=interval)
            except queue.Empty:
                continue
            while not wake.empty():  # coalesce bursts of events
                more = wake.get_nowait()
                what = _LOST if more == _LOST else what
            if what == _CGROUP and _FAILING.message is not None:
                what = _past_cgroup_events(wake, stop, _FAILING.pause(interval))
            if what == _LOST or not conn.isAlive():
                log.warning("lost the connection to %s; reconnecting", uri)
                return
    finally:
        for cb in ids:
            with contextlib.suppress(Exception):
                conn.domainEventDeregisterAny(cb)
