"""What must be left after a test unmounts: nothing. One check the reliability tests share.

After graftfs is unmounted (and whatever the test started is stopped):

* no live process whose command line names one of the test's directories (a graftfs daemon, a
  forgotten sshfs/sshd, a conmon or podman of the test) and, for the daemons the test knows
  by pid, no process and so no thread of theirs;
* no mount at or below the test's directories;
* no graftfs temp file in an RW tree (its private tmp dir, ``*.tmp`` of its state files) or in a
  share (publish staging, a half-written marker);
* no runtime record (/run/graftfs) of the unmounted mountpoints.

Zombies are not counted: they hold no resources but a pid, and PID 1 in this kind of container
does not reap orphans (not something graftfs can fix).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from graftfs.node.mounts import mount_table, pid_alive, runtime_file

#: Names graftfs gives its temporary files and directories (see namespace, hides, scan_cache,
#: mounts, publish): none may outlive a clean unmount.
RW_TEMP_SUFFIXES = (".tmp",)
SHARE_TEMP_PREFIXES = (".graftfs-staging", ".graftfs-share.")


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def live_processes_naming(tops: Iterable[str]) -> list[str]:
    """Live processes (not zombies) whose command line names a path below one of ``tops``."""
    tops = [t.rstrip("/") for t in tops]
    me = os.getpid()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        args = _cmdline(pid)
        if args and any(t in args for t in tops) and pid_alive(int(pid)):
            out.append(f"pid {pid}: {args[:300]}")
    return out


def mounts_below(tops: Iterable[str], keep: Iterable[str] = ()) -> list[str]:
    tops = [t.rstrip("/") for t in tops]
    kept = set(keep)
    return [f"{m.fstype} at {m.mountpoint}" for m in mount_table() if m.mountpoint not in kept
            and any(m.mountpoint == t or m.mountpoint.startswith(t + "/") for t in tops)]


def temp_files(rw_trees: Iterable[str], shares: Iterable[str]) -> list[str]:
    out = []
    for rw in rw_trees:
        tmp = os.path.join(rw, ".graftfs", "tmp")
        if os.path.isdir(tmp):
            out.extend(os.path.join(tmp, n) for n in os.listdir(tmp))
        state = os.path.join(rw, ".graftfs")
        if os.path.isdir(state):
            out.extend(os.path.join(state, n) for n in os.listdir(state) if n.endswith(RW_TEMP_SUFFIXES))
    for share in shares:
        try:
            names = os.listdir(share)
        except OSError as e:
            out.append(f"{share}: cannot list ({e})")
            continue
        for name in names:
            if not name.startswith(SHARE_TEMP_PREFIXES):
                continue
            path = os.path.join(share, name)
            if name == ".graftfs-staging" and os.path.isdir(path) and not os.listdir(path):
                continue  # publish's staging area itself may stay, empty
            out.append(path)
    return out


def residue(tops: Iterable[str], *, rw_trees: Iterable[str] = (), shares: Iterable[str] = (),
            daemons: Iterable[int] = (), mountpoints: Iterable[str] = (), keep_mounts: Iterable[str] = ()) -> list[str]:
    """Everything left behind, one line each (empty when clean). ``keep_mounts``: mounts the
    test's fixtures still hold and remove later (a read-only bind of the share)."""
    tops = list(tops)
    out = [f"process left: {p}" for p in live_processes_naming(tops)]
    for pid in daemons:
        if pid_alive(pid):
            try:
                threads = sorted(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                threads = []
            out.append(f"graftfs daemon {pid} still alive with {len(threads)} threads")
    out += [f"mount left: {m}" for m in mounts_below(tops, keep_mounts)]
    out += [f"temp file left: {p}" for p in temp_files(rw_trees, shares)]
    out += [f"runtime record left for {mp}" for mp in mountpoints if os.path.exists(runtime_file(mp))]
    return out


def assert_no_residue(tops: Iterable[str], **kwargs: Iterable[str] | Iterable[int]) -> None:
    left = residue(tops, **kwargs)  # type: ignore[arg-type]
    assert not left, "left behind after unmount:\n" + "\n".join(left)
