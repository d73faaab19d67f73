"""Kernel enforcement: the desired cgroup layout (pure) and the backends that realise it.

* :mod:`~pinwarden.enforce.backend` — the backend protocol, state snapshots, primitive ops;
* :mod:`~pinwarden.enforce.names` — where the shared and the holder groups live (pure);
* :mod:`~pinwarden.enforce.layout` — desired layout and the ordered-ops planner (pure);
* :mod:`~pinwarden.enforce.apply` — transactional execution with rollback;
* :mod:`~pinwarden.enforce.v1`, ``v2``, ``systemd`` — real backends; ``fake`` — in memory;
* :mod:`~pinwarden.enforce.affinity` — per-thread ``sched_setaffinity``.
"""
