"""graftfs remount: replace a mount's daemon (new code, same options) under running containers.

A container's processes never use the graftfs mount itself: its overlay sits on the backing
directories through the layer links, and the runtime's per-container files are bind-mounted from
the RW tree. So the old mount can be detached (its binds with it) and a new daemon mounted in its
place; containers keep running, and `exec`, `stop`, `rm` and new runs work on the new mount. The
old daemon serves whatever is still open on the detached mount and exits once it is released.
Between the detach and the new mount (the time a mount takes, about a second) the mountpoint is
an empty directory: run it while the runtime starts nothing new.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from graftfs.cli import mount
from graftfs.cli.common import graftfs_mountpoint, one_line
from graftfs.linux import MNT_DETACH, umount
from graftfs.node import systemd
from graftfs.node.mounts import pid_alive, read_runtime, recorded_pid
from graftfs.node.options import ConfigError, MountConfig

NAME = "remount"
HELP = "replace a mount's daemon (new code, same options) while its containers keep running"
#: How long the old daemon gets to notice its detached mount was released.
OLD_EXIT_SECONDS = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="a graftfs mount; its options are kept")


def _config(argv: list[str]) -> MountConfig:
    """The mount's configuration as its daemon recorded it (``graftfs mount`` arguments)."""
    parser = argparse.ArgumentParser(add_help=False)
    mount.add_arguments(parser)
    try:
        return mount.config_from_args(parser.parse_args(argv))
    except SystemExit:
        raise ConfigError("its recorded options do not parse") from None


def run(args: argparse.Namespace) -> int:
    mp = graftfs_mountpoint("remount", args.mountpoint)
    if mp is None:
        return 1
    info = read_runtime(mp) or {}
    argv, old = info.get("argv"), info.get("pid")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        print(f"graftfs remount: {mp} was mounted by a graftfs that did not record its options; "
              "unmount and mount it again", file=sys.stderr)
        return 1
    try:
        cfg = _config(argv)
        cfg.check()
    except ConfigError as e:
        print(f"graftfs remount: {mp}: {e}", file=sys.stderr)
        return 1
    unit = service_unit(old) if isinstance(old, int) else None
    if unit is not None and not os.environ.get("NOTIFY_SOCKET"):
        # by hand under a unit: systemd would stop the unit when the old daemon exits, and the
        # new daemon would serve outside it
        print(f"graftfs remount: {mp} is served by the systemd unit {unit}; run: systemctl reload {unit}",
              file=sys.stderr)
        return 1
    try:
        umount(mp, MNT_DETACH)  # the old daemon's binds go with it
    except OSError as e:
        print(f"graftfs remount: cannot detach {mp}: {e.strerror}", file=sys.stderr)
        return 1
    code = mount.spawn_daemon(cfg, verbose=info.get("verbose") is True)  # as the old one logged
    if code != 0:
        print(f"graftfs remount: the new daemon did not mount; {mp} is now an empty directory "
              f"(mount it again with: graftfs mount {' '.join(argv)})", file=sys.stderr)
        return 1
    new = recorded_pid(mp)
    print(f"graftfs remount: {mp}: daemon {old} replaced by {new}")
    told = _tell_service_manager(mp, new)
    if isinstance(old, int):
        deadline = time.monotonic() + OLD_EXIT_SECONDS
        while pid_alive(old) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(old):
            print(f"graftfs remount: the old daemon {old} keeps serving files still open on the detached "
                  "mount; it exits once they are closed", file=sys.stderr)
    return 0 if told else 1


def _tell_service_manager(mp: str, new: int | None) -> bool:
    """Tell the service manager that runs this remount (NOTIFY_SOCKET set: the ExecReload of
    graftfs@.service) the new daemon's pid, once it serves; nothing without NOTIFY_SOCKET.
    False, after one line on stderr, when the service manager asked for it and was not told.

    Why: remount leaves the old daemon, the unit's main process for systemd, to exit on its own
    once its detached mount is released; systemd takes the exit of a Type=notify unit's main
    process for the end of the service and stops what is left of it, the new daemon too (the
    unit would end inactive, nothing mounted). MAINPID= makes the new daemon the main process
    before the old one exits. It comes from this process because systemd tells which unit a
    message is for by its sender: this one is the unit's reload command, and the unit's
    NotifyAccess=all lets it speak (its new daemon's READY=1 too).

    A failure exits remount non-zero although the new daemon serves: under systemd it is the
    difference between a reload that worked and a unit that will stop, new daemon and mount with
    it, when the old daemon exits, and a failed `systemctl reload` is all the operator sees.
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        return True
    if new is None or new <= 0:
        print(f"graftfs remount: {mp} was remounted, but the new daemon recorded no pid to tell systemd; "
              "the unit stops when the old daemon exits", file=sys.stderr)
        return False
    try:
        systemd.notify(strict=True, MAINPID=str(new), STATUS=f"serving {mp}")
    except OSError as e:
        print(f"graftfs remount: {mp} was remounted, but systemd could not be told the new daemon's pid "
              f"({one_line(e)}); the unit stops when the old daemon exits", file=sys.stderr)
        return False
    return True


def service_unit(pid: int, proc: str = "/proc") -> str | None:
    """The graftfs systemd service (tools/systemd/graftfs@.service) a daemon runs in, from its
    control group, if any: such a graph must be remounted through the unit (``systemctl
    reload``). Other services (a CI runner starting graftfs) are not the daemon's unit."""
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        path = line.split(":", 2)[-1]
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("graftfs") and name.endswith(".service"):
            return name
    return None
