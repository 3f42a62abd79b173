"""The machine's mount table and the calls that change it (for mount, umount and status).

Kept apart from the daemon so the CLI can inspect and clear mounts, including dead ones whose
daemon is gone ("Transport endpoint is not connected"), without importing pyfuse3.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from graftfs.format.atomic import write_file_atomically

T = TypeVar("T")

#: What the kernel answers on a mount whose daemon is gone: ENOTCONN, or ECONNABORTED for
#: requests caught in the connection's teardown.
DEAD_MOUNT_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})

RUN_DIR = "/run/graftfs"
FSTYPE = "fuse.graftfs"

@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    options: str  # per-mount options (ro, nodev, nosuid, ...)
    super_options: str  # filesystem options (user_id=, allow_other, ...)
    major_minor: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table(mountinfo: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            lf, rf = left.split(), right.split()
            if len(lf) < 6 or len(rf) < 3:
                continue
            entries.append(MountEntry(_unescape(lf[4]), rf[0], _unescape(rf[1]), lf[5], rf[2], lf[2]))
    return entries


def find_mount(mountpoint: str) -> MountEntry | None:
    """The topmost mount at ``mountpoint`` (absolute path, symlinks resolved), if any."""
    found = None
    for entry in mount_table():
        if entry.mountpoint == mountpoint:
            found = entry
    return found


def canonical(path: str) -> str:
    """An absolute, symlink-free path without touching a possibly dead mount at its end."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name)


def runtime_file(mountpoint: str) -> str:
    """Where the daemon serving ``mountpoint`` records its pid (readable even when it hangs)."""
    digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
    return os.path.join(RUN_DIR, f"{digest}.json")


def write_runtime(mountpoint: str, info: dict[str, object]) -> None:
    """Record the daemon's pid; only root may write here (umount signals that pid)."""
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    os.chmod(RUN_DIR, 0o755)
    path = runtime_file(mountpoint)
    write_file_atomically(path, json.dumps(info), sync=False)  # /run is memory: nothing to make durable


def read_runtime(mountpoint: str) -> dict[str, object] | None:
    try:
        with open(runtime_file(mountpoint), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_runtime(mountpoint: str, pid: int | None = None) -> None:
    """Remove the runtime record (only our own when ``pid`` is given)."""
    info = read_runtime(mountpoint)
    if pid is not None and info is not None and info.get("pid") != pid:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(runtime_file(mountpoint))


def is_graftfs_daemon(pid: int) -> bool:
    """True when ``pid`` is a live graftfs daemon (pids are reused after a crash)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return pid_alive(pid) and b"graftfs" in b" ".join(argv) and b"mount" in argv


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def call_with_timeout(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Call ``fn`` (a syscall on a mount that may hang) in a daemon thread, bounded in time.

    A thread stuck in a FUSE request cannot be interrupted; it is left behind (the process can
    still exit) and the caller gets ETIMEDOUT instead of hanging with it.
    """
    result: dict[str, object] = {}

    def call() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:
            result["error"] = e

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise OSError(errno.ETIMEDOUT, f"{what} did not answer within {timeout:g} s")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]
