"""Unit tests for syncbit.errors: the error tree, exit codes, rebuilding and group collapsing."""

from __future__ import annotations

import pytest
import trio

from syncbit import errors as E


@pytest.mark.parametrize(
    "cls,builtin",
    [
        (E.ConfigError, ValueError),
        (E.SourceNotFound, FileNotFoundError),
        (E.AccessDenied, PermissionError),
        (E.HostileName, ValueError),
        (E.UnknownScheme, ValueError),
        (E.MalformedURI, ValueError),
        (E.AgentNotRunning, ConnectionError),
        (E.CacheFull, OSError),
        (E.DatasetNotFound, LookupError),
        (E.FetchFailed, OSError),
        (E.MountError, OSError),
    ],
)
def test_errors_inherit_the_matching_builtin(cls, builtin):
    assert issubclass(cls, E.SyncbitError) and issubclass(cls, builtin)


def test_every_error_has_a_nonzero_exit_code():
    for cls in [E.SyncbitError, *E._subclasses(E.SyncbitError)]:
        assert isinstance(cls.exit_code, int) and cls.exit_code > 0, cls


def test_error_from_dict_rebuilds_known_errors():
    e = E.error_from_dict({"error": "SourceNotFound", "message": "no such file"})
    assert type(e) is E.SourceNotFound and str(e) == "no such file" and e.exit_code == 6


def test_error_from_dict_with_unknown_or_hostile_names():
    # A peer/agent naming a class that is not a SyncbitError (a builtin, or nothing at all).
    for name in ("SystemExit", "KeyboardInterrupt", "object", "", "NoSuchError"):
        e = E.error_from_dict({"error": name, "message": "m"})
        assert type(e) is E.SyncbitError
    assert str(E.error_from_dict({})) == "unknown error"


def test_unwrap_group_prefers_a_syncbit_error():
    inner = E.SourceChanged("changed")
    group = BaseExceptionGroup("g", [RuntimeError("x"), ExceptionGroup("h", [inner])])
    assert E.unwrap_group(group) is inner
    assert isinstance(E.unwrap_group(ExceptionGroup("g", [KeyError("k")])), KeyError)
    plain = ValueError("v")
    assert E.unwrap_group(plain) is plain


async def test_collapse_groups_turns_a_nursery_failure_into_its_cause():
    async def fail():
        raise E.SourceNotFound("gone")

    with pytest.raises(E.SourceNotFound):
        with E.collapse_groups():
            async with trio.open_nursery() as n:
                n.start_soon(fail)
                n.start_soon(trio.sleep_forever)


def test_collapse_groups_leaves_other_errors_alone():
    with pytest.raises(KeyError):
        with E.collapse_groups():
            raise KeyError("k")
    with E.collapse_groups():
        pass
