"""graftfs mount: mount the merged view; return only once it is ready (or failed, in one line)."""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import time

from graftfs.format.names import STATE_DIR
from graftfs.node.mounts import check_mountable
from graftfs.node.options import LAYOUTS, ConfigError, MountConfig

NAME = "mount"
HELP = "mount a merged view of a local RW tree and shared RO trees"
READY_TIMEOUT = 120.0  # scanning a large share on a slow network can take a while


EPILOG = """\
options (-o, comma-separated; the same in fstab and `mount -t graftfs`):
  rw=DIR, ro=DIR          the RW tree and shared trees, as --rw/--ro (ro=A:B or repeated: earlier wins)
  layout=NAME             as --layout
  timeout=SECONDS         longest a request waits on a backing tree, then ETIMEDOUT (default 10)
  poll=SECONDS            how often each shared tree is checked for changes (default 0.5;
                          0: no watcher, kernel caches of 1 s instead)
  share_inotify=0|1       1 (default): also watch shared trees on local filesystems with inotify
  lease=SECONDS           how often this node renews its lease in each share (default 30, valid for
                          4 periods; 0: no lease, then do not run graftfs gc on that share)
  direct=0|1|auto         layer directories as links to their backing tree, the runtime's lock files
                          and node-local directories bind-mounted (auto: on for containers-storage)
  kernel_opens=0|1|auto   let the kernel open files without asking graftfs (a third fewer requests
                          per container start; needs the pyfuse3 tools/install builds; auto, the
                          default: when this pyfuse3 can)
  publish=auto|off        publish images this node pulls or builds to the first share (default off)
  publish_match=GLOB      which images publish=auto publishes (repeat; !GLOB excludes; default: all named)
  metrics=HOST:PORT       serve Prometheus metrics at http://HOST:PORT/metrics (default: none;
                          [::1]:PORT for IPv6; see docs/metrics.md)
  log=FILE                the daemon's log (default RW/.graftfs/graftfs.log)
  FUSE options            allow_other, default_permissions, ro, nodev, nosuid, noatime, ...
                          (default: allow_other,default_permissions,dev,suid, as a graph needs)

example (podman/CRI-O graph):
  graftfs mount --rw /var/lib/graftfs/rw --ro /mnt/share -o publish=auto /var/lib/containers/storage
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rw", metavar="DIR", help="the node's own read-write tree")
    p.add_argument("--ro", metavar="DIR", action="append", default=[],
                   help="a shared read-only tree (repeat; earlier ones win)")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="what the runtime reads: containers-storage (podman, CRI-O, buildah) or isulad; "
                        "auto (default) decides from what the runtime wrote, else containers-storage")
    p.add_argument("-o", dest="options", metavar="OPTS", action="append", default=[],
                   help="comma-separated options (below; repeatable), as in fstab")
    p.add_argument("--foreground", "-f", action="store_true", help="serve in this process (do not daemonize)")
    p.add_argument("--log-file", metavar="FILE", help="log here (default: stderr in the foreground, "
                   "RW/.graftfs/graftfs.log otherwise)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("mountpoint", metavar="MOUNTPOINT",
                   help="where the runtime's graph directory is (e.g. /var/lib/containers/storage)")


def config_from_args(args: argparse.Namespace) -> MountConfig:
    cfg = MountConfig(args.mountpoint)
    for text in args.options:
        cfg.add_options(text)
    if args.rw is not None:
        if cfg.rw is not None and cfg.rw != args.rw:
            raise ConfigError("--rw and -o rw= name different directories")
        cfg.rw = args.rw
    cfg.ro = [*args.ro, *cfg.ro]
    if args.layout:
        cfg.layout = args.layout
    if args.log_file:
        cfg.log_file = args.log_file
    return cfg


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        cfg.check()
    except ConfigError as e:
        print(f"graftfs mount: {e}", file=sys.stderr)
        return 2
    if args.foreground:
        from graftfs.node import daemon  # pyfuse3 and trio only in the process that serves

        daemon.setup_logging(cfg.log_file, args.verbose)
        return daemon.run(cfg, args.ready_fd)
    try:
        check_mountable(cfg)
    except ConfigError as e:
        print(f"graftfs mount: {e}", file=sys.stderr)
        return 1
    return spawn_daemon(cfg, args.verbose)


def spawn_daemon(cfg: MountConfig, verbose: bool) -> int:
    """Start the daemon in its own session and wait for its READY/ERROR line."""
    assert cfg.rw is not None
    if cfg.log_file is None:
        state = os.path.join(cfg.rw, STATE_DIR)
        os.makedirs(state, mode=0o700, exist_ok=True)
        cfg.log_file = os.path.join(state, "graftfs.log")
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "graftfs", "mount", *cfg.to_argv(), "--foreground",
            "--ready-fd", str(write_end)] + (["--verbose"] if verbose else [])
    with open(cfg.log_file, "ab") as log_out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_out, stderr=log_out,
                                pass_fds=(write_end,), start_new_session=True)
    os.close(write_end)
    line = _read_line(read_end, READY_TIMEOUT)
    os.close(read_end)
    if line == "READY":
        return 0
    if line is not None and line.startswith("ERROR "):
        print(f"graftfs mount: {line[6:]}", file=sys.stderr)
    elif line is None:
        proc.kill()
        print(f"graftfs mount: the daemon did not get ready in {READY_TIMEOUT:g} s; see {cfg.log_file}",
              file=sys.stderr)
    else:  # the pipe closed without a word: the daemon died (its exit follows the close)
        try:
            code: int | str = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "unknown"
        print(f"graftfs mount: the daemon exited with status {code} before the mount was ready; "
              f"see {cfg.log_file}", file=sys.stderr)
    proc.wait(timeout=10) if proc.poll() is None else None
    return 1


def _read_line(fd: int, timeout: float) -> str | None:
    """Read one line from ``fd`` within ``timeout`` seconds: the line (what came before the
    pipe closed, "" when nothing did), or None on timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").split("\n", 1)[0].strip()
