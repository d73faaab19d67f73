"""pinwarden: exclusive physical CPUs for virtual machines and processes on Linux hosts."""

__version__ = "0.1.0"
