"""Mountpoint housekeeping: stale FUSE mounts, the kernel readahead window."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import threading

from ..errors import MountError

log = logging.getLogger(__name__)


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entry(mountpoint: str) -> tuple[str, str, str] | None:
    """(major:minor, fstype, root within its filesystem) of the top mount at ``mountpoint``, from mountinfo."""
    target = os.path.realpath(mountpoint) if os.path.exists(mountpoint) else os.path.abspath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and _unescape(fields[4]) in (target, os.path.abspath(mountpoint)):
                    found = (fields[2], right.split()[0], _unescape(fields[3]))  # the last one is on top
    except OSError:
        return None
    return found


def is_stale(mountpoint: str) -> bool:
    # statfs always goes to the FUSE process; a stat may be answered from the
    # kernel's attribute cache for a while after that process died.
    try:
        os.statvfs(mountpoint)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def _fuse_state(mountpoint: str, timeout: float = 5.0) -> str:
    """'dead' (its process is gone: ENOTCONN), 'alive' (something answers) or 'hung' (no answer in time).

    The stat runs in a daemon thread: on a mount whose process is alive but
    stuck it never returns, and must not hold up the start for ever.
    """
    result: list[str] = []

    def probe() -> None:
        result.append("dead" if is_stale(mountpoint) else "alive")

    t = threading.Thread(target=probe, name="stale-mount-probe", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else "hung"


def cleanup_stale_mount(mountpoint: str) -> bool:
    """Unmount a FUSE mount left by a crashed agent. Returns True if it did."""
    entry = mount_entry(mountpoint)
    if entry is None and not is_stale(mountpoint):
        return False
    if entry is not None and not entry[1].startswith("fuse"):
        if entry[2] != "/":
            # A bind mount of a directory: what a Kubernetes hostPath volume (the
            # DaemonSet's /datasets, Bidirectional) is inside the agent's container.
            return False
        raise MountError(f"{mountpoint} is already a {entry[1]} mount; refusing to mount over it")
    if entry is not None:
        # Only a mount whose process is gone is stale: a live one belongs to
        # another agent (another socket and cache), which must keep serving.
        state = _fuse_state(mountpoint)
        if state == "alive":
            raise MountError(f"{mountpoint} is a live FUSE mount of another process ({entry[1]}); "
                             "refusing to mount over it")
        if state == "hung":
            raise MountError(f"{mountpoint} is a FUSE mount whose process does not answer; stop that process "
                             f"or run 'fusermount3 -u -z {mountpoint}'")
    log.warning("cleaning up a stale mount at %s left by an earlier agent", mountpoint)
    for cmd in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        if shutil.which(cmd[0]) is None:
            continue
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return True
    if mount_entry(mountpoint) is None and not is_stale(mountpoint):
        return True
    raise MountError(f"cannot unmount the stale mount at {mountpoint}; run 'fusermount3 -u -z {mountpoint}'")


def raise_kernel_readahead(mountpoint: str, kb: int) -> None:
    """Raise the FUSE mount's readahead window (the kernel keeps 128 KiB otherwise).

    Reads mountinfo rather than stat()ing the mountpoint: a stat from the
    process serving the mount would wait on itself.
    """
    entry = mount_entry(mountpoint)
    if entry is None or kb <= 0:
        return
    path = f"/sys/class/bdi/{entry[0]}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
        log.debug("set %s to %d", path, kb)
    except OSError as e:
        log.info("cannot raise the kernel readahead window (%s): %s", path, e.strerror)
