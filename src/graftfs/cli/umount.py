"""graftfs umount: unmount and wait for the daemon to exit; also clears dead mounts.

A graph directory does not stay alone at its mount point. graftfs binds the runtime's hot files
over its own view (graftfs.node.binds), and containers/storage's overlay driver makes its home a
private mount point by binding ``GRAPH/overlay`` over itself when it is not one already (it
takes that bind away when a podman process ends with no container mounted, and leaves it when
one is, or when the process is killed). Neither means the graph is in use: both are removed,
the runtime's first, before the mount itself. Container overlays, their shm and volume mounts,
anything else mounted below, and processes with files open on it do mean it is in use; then
nothing is touched and one line says what holds it.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import posixpath
import signal
import sys
import time
from dataclasses import dataclass, field

from graftfs.linux import MNT_DETACH, umount
from graftfs.node.binds import unbind_all
from graftfs.node.mounts import (
    DEAD_MOUNT_ERRNOS,
    FSTYPE,
    MountEntry,
    MountUser,
    call_with_timeout,
    canonical,
    find_mount,
    is_graftfs_daemon,
    mount_table,
    mount_users,
    mounts_below,
    pid_alive,
    read_runtime,
    remove_runtime,
)

NAME = "umount"
HELP = "unmount a graftfs mount and wait for its daemon to exit"
DAEMON_EXIT_TIMEOUT = 20.0
BIND_REMOVE_TIMEOUT = 10.0
USERS_SCAN_TIMEOUT = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lazy", "-l", action="store_true", help="detach even while the mount is in use")
    p.add_argument("mountpoint", metavar="MOUNTPOINT",
                   help="a graftfs mount; what graftfs and the runtime's storage bound below it is removed first")


def _is_dead(mountpoint: str, timeout: float = 5.0) -> bool:
    """True when the mount's daemon is gone (ENOTCONN); a hung daemon counts as alive."""
    try:
        call_with_timeout(lambda: os.stat(mountpoint), timeout, "the mount")
    except OSError as e:
        return e.errno in DEAD_MOUNT_ERRNOS
    return False


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


@dataclass
class Below:
    """What is mounted below a graftfs mount, sorted by what it means for unmounting it."""

    self_binds: list[MountEntry] = field(default_factory=list)  # the runtime's, safe to remove
    own: list[MountEntry] = field(default_factory=list)  # graftfs' binds, safe to remove
    containers: list[MountEntry] = field(default_factory=list)  # the graph is in use
    other: list[MountEntry] = field(default_factory=list)  # unknown: in use as far as we know


def _relative(entry: MountEntry, top: MountEntry) -> str:
    return posixpath.relpath(entry.mountpoint, top.mountpoint)


def _is_self_bind(entry: MountEntry, top: MountEntry) -> bool:
    """A directory of this very mount bound over itself: same filesystem (device), showing the
    directory that sits at its own place in the view."""
    return entry.major_minor == top.major_minor and entry.root == posixpath.join(top.root, _relative(entry, top))


def _is_container_mount(entry: MountEntry, top: MountEntry) -> bool:
    """What a runtime mounts in its graph for a container while it exists: its root filesystem
    (an overlay at overlay/<id>/merged), podman's /dev/shm tmpfs, a volume with mount options."""
    parts = _relative(entry, top).split("/")
    shm = len(parts) == 4 and parts[0] == "overlay-containers" and parts[2:] == ["userdata", "shm"]
    volume = len(parts) == 3 and parts[0] == "volumes" and parts[2] == "_data"
    return entry.fstype == "overlay" or shm or volume


def _classify(top: MountEntry, table: list[MountEntry], own: set[str]) -> Below:
    """Sort what is mounted below ``top``; ``own`` are the mount points of graftfs' binds."""
    below = Below()
    for entry in mounts_below(top.mountpoint, table):
        if entry.mountpoint in own:
            below.own.append(entry)
        elif _is_self_bind(entry, top):
            below.self_binds.append(entry)
        elif _is_container_mount(entry, top):
            below.containers.append(entry)
        else:
            below.other.append(entry)
    return below


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else ('es' if what.endswith('s') else 's')}"


def _mounts_refusal(mp: str, below: Below) -> str | None:
    """One line naming what is mounted below ``mp`` that means the graph is in use, if anything."""
    if below.containers:
        first = min(below.containers, key=lambda e: e.fstype != "overlay")  # a root filesystem says most
        also = f" and {_count(len(below.other), 'other mount')}" if below.other else ""
        return (f"{mp} is in use: {_count(len(below.containers), 'container mount')}{also} below it "
                f"(e.g. {first.mountpoint}); stop the containers (podman stop -a, then podman unmount -a) "
                "or use --lazy")
    if below.other:
        first, n = below.other[0], len(below.other)
        return (f"{mp} is in use: {_count(n, 'mount')} below it that graftfs does not recognise "
                f"(e.g. {first.mountpoint}, {first.fstype}); unmount {'it' if n == 1 else 'them'} "
                f"(findmnt -R {mp} lists them) or use --lazy")
    return None


def _users(mp: str, mounts: list[MountEntry]) -> list[MountUser]:
    """The processes holding ``mounts`` busy; none when /proc cannot be read in time (umount(2)
    then has the last word)."""
    ids = frozenset(m.mount_id for m in mounts)
    try:
        return call_with_timeout(lambda: mount_users(ids, mp), USERS_SCAN_TIMEOUT, "the scan of /proc")
    except OSError:
        return []


def _users_refusal(mp: str, users: list[MountUser]) -> str | None:
    if not users:
        return None
    them = "it" if len(users) == 1 else "them"
    return (f"{mp} is in use by {_count(len(users), 'process')} (e.g. {users[0].describe()}); "
            f"stop {them} or use --lazy")


def _remove_self_binds(binds: list[MountEntry]) -> None:
    """Unmount the runtime's self-binds, deepest first (containers/storage binds its home again
    the next time it starts)."""
    for entry in sorted(binds, key=lambda e: e.mountpoint.count("/"), reverse=True):
        call_with_timeout(functools.partial(umount, entry.mountpoint), BIND_REMOVE_TIMEOUT,
                          f"removing the bind on {entry.mountpoint}")


def _describe_removed(top: MountEntry, binds: list[MountEntry]) -> str:
    names = ", ".join(f"{_relative(b, top)}/" for b in binds)
    return (f"removed the runtime's bind of {names} over itself" if len(binds) == 1
            else f"removed the runtime's binds of {names} over themselves")


def _clear_below(mp: str, own_paths: list[str], rw: str | None) -> int:
    """Make ``mp`` unmountable without --lazy: refuse (changing nothing) while the graph is in
    use, else remove the runtime's self-binds and graftfs' own binds. Returns an exit status."""
    table = mount_table()
    top = next((e for e in reversed(table) if e.mountpoint == mp), None)
    if top is None:
        return 0  # gone meanwhile: umount(2) says so
    below = _classify(top, table, set(own_paths))
    if rw is not None:
        # a container layer the node holds itself is shown as a link to its RW directory, so
        # the runtime's overlay mount of it lands there, outside the graph
        below.containers += [e for e in mounts_below(os.path.join(rw, "overlay"), table) if e.fstype == "overlay"]
    refusal = _mounts_refusal(mp, below) or _users_refusal(mp, _users(mp, [top, *below.self_binds, *below.own]))
    if refusal is not None:
        print(f"graftfs umount: {refusal}", file=sys.stderr)
        return 1
    try:
        if below.self_binds:
            _remove_self_binds(below.self_binds)
            print(f"graftfs umount: {_describe_removed(top, below.self_binds)}", file=sys.stderr)
        if own_paths:  # graftfs' own binds over the view (graftfs.node.binds) would keep it busy
            call_with_timeout(lambda: unbind_all(own_paths), BIND_REMOVE_TIMEOUT, "removing graftfs' binds")
    except OSError as e:
        print(f"graftfs umount: {e.filename or mp}: {e.strerror or e}; use --lazy to detach anyway", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    mp = canonical(args.mountpoint)
    entry = find_mount(mp)
    if entry is None:
        remove_runtime(mp)
        print(f"graftfs umount: {mp} is not mounted", file=sys.stderr)
        return 1
    if entry.fstype != FSTYPE:
        print(f"graftfs umount: {mp} is a {entry.fstype} mount, not graftfs", file=sys.stderr)
        return 1
    info = read_runtime(mp) or {}
    raw_pid = info.get("pid")
    pid = raw_pid if isinstance(raw_pid, int) and is_graftfs_daemon(raw_pid) else None
    dead = _is_dead(mp)
    raw_binds = info.get("binds")
    own = [b for b in raw_binds if isinstance(b, str) and b.startswith(mp + "/")] if isinstance(raw_binds, list) else []
    raw_rw = info.get("rw")
    if not dead and not args.lazy:
        code = _clear_below(mp, own, raw_rw if isinstance(raw_rw, str) else None)
        if code != 0:
            return code
    try:
        umount(mp, MNT_DETACH if args.lazy else 0)
    except OSError as e:
        if e.errno == errno.EBUSY and not dead:
            # lsof lists the open files on the mount's filesystem; fuser -vm adds a "kernel mount"
            # line for the mount itself and an error per descriptor it may not inspect
            print(f"graftfs umount: {mp} is in use (see: lsof {mp}); use --lazy to detach anyway",
                  file=sys.stderr)
            return 1
        try:
            umount(mp, MNT_DETACH)  # a dead mount with stale users: nothing left to protect
        except OSError as e2:
            print(f"graftfs umount: {mp}: {e2.strerror}", file=sys.stderr)
            return 1
    if args.lazy:
        return 0  # the daemon keeps serving files still open on the detached mount, then exits
    if pid is not None and not _wait_exit(pid, DAEMON_EXIT_TIMEOUT):
        print(f"graftfs umount: daemon {pid} did not exit after the unmount; stopping it", file=sys.stderr)
        os.kill(pid, signal.SIGKILL)
        _wait_exit(pid, 5.0)
    remove_runtime(mp)
    if dead:
        print(f"graftfs umount: cleared dead mount {mp}", file=sys.stderr)
    return 0
