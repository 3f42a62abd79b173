"""graftfs status: what a mount shows, per origin, and what it hides or skips (and why).

The daemon answers through a virtual xattr on the mount root, so an operator can get the same
JSON with ``getfattr -n user.graftfs.status --only-values MOUNTPOINT``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from typing import Any

from graftfs.cli.common import attempt, graftfs_mountpoint
from graftfs.format.names import STATUS_XATTR
from graftfs.node.mounts import DEAD_MOUNT_ERRNOS, call_with_timeout
from graftfs.share.stats import format_stats, share_stats

NAME = "status"
HELP = "show backing trees, visible layers and images per origin, hidden and skipped entries"
ANSWER_TIMEOUT = 15.0
HIDDEN_PATHS_SHOWN = 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the raw status JSON")
    p.add_argument("--share", help="instead of a mount: a share's images, layers, nodes' leases and the "
                   "storage sharing saves")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", help="a graftfs mount")


def fetch_status(mountpoint: str, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
    """Ask the daemon; raise OSError (ENOTCONN for a dead mount, ETIMEDOUT for a hung one)."""
    raw = call_with_timeout(lambda: os.getxattr(mountpoint, STATUS_XATTR), timeout, "the daemon")
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise OSError(errno.EIO, "the daemon answered something that is not a status")
    return data


def daemon_status(command: str, mp: str) -> dict[str, Any] | None:
    """The daemon's status for ``graftfs <command>``; None after one line (a dead or hung mount)."""
    try:
        return fetch_status(mp)
    except OSError as e:
        if e.errno in DEAD_MOUNT_ERRNOS:
            print(f"graftfs {command}: {mp} is a dead mount (its daemon is gone); run: graftfs umount {mp}",
                  file=sys.stderr)
        else:
            print(f"graftfs {command}: {mp}: {e.strerror or e}", file=sys.stderr)
        return None


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_status(st: dict[str, Any]) -> str:
    """The status as a person reads it."""
    lines = [f"graftfs {st.get('version')} on {st.get('mountpoint')}: pid {st.get('pid')}, "
             f"up {_age(time.time() - float(st.get('started', time.time())))}, layout {st.get('layout')}"
             + (f" ({st['layout_reason']})" if st.get("layout_reason") not in (None, "given") else "")]
    if st.get("layout_warning"):
        lines.append(f"WARNING: {st['layout_warning']}")
    rw = st.get("rw", {})
    lines.append("backing trees:")
    lines.append(f"  rw   {rw.get('tree')}: {rw.get('layers', 0)} layers, {rw.get('images', 0)} images")
    for tree in st.get("ro", []):
        kind = " (iSulad remote-RO share)" if tree.get("remote_ro") else ""
        role = "pins" if tree.get("pins") else "ro  "
        role += " "
        kind += " (this node's pinned copies)" if tree.get("pins") else ""
        lines.append(f"  {role}{tree.get('tree')}: {tree.get('layers', 0)} layers, "
                     f"{tree.get('images', 0)} images visible{kind}")
        if tree.get("unavailable_since"):
            since = float(tree["unavailable_since"])
            lines.append(f"      UNAVAILABLE since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))} "
                         f"({_age(time.time() - since)}): {tree.get('unavailable_reason')}; "
                         "showing its last known view")
    lines.extend(_watcher_lines(st.get("watcher", {})))
    lines.extend(_pin_lines(st.get("pins")))
    lines.extend(_lease_lines(st.get("leases")))
    lines.extend(_hidden_lines(st))
    skipped = st.get("skipped", [])
    lines.append(f"skipped entries (incomplete or corrupt): {st.get('skipped_count', len(skipped))}")
    lines.extend(f"  {s['kind']} {s['id'][:12]} in {s['tree']}: {s['reason']}" for s in skipped)
    if st.get("skipped_count", 0) > len(skipped):
        lines.append(f"  ... and {st['skipped_count'] - len(skipped)} more")
    return "\n".join(lines)


def _hidden_lines(st: dict[str, Any]) -> list[str]:
    """Shared images this node deleted, by image: what ``graftfs unhide`` gives back."""
    images = [h for h in st.get("hidden_images", []) if isinstance(h, dict) and "id" in h]
    count = int(st.get("hidden_images_count", len(images)))
    paths = int(st.get("hidden_count", 0))
    lines = [f"hidden on this node (deleted here, still on the share): {count} images, "
             f"{st.get('hidden_layers', 0)} layers, {paths} paths"]
    lines.extend(f"  image {h['id'][:12]} {' '.join(h.get('names', [])) or '<none>'}: "
                 f"{h.get('layers', 0)} of its layers hidden" for h in images)
    if count > len(images):
        lines.append(f"  ... and {count - len(images)} more images")
    if images:
        lines.append(f"  (graftfs unhide {st.get('mountpoint')} IMAGE gives one back; "
                     "status --json lists the hidden paths)")
    elif paths:  # deleted by hand, not by the runtime's rmi: the paths say what
        shown = st.get("hidden", [])[:HIDDEN_PATHS_SHOWN]
        lines.extend(f"  {p}" for p in shown)
        if paths > len(shown):
            lines.append(f"  ... and {paths - len(shown)} more (status --json)")
    return lines


def _pin_lines(pinned: list[dict[str, Any]] | None) -> list[str]:
    if pinned is None:
        return []
    total = sum(int(p.get("bytes", 0)) for p in pinned)
    lines = [f"pinned images: {len(pinned)}, {total / 2**20:.1f} MiB (graftfs pin / unpin)"]
    lines.extend(f"  {p['id'][:12]} {' '.join(p.get('names', []))}: {p.get('layers', 0)} layers, "
                 f"{int(p.get('bytes', 0)) / 2**20:.1f} MiB" for p in pinned)
    return lines


def _lease_lines(leases: dict[str, Any] | None) -> list[str]:
    if not leases:
        return ["leases: off (lease=0, or not a containers-storage mount)"]
    lines = [f"leases: node {leases.get('node')} (this node's name in shares: host name and a random part, "
             "kept in RW/.graftfs/node-id)",
             f"  {leases.get('layers', 0)} shared layers and {leases.get('images', 0)} images in use, "
             f"renewed every {leases.get('period')} s (ttl {leases.get('ttl')} s)"]
    for share, s in sorted(leases.get("shares", {}).items()):
        ago = s.get("renewed_ago")
        if ago is not None:
            state = f"renewed {ago} s ago"
        elif s.get("empty"):
            state = "empty share (nothing published yet): the lease is written after the first publish"
        else:
            state = "not written yet"
        lines.append(f"  {share}: {state}" + (f", FAILING: {s['failing']}" if s.get("failing") else ""))
    return lines


def _watcher_lines(w: dict[str, Any]) -> list[str]:
    if not w or w.get("enabled") is False:
        return ["watcher: off (changes behind the mount show within a second, via short kernel caches)"]
    lines = [f"watcher: view generation {w.get('generation')}, shared trees polled every "
             f"{w.get('poll_interval')} s, {w.get('inotify_watches', 0)} inotify watches, "
             f"{w.get('changes_applied', 0)} changes applied"]
    last = w.get("last_change")
    if last:
        lines.append(f"  last change: {_age(time.time() - float(last['at']))} ago from {last['source']}, "
                     f"{last['names']} names re-checked, {last['notified']} kernel notifications, "
                     f"{last['latency_ms']} ms from detection to invalidation")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.share:
        return _share_status(args)
    if not args.mountpoint:
        print("graftfs status: give a MOUNTPOINT or --share SHARE", file=sys.stderr)
        return 2
    mp = graftfs_mountpoint("status", args.mountpoint)
    st = daemon_status("status", mp) if mp is not None else None
    if st is None:
        return 1
    print(json.dumps(st, indent=2, sort_keys=True) if args.json else format_status(st))
    return 0


def _share_status(args: argparse.Namespace) -> int:
    st = attempt("status", lambda: share_stats(args.share))
    if st is None:
        return 1
    print(json.dumps(st, indent=2, sort_keys=True) if args.json else format_stats(st))
    return 0
