"""graftfs publish: copy images from a node's graph into a share, entry by entry, atomically."""

from __future__ import annotations

import argparse
import json
import os
import sys

from graftfs.share.publish import Graph, Publisher, PublishError

NAME = "publish"
HELP = "publish images (name or id) from a containers/storage graph into a share"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--graph", required=True, help="the graph directory (e.g. /var/lib/containers/storage)")
    p.add_argument("--share", required=True, help="the share's directory (an empty directory starts a share)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="name (localhost/app:1, app:1), id or unique id prefix")


def run(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.share):
        print(f"graftfs publish: share {args.share} does not exist or is not a directory", file=sys.stderr)
        return 1
    tty = sys.stderr.isatty() and not args.json

    def progress(line: str) -> None:
        if args.json:
            return
        # indented under the image's summary line, which follows on stdout (flushed in turn, so
        # that `2>&1` keeps them in order)
        print(("\r\033[K" if tty else "") + "  " + line, end="" if tty else "\n", file=sys.stderr, flush=True)

    def meter(done: int, expected: int) -> None:
        width = 30
        frac = min(1.0, done / expected) if expected else 0.0
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        print(f"\r\033[K  [{bar}] {done / 2**20:8.1f} / {expected / 2**20:.1f} MiB", end="", file=sys.stderr,
              flush=True)

    results = []
    try:
        graph = Graph.load(args.graph)
        for ref in args.images:
            result = Publisher(graph, args.share, progress, meter if tty else None).publish(ref)
            results.append(result)
            if tty:
                print(file=sys.stderr)
            if not args.json:
                published = sum(1 for la in result.layers if la.status == "published")
                print(f"{result.id[:12]} {' '.join(result.names)}: {result.status} "
                      f"({published} of {len(result.layers)} layers copied)", flush=True)
    except PublishError as e:
        print(f"graftfs publish: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"graftfs publish: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 1
    finally:
        if args.json:
            print(json.dumps({"share": os.path.abspath(args.share), "images": [r.as_dict() for r in results]}))
    return 0
