"""Errors a user can cause or meet.  Each carries a stable ``code`` for ``--json`` output.

The CLI turns every :class:`PinwardenError` into ``pinwarden: error: MESSAGE`` on stderr and
exit status 1; anything else is a bug, reported in one line as an internal error (exit 70).
"""

from __future__ import annotations

#: Longest quoted value in a message: hostile input (a 100,000-character ``<uuid>``) must not
#: turn a one-line error into a hundred kilobytes.
QUOTE_LIMIT = 64


def shorten(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters with the full
    length said: ``'aaaa…' (100000 characters)``."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


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

    def __init__(self, message: str, *, code: str | None = None,
                 partial: bool = False) -> None:
        super().__init__(message, code=code)
        #: The rollback failed too: the groups written hold neither what they had nor
        #: what was wanted.
        self.partial = partial


class LibvirtError(PinwardenError):
    """libvirt refused or failed an operation."""

    code = "libvirt"

    @classmethod
    def daemon_lost(cls, name: str, exc: BaseException) -> LibvirtError:
        """A start handed to the daemon whose answer never came.  The daemon owns the
        start once the request is sent: a lost answer is an error, never a second start."""
        return cls(f"the pinwarden daemon did not finish starting {name!r} ({exc}); "
                   f"'virsh domstate {name}' tells whether it runs", code="daemon-lost")


def state_dir_advice(exc: OSError) -> str:
    """What to do about ``exc`` on the state directory: running as root helps only where
    permission was denied (a read-only file system is read-only for root too: hunt)."""
    import errno

    if exc.errno in (errno.EACCES, errno.EPERM):
        return "run as root or choose another --state-dir"
    return "choose another --state-dir"
