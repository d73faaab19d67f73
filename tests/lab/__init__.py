"""The virtme-ng kernel test lab: one VM boot per pytest session (see DEVELOPERS.md).

:mod:`lab.vm` boots the VM on the host side; :mod:`lab.in_vm` runs inside it and records
observations as JSON; ``tests/test_lab_*.py`` assert on them.
"""
