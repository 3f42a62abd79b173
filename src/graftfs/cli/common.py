"""Small things the share commands have in common: one-line errors, quiet library logging."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from graftfs.node.mounts import FSTYPE, canonical, find_mount
from graftfs.share.publish import PublishError
from graftfs.share.state import ShareError

T = TypeVar("T")


def one_line(e: BaseException) -> str:
    """An error as the one line a user sees (OSError: its message and the path it names)."""
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{where}"
    return str(e).replace("\n", " ")


def quiet_logging(verbose: bool = False) -> None:
    """The reader's per-entry warnings (a broken entry) are the commands' findings, printed by
    the command itself; the library's log goes to stderr only from warnings up with --verbose."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING if verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")


def attempt(command: str, call: Callable[[], T]) -> T | None:
    """Run a share operation for ``graftfs <command>``, the library's log quiet; on a share,
    publish or OS error print its one line and answer None (the command exits non-zero)."""
    quiet_logging()
    try:
        return call()
    except (ShareError, PublishError, OSError) as e:
        print(f"graftfs {command}: {one_line(e)}", file=sys.stderr)
        return None


def graftfs_mountpoint(command: str, given: str) -> str | None:
    """``given`` as the mount table spells it, when a graftfs mount is there; else None after
    one line for ``graftfs <command>``."""
    mp = canonical(given)
    entry = find_mount(mp)
    if entry is None or entry.fstype != FSTYPE:
        print(f"graftfs {command}: {mp} is not a graftfs mount", file=sys.stderr)
        return None
    return mp
