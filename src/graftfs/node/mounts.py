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
from graftfs.node.options import ConfigError, MountConfig

T = TypeVar("T")

#: What the kernel answers on a mount whose daemon is gone: ENOTCONN, or ECONNABORTED for
#: requests caught in the connection's teardown.
DEAD_MOUNT_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})

RUN_DIR = "/run/graftfs"
FSTYPE = "fuse.graftfs"

@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo: a mount, its filesystem, and its place in the tree
    (which mount it is: the id /proc/PID/fdinfo reports as mnt_id; which directory of its
    filesystem it shows: ``root``, "/" for a whole filesystem, the bound directory for a bind)."""

    mountpoint: str
    fstype: str
    source: str
    options: str  # per-mount options (ro, nodev, nosuid, ...)
    super_options: str  # filesystem options (user_id=, allow_other, ...)
    major_minor: str
    mount_id: int = 0
    parent_id: int = 0
    root: str = "/"


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
    """The mount table in the kernel's order (a mount after the one it sits on)."""
    entries = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            lf, rf = left.split(), right.split()
            if len(lf) < 6 or len(rf) < 3 or not (lf[0].isdigit() and lf[1].isdigit()):
                continue
            entries.append(MountEntry(_unescape(lf[4]), rf[0], _unescape(rf[1]), lf[5], rf[2], lf[2],
                                      int(lf[0]), int(lf[1]), _unescape(lf[3])))
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


def recorded_pid(mountpoint: str) -> int | None:
    """The pid of the daemon the mountpoint's runtime record names (alive or not), if any."""
    pid = (read_runtime(mountpoint) or {}).get("pid")
    return pid if isinstance(pid, int) else None


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


def mounts_below(mountpoint: str, table: list[MountEntry]) -> list[MountEntry]:
    """The mounts whose mount point lies inside ``mountpoint`` (not at it), in table order."""
    return [e for e in table if e.mountpoint.startswith(mountpoint.rstrip("/") + "/")]


@dataclass(frozen=True)
class MountUser:
    """A process holding a mount busy, and one way it does (enough to name it in one line)."""

    pid: int
    command: str
    how: str  # "cwd", "root", "fd 5", "mapped"
    path: str

    def describe(self) -> str:
        return f"{self.pid} {self.command}: {self.how} {self.path}"


def _fdinfo_mount_id(fdinfo: str) -> int | None:
    """The mount an open file belongs to, from its /proc fdinfo (never asks its filesystem)."""
    try:
        with open(fdinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _link_mount_id(link: str) -> int | None:
    """The mount a /proc magic link (cwd, root, map_files/...) points into.

    An O_PATH open of the link takes the kernel's reference as it is, without a lookup or an
    open on the target's filesystem, so a hung FUSE daemon cannot stall it.
    """
    try:
        fd = os.open(link, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _fdinfo_mount_id(f"/proc/self/fdinfo/{fd}")
    finally:
        os.close(fd)


def _mapped_under(pid: int, prefix: str) -> list[tuple[str, str]]:
    """(address range, path) of the files ``pid`` maps whose path lies below ``prefix``."""
    found = []
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith(prefix):
                    start, _, end = fields[0].partition("-")  # map_files/ names them unpadded
                    found.append((f"{int(start, 16):x}-{int(end, 16):x}", fields[5]))
    except (OSError, ValueError):
        pass
    return found


def _process_use(pid: int, mount_ids: frozenset[int], under: str) -> tuple[str, str] | None:
    """How ``pid`` holds one of ``mount_ids`` busy, if it does: (how, path)."""
    proc = f"/proc/{pid}"
    for how in ("cwd", "root"):
        if _link_mount_id(f"{proc}/{how}") in mount_ids:
            return how, _readlink(f"{proc}/{how}")
    try:
        fds = os.listdir(f"{proc}/fdinfo")
    except OSError:
        return None  # gone, or a process /proc does not let us see
    for fd in fds:
        if _fdinfo_mount_id(f"{proc}/fdinfo/{fd}") in mount_ids:
            return f"fd {fd}", _readlink(f"{proc}/fd/{fd}")
    # a file mapped after its descriptor was closed (an executable, a library): its path as this
    # process sees it narrows the candidates; its mount id decides (other namespaces have their own)
    for span, path in _mapped_under(pid, under.rstrip("/") + "/"):
        if _link_mount_id(f"{proc}/map_files/{span}") in mount_ids:
            return "mapped", path
    return None


def _readlink(link: str) -> str:
    try:
        return os.readlink(link)
    except OSError:
        return "?"


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def mount_users(mount_ids: frozenset[int], under: str) -> list[MountUser]:
    """The processes keeping any of ``mount_ids`` busy, by their working or root directory, an
    open file or a mapped file below ``under``.

    What umount(2) would answer EBUSY for, found before unmounting anything, and named by
    process rather than by a command whose output the operator must sift. Matched by mount id,
    read from /proc only: no request reaches the mounts' filesystems.
    """
    users = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        use = _process_use(int(name), mount_ids, under)
        if use is not None:
            users.append(MountUser(int(name), _command(int(name)), *use))
    return users


def check_mountable(cfg: MountConfig) -> None:
    """Refuse early, with one line, what would make the kernel mount fail."""
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise ConfigError("/dev/fuse is missing or not accessible (load the fuse module, run as root)")
    entry = find_mount(cfg.mountpoint)
    if entry is not None:
        raise ConfigError(f"mountpoint {cfg.mountpoint} is busy: {entry.fstype} from {entry.source} is mounted there")
