"""The ``graftfs`` command: one module per subcommand, wired up here.

Bad arguments get one line on stderr and exit status 2 (argparse's long usage text is only
printed for --help); operational failures get one line and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from graftfs import __version__
from graftfs.cli import demo, fsck, gc, mount, pin, publish, remount, status, umount, unhide, unpin, unpublish


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="graftfs", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"graftfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for module in (mount, umount, remount, status, unhide, publish, unpublish, gc, fsck, pin, unpin, demo):
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP,
                           epilog=getattr(module, "EPILOG", None), formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("graftfs: interrupted", file=sys.stderr)
        return 130
