"""pinwarden's allocator benchmark: pinwarden vs Nova's real code vs a Kubernetes baseline.

Run through ``make bench-quick`` / ``make bench`` (see bench/README.md).  Only
:mod:`pwbench.nova_adapter` needs Nova; everything else runs in the project's own venv, so
the harness's correctness tests (tests/test_bench_harness.py) need no Nova.
"""
