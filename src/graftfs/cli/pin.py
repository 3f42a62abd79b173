"""graftfs pin / unpin: keep a node's own copy of shared images, for when the share is out of reach."""

from __future__ import annotations

import argparse
import sys

from graftfs.cli.common import attempt, graftfs_mountpoint
from graftfs.node.mounts import canonical, read_runtime
from graftfs.share import pins

NAME = "pin"
HELP = "copy shared images into this node's RW tree so containers start from them while the share is out"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--graph", required=True, metavar="MOUNTPOINT", help="the graftfs mount (the runtime's graph)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="name, id or unique id prefix")


def rw_of(command: str, graph: str) -> str | None:
    """The RW tree of a graftfs mount, from its daemon's runtime record; None after one line."""
    mp = graftfs_mountpoint(command, graph)
    if mp is None:
        return None
    rw = (read_runtime(mp) or {}).get("rw")
    if not isinstance(rw, str):
        print(f"graftfs {command}: {mp} is not a running graftfs mount", file=sys.stderr)
        return None
    return rw


def run(args: argparse.Namespace) -> int:
    rw = rw_of("pin", args.graph)
    results = attempt("pin", lambda: pins.pin(canonical(args.graph), rw, args.images)) if rw else None
    if results is None:
        return 1
    for r in results:
        copied = sum(1 for la in r.layers if la.status == "published")
        size = sum(la.bytes for la in r.layers)
        print(f"{r.id[:12]} {' '.join(r.names)}: pinned ({copied} of {len(r.layers)} layers copied, "
              f"{size / 2**20:.1f} MiB)")
    return 0
