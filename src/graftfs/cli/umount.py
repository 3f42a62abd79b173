"""graftfs umount: unmount and wait for the daemon to exit; also clears dead mounts."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time

from graftfs.linux import MNT_DETACH, umount
from graftfs.node.binds import unbind_all
from graftfs.node.mounts import (
    DEAD_MOUNT_ERRNOS,
    FSTYPE,
    call_with_timeout,
    canonical,
    find_mount,
    is_graftfs_daemon,
    mount_table,
    pid_alive,
    read_runtime,
    remove_runtime,
)

NAME = "umount"
HELP = "unmount a graftfs mount and wait for its daemon to exit"
DAEMON_EXIT_TIMEOUT = 20.0
BIND_REMOVE_TIMEOUT = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lazy", "-l", action="store_true", help="detach even while the mount is in use")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")


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
    if own and not dead and not args.lazy:
        foreign = [e.mountpoint for e in mount_table() if e.mountpoint.startswith(mp + "/") and e.mountpoint not in own]
        if foreign:
            print(f"graftfs umount: {mp} is in use ({len(foreign)} mounts below it, e.g. {foreign[0]}); "
                  "use --lazy to detach anyway", file=sys.stderr)
            return 1
        try:  # graftfs' own binds over the view (graftfs.node.binds) would keep it busy
            call_with_timeout(lambda: unbind_all(own), BIND_REMOVE_TIMEOUT, "removing graftfs' binds")
        except OSError as e:
            print(f"graftfs umount: {mp}: {e.strerror or e}; use --lazy to detach anyway", file=sys.stderr)
            return 1
    try:
        umount(mp, MNT_DETACH if args.lazy else 0)
    except OSError as e:
        if e.errno == errno.EBUSY and not dead:
            print(f"graftfs umount: {mp} is in use (see: fuser -vm {mp}); use --lazy to detach anyway",
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
