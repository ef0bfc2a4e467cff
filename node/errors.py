"""Errors that cross the wire: raised on the master, re-raised in workers and clients.

They are pickled by class name, so both sides import them from here.
"""

from __future__ import annotations


class MasterUnavailable(ConnectionError):
    """The master cannot be reached, or the connection to it was lost mid-call."""


class RemoteError(RuntimeError):
    """The master failed unexpectedly while serving a call; the text is its traceback."""


class StorageError(RuntimeError):
    """The master's ledger could not be written (disk full, I/O error): the call changed
    nothing. The master keeps serving and recovers when the cause goes away."""


class RejectedJob(ValueError):
    """A submission the master refuses; the message says why and nothing was queued."""


class Incompatible(PermissionError):
    """A peer that speaks another protocol version."""
