"""graftfs unpublish: retire images in a share (mounted nodes stop showing them; gc deletes later)."""

from __future__ import annotations

import argparse
import json

from graftfs.cli.common import attempt
from graftfs.share.gc import unpublish

NAME = "unpublish"
HELP = "retire images in a share: nodes stop offering them at once, `graftfs gc` deletes them once unused"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--share", required=True, help="the share's directory")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="name, id or unique id prefix")


def run(args: argparse.Namespace) -> int:
    results = attempt("unpublish", lambda: unpublish(args.share, args.images))
    if results is None:
        return 1
    if args.json:
        print(json.dumps([vars(r) for r in results]))
    for r in results if not args.json else []:
        print(f"{r.id[:12]} {' '.join(r.names)}: {r.status}")
    return 0
