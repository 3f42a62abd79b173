"""graftfs unhide: give a shared image this node deleted back to it.

Deleting a shared image on a node (``podman rmi``) only hides it there; the share keeps it and
every other node still runs it. ``unhide`` takes those hides back through the running daemon
(the ``user.graftfs.unhide`` attribute of the mount root, root only), which tells the kernel and
the runtime's long-running clients at once: the image is listed again without a remount.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from graftfs.cli.status import fetch_status
from graftfs.format.names import UNHIDE_XATTR
from graftfs.format.refs import match_image_ref
from graftfs.node.mounts import FSTYPE, call_with_timeout, canonical, find_mount

NAME = "unhide"
HELP = "give shared images this node deleted (podman rmi) back to it; `graftfs status` lists them"
ANSWER_TIMEOUT = 30.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="the graftfs mount (the runtime's graph)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="name, id or unique id prefix of a hidden image")


def _hidden(st: dict[str, Any]) -> dict[str, list[str]]:
    """The status' hidden images: id -> names."""
    out: dict[str, list[str]] = {}
    for h in st.get("hidden_images", []):
        if isinstance(h, dict) and isinstance(h.get("id"), str):
            out[h["id"]] = [n for n in h.get("names", []) if isinstance(n, str)]
    return out


def _resolve(refs: list[str], hidden: dict[str, list[str]], mp: str) -> tuple[list[str], list[str]]:
    """Image ids the references name, and one line per reference that names none or several."""
    ids: list[str] = []
    errors: list[str] = []
    for ref in refs:
        found = match_image_ref(ref, hidden)
        if len(found) == 1:
            ids.append(found[0])
        elif not found:
            errors.append(f"no image hidden on this node matches {ref!r} (graftfs status {mp} lists them)")
        else:
            errors.append(f"{ref!r} names {len(found)} hidden images ({', '.join(i[:12] for i in found)}); "
                          "give more of the id")
    return ids, errors


def run(args: argparse.Namespace) -> int:
    mp = canonical(args.mountpoint)
    entry = find_mount(mp)
    if entry is None or entry.fstype != FSTYPE:
        print(f"graftfs unhide: {mp} is not a graftfs mount", file=sys.stderr)
        return 1
    try:
        hidden = _hidden(fetch_status(mp))
    except OSError as e:
        print(f"graftfs unhide: {mp}: {e.strerror or e}", file=sys.stderr)
        return 1
    ids, errors = _resolve(args.images, hidden, mp)
    for line in errors:
        print(f"graftfs unhide: {line}", file=sys.stderr)
    for iid in dict.fromkeys(ids):
        try:
            call_with_timeout(_asking(mp, iid), ANSWER_TIMEOUT, "the daemon")
        except OSError as e:
            print(f"graftfs unhide: {iid[:12]}: {e.strerror or e}", file=sys.stderr)
            errors.append(iid)
            continue
        print(f"{iid[:12]} {' '.join(hidden[iid])}: shown on this node again")
    return 1 if errors else 0



def _asking(mp: str, iid: str) -> Callable[[], None]:
    """The daemon call that gives image ``iid`` back (a hung mount: the caller's timeout)."""
    return lambda: os.setxattr(mp, UNHIDE_XATTR, iid.encode())
