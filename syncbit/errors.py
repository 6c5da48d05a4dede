"""The error tree.

Every error a user can meet is a ``SyncbitError``; the CLI prints it as one
line and exits with its ``exit_code``. Subclasses also inherit the matching
builtin so that callers which only know the builtins still do the right thing.
Third-party errors are translated where they leave a source or a client.
Exit codes are part of the CLI contract (docs/cli.md).
"""

from __future__ import annotations

import errno
from contextlib import contextmanager


class SyncbitError(Exception):
    exit_code = 1


class ConfigError(SyncbitError, ValueError):
    exit_code = 2


class SourceError(SyncbitError):
    """A source could not list or serve bytes."""

    exit_code = 3


class UnknownScheme(SourceError, ValueError):
    exit_code = 4


class MalformedURI(SourceError, ValueError):
    exit_code = 5


class SourceNotFound(SourceError, FileNotFoundError):
    exit_code = 6


class AccessDenied(SourceError, PermissionError):
    exit_code = 7


class SourceChanged(SourceError):
    """The source no longer matches the pinned snapshot."""

    exit_code = 8


class DigestMismatch(SourceChanged):
    """A complete file does not match the whole-file digest its source gave."""


class RevisionNotFound(SourceError, LookupError):
    """The revision (branch, tag, commit) asked for does not exist at the source."""

    exit_code = 17


class WaitTimeout(SyncbitError, TimeoutError):
    """``syncbit wait`` gave up before the dataset was ready."""

    exit_code = 18


class ServerUnreachable(SyncbitError, ConnectionError):
    """The control plane did not answer."""

    exit_code = 19


class HostileName(SourceError, ValueError):
    """A source listed a name that would escape the dataset root."""

    exit_code = 9


class TemporarySourceError(SourceError):
    """A failure worth retrying (5xx, reset connection, short body)."""

    exit_code = 3


class AgentNotRunning(SyncbitError, ConnectionError):
    exit_code = 10


class AgentAlreadyRunning(SyncbitError):
    exit_code = 11


class CacheFull(SyncbitError, OSError):
    exit_code = 12


class DatasetNotFound(SyncbitError, LookupError):
    exit_code = 13


class FetchFailed(SyncbitError, OSError):
    """A block could not be fetched before the retry deadline."""

    exit_code = 14


class BlockCorrupt(SyncbitError):
    """Bytes did not match the block id they were expected to have."""

    exit_code = 14


class DatasetFailed(SyncbitError):
    """A pull ended in the failed state."""

    exit_code = 15


class MountError(SyncbitError, OSError):
    exit_code = 16


def error_from_dict(d: dict) -> SyncbitError:
    """Rebuild an error sent by the agent's API (``{"error": name, "message": ..}``)."""
    cls = _BY_NAME.get(d.get("error", ""), SyncbitError)
    return cls(d.get("message", "unknown error"))


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


_BY_NAME = {c.__name__: c for c in _subclasses(SyncbitError)}
_BY_NAME["SyncbitError"] = SyncbitError


def unwrap_group(error: BaseException) -> BaseException:
    """The error to report from a nursery's ExceptionGroup: the first SyncbitError, else the first leaf."""
    if not isinstance(error, BaseExceptionGroup):
        return error
    leaves = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(error)
    return next((e for e in leaves if isinstance(e, SyncbitError)), leaves[0])


class collapse_groups:
    """Context manager: re-raise a nursery's ExceptionGroup as its most telling single error.

    Sibling tasks of a nursery fail together for one cause; callers and users
    want that cause (SourceNotFound, SourceChanged), not a group.
    """

    def __enter__(self):
        return self

    def __exit__(self, typ, value, tb):
        if isinstance(value, BaseExceptionGroup):
            err = unwrap_group(value)
            if isinstance(err, Exception) and not isinstance(err, BaseExceptionGroup):
                raise err from value
        return False


@contextmanager
def cache_full_on_enospc(message: str):
    """Re-raise a full disk or quota (ENOSPC, EDQUOT) as CacheFull(message): the cache's error, never retried."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(e, CacheFull):
            raise CacheFull(message) from e
        raise
