"""graftfs gc: delete retired images and the layers nothing uses, never one a node or publisher uses."""

from __future__ import annotations

import argparse
import json
import sys

from graftfs.cli.common import attempt
from graftfs.share.gc import DEFAULT_GRACE, collect

NAME = "gc"
HELP = "delete retired images' layers that no live lease, publisher or published image needs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--share", required=True, help="the share's directory")
    p.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="SECONDS",
                   help=f"leave debris of killed publishers younger than this (default {DEFAULT_GRACE:g})")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")


def run(args: argparse.Namespace) -> int:
    if args.grace < 0:
        print("graftfs gc: --grace must not be negative", file=sys.stderr)
        return 2
    say = (lambda line: None) if args.json else print
    p = attempt("gc", lambda: collect(args.share, args.dry_run, args.grace, say))
    if p is None:
        return 1
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, **p.as_dict()}))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    debris = set(p.debris)
    for ref in p.deletes():
        print(f"{verb} {ref.short()}" + (" (left by a killed publisher)" if ref in debris else ""))
    for name in p.staging + p.old_trash:
        print(f"{verb} leftover {name}")
    for what, why in sorted(p.kept.items()):
        print(f"kept {what.short()}: {why}")
    print(f"{len(p.images)} images, {len(p.layers)} layers, {p.bytes / 2**20:.1f} MiB "
          f"{'to free' if args.dry_run else 'freed'}")
    return 0
