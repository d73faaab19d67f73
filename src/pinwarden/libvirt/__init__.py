"""libvirt adapters: ``pinwarden start/stop/define``, the libvirt hook and the event daemon.

* :mod:`.connect` — opening connections, reading domains into snapshots, error translation;
* :mod:`.context` — everything a command needs (config, host, ledger, cgroup backend);
* :mod:`.repin` — pure: which running shared domains must move off CPUs about to be leased;
* :mod:`.start` — start / stop / define (the orchestration, with rollback);
* :mod:`.hook` — the ``/etc/libvirt/hooks/{qemu,lxc}`` entry point and its installer;
* :mod:`.reconcile` — pure: (domains, leases) snapshot → actions, for the daemon;
* :mod:`.daemon` — the lifecycle-event loop that applies them;
* :mod:`.kernel` — reads the kernel's view (thread affinity, cgroups) to verify a start.

Nothing here imports the ``libvirt`` Python binding at module import time: the hook must
start fast and ``pinwarden --help`` must work without it.
"""
