"""The systemd host lab: real Debian systems (systemd as PID 1, libvirtd as a unit,
systemd-machined) booted with virtme-ng, one boot per suite per pytest session.

* :mod:`syslab.rootfs` builds and caches the root file systems (mmdebstrap → ext4 image);
* :mod:`syslab.vm` boots one (a throw-away qcow2 overlay over the cached image), installs
  pinwarden in it from a wheel and runs ``guest/run.py``; ``lab_run(suite)`` is cached;
* ``guest/`` runs inside the guest (the distribution's Python): ``guestlab.py`` is the check
  framework and helpers, ``checks_*.py`` the checks; each records observations as JSON;
* ``tests/test_syslab.py`` asserts on them.  FACTS.md is what the lab established.
"""
