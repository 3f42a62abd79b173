"""graftfs unhide: give a shared image this node deleted back to it.

Deleting a shared image on a node (``podman rmi``) only hides it there; the share keeps it and
every other node still runs it. ``unhide`` takes those hides back through the running daemon
(the ``user.graftfs.unhide`` attribute of the mount root, root only), which resolves the
reference against every image hidden on the node and tells the kernel and the runtime's
long-running clients at once: the image is listed again without a remount.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

from graftfs.cli.common import graftfs_mountpoint
from graftfs.cli.status import daemon_status
from graftfs.format.names import UNHIDE_XATTR
from graftfs.format.refs import match_image_ref
from graftfs.node.mounts import call_with_timeout

NAME = "unhide"
HELP = "give shared images this node deleted (podman rmi) back to it; `graftfs status` lists them"
ANSWER_TIMEOUT = 30.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="the graftfs mount (the runtime's graph)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="name, id or unique id prefix of a hidden image")


def run(args: argparse.Namespace) -> int:
    mp = graftfs_mountpoint("unhide", args.mountpoint)
    st = daemon_status("unhide", mp) if mp is not None else None
    if mp is None or st is None:
        return 1
    # for the output only: the daemon resolves each reference against all hidden images
    listed = {h["id"]: h.get("names", []) for h in st.get("hidden_images", []) if isinstance(h, dict) and "id" in h}
    failed = 0
    for ref in args.images:
        try:
            call_with_timeout(_asking(mp, ref), ANSWER_TIMEOUT, "the daemon")
        except OSError as e:
            failed += 1
            print(f"graftfs unhide: {_why(e, ref, mp)}", file=sys.stderr)
            continue
        found = match_image_ref(ref, listed)
        shown = f"{found[0][:12]} {' '.join(listed[found[0]])}" if len(found) == 1 else ref
        print(f"{shown}: shown on this node again")
    return 1 if failed else 0


def _asking(mp: str, ref: str) -> Callable[[], None]:
    """The daemon call that gives the image ``ref`` names back (a hung mount: the caller's timeout)."""
    return lambda: os.setxattr(mp, UNHIDE_XATTR, ref.encode())


def _why(e: OSError, ref: str, mp: str) -> str:
    if e.errno == errno.ENOENT:
        return f"no image hidden on this node matches {ref!r} (graftfs status {mp} lists them)"
    if e.errno == errno.ENOTUNIQ:
        return f"{ref!r} names several hidden images; give more of the id"
    if e.errno == errno.EPERM:
        return "only root can give images back"
    return f"{ref}: {e.strerror or e}"
