"""graftfs unpin: drop a node's own copy of images (layers its containers still use stay)."""

from __future__ import annotations

import argparse
import os

from graftfs.cli.common import attempt
from graftfs.cli.pin import rw_of
from graftfs.format.names import ORIGIN_XATTRS, OVERLAY, origin_of
from graftfs.share import pins

NAME = "unpin"
HELP = "remove this node's pinned copy of images (what its containers use is kept until they are gone)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--graph", required=True, metavar="MOUNTPOINT", help="the graftfs mount (the runtime's graph)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="name, id or unique id prefix")


def run(args: argparse.Namespace) -> int:
    rw = rw_of("unpin", args.graph)
    pin_origin = origin_of(pins.pin_tree(rw or "")).encode()

    def shows_pinned(lid: str) -> bool:
        try:
            return os.getxattr(os.path.join(args.graph, OVERLAY, lid), ORIGIN_XATTRS[0]) == pin_origin
        except OSError:
            return False  # gone from the view (the share has no copy): nothing uses the pin's

    def settled(lids: list[str]) -> None:
        pins.wait_until(shows_pinned, lids)
    p = attempt("unpin", lambda: pins.unpin(rw, args.images, print, settled)) if rw else None
    if p is None:
        return 1
    print(f"unpinned: {len(p.images)} images, {len(p.layers)} layers, {p.bytes / 2**20:.1f} MiB freed")
    for what, why in sorted(p.kept.items()):
        print(f"kept {what.short()}: {why}")
    return 0
