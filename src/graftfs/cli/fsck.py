"""graftfs fsck: check a share's entries are whole, and list leftovers of killed publishers or gcs."""

from __future__ import annotations

import argparse
import json

from graftfs.cli.common import attempt
from graftfs.share.fsck import check

NAME = "fsck"
HELP = "check every entry of a share (complete, referenced) and find staging or trash leftovers"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--share", required=True, help="the share's directory")
    p.add_argument("--json", action="store_true", help="print a machine-readable report")


def run(args: argparse.Namespace) -> int:
    report = attempt("fsck", lambda: check(args.share))
    if report is None:
        return 2
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        c = report.counts
        print(f"{args.share}: {c['images']} images ({c['retired']} retired), {c['layers']} layers, "
              f"{c['live_leases']} live leases, {c['intents']} publishes running")
        for line in report.in_progress:
            print(f"in progress: {line}")
        for line in report.problems:
            print(f"PROBLEM: {line}")
        print(f"{len(report.problems)} problems")
    return 1 if report.problems else 0
