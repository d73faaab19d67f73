"""Errors a user can cause or meet.  Each carries a stable ``code`` for ``--json`` output.

The CLI turns every :class:`PinwardenError` into ``pinwarden: error: MESSAGE`` on stderr and
exit status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PinwardenError(Exception):
    """Base class: a one-line, user-facing message plus a machine-readable code."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class InputError(PinwardenError):
    """Malformed input: XML, CPU lists, configuration, command-line values."""

    code = "bad-input"


class HostError(PinwardenError):
    """The host cannot be read or does not look like a Linux host we understand."""

    code = "host"


class Refusal(PinwardenError):
    """A request that is well-formed but breaks a placement or exclusivity rule."""

    code = "refused"


class LedgerError(PinwardenError):
    """The lease database is unusable (corrupt, newer schema, unwritable)."""

    code = "ledger"


class EnforceError(PinwardenError):
    """The kernel (cgroups, affinity) refused a change; state was rolled back."""

    code = "enforce"


class LibvirtError(PinwardenError):
    """libvirt refused or failed an operation."""

    code = "libvirt"
