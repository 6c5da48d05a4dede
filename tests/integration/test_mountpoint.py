"""What the agent finds at its mountpoint before it mounts: real mounts, made and removed here (root)."""

from __future__ import annotations

import subprocess

import pytest

from syncbit.agent.mountpoint import cleanup_stale_mount, mount_entry
from syncbit.errors import MountError


@pytest.fixture
def mounts():
    made: list[str] = []

    def mount(*args: str) -> None:
        subprocess.run(["mount", *args], check=True)
        made.append(args[-1])

    yield mount
    for target in reversed(made):
        subprocess.run(["umount", "-l", target], capture_output=True)


def test_a_filesystem_mounted_there_is_refused_but_a_bind_mounted_directory_is_used(tmp_path, mounts):
    """A tmpfs (a filesystem's root) is someone's data: refused. A bind mount of a directory is
    what a Kubernetes hostPath volume is inside the agent's container: mounted over, as before."""
    fs = tmp_path / "fs"
    fs.mkdir()
    mounts("-t", "tmpfs", "tmpfs", str(fs))
    assert mount_entry(str(fs))[1:] == ("tmpfs", "/")
    with pytest.raises(MountError, match="already a tmpfs mount"):
        cleanup_stale_mount(str(fs))

    host_dir = tmp_path / "host-datasets"
    host_dir.mkdir()
    mounts("--bind", str(host_dir), str(host_dir))
    root = mount_entry(str(host_dir))[2]
    assert root.endswith("/host-datasets")
    assert cleanup_stale_mount(str(host_dir)) is False  # nothing to clean; the agent mounts over it

    plain = tmp_path / "plain"
    plain.mkdir()
    assert mount_entry(str(plain)) is None and cleanup_stale_mount(str(plain)) is False
