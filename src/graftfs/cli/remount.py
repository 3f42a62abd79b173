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
import sys
import time

from graftfs.cli import mount
from graftfs.linux import MNT_DETACH, umount
from graftfs.node.mounts import FSTYPE, canonical, find_mount, pid_alive, read_runtime
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
    mp = canonical(args.mountpoint)
    entry = find_mount(mp)
    if entry is None or entry.fstype != FSTYPE:
        print(f"graftfs remount: {mp} is not a graftfs mount", file=sys.stderr)
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
    try:
        umount(mp, MNT_DETACH)  # the old daemon's binds go with it
    except OSError as e:
        print(f"graftfs remount: cannot detach {mp}: {e.strerror}", file=sys.stderr)
        return 1
    code = mount.spawn_daemon(cfg, verbose=False)
    if code != 0:
        print(f"graftfs remount: the new daemon did not mount; {mp} is now an empty directory "
              f"(mount it again with: graftfs mount {' '.join(argv)})", file=sys.stderr)
        return 1
    new = (read_runtime(mp) or {}).get("pid")
    print(f"graftfs remount: {mp}: daemon {old} replaced by {new}")
    if isinstance(old, int):
        deadline = time.monotonic() + OLD_EXIT_SECONDS
        while pid_alive(old) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(old):
            print(f"graftfs remount: the old daemon {old} keeps serving files still open on the detached "
                  "mount; it exits once they are closed", file=sys.stderr)
    return 0
