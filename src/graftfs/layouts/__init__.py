"""Layout adapters: what each shared (RO) tree contributes at a path of the merged view.

The union model (graftfs.namespace) knows nothing about container images. It asks the layout
three questions about the RO trees:

* ``ro_path(tree, vpath)``: where, in RO tree ``tree``, the entry at view path ``vpath`` lives,
  or None when that tree must not show anything there (an incomplete layer, iSulad's ``RO/``
  directories, the share's private files);
* ``ro_names(tree, vpath)``: the names that tree shows in directory ``vpath``, or None to list
  the backing directory as it is;
* ``synthetic(vpath)`` / ``synthetic_names(vpath)``: entries that exist in no tree but are
  computed, like ``overlay/l/<short>`` links of shared layers.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Protocol

from graftfs import share
from graftfs.attrs import Attr

VPath = tuple[str, ...]


class HideView(Protocol):
    """What a layout may ask of the node's hides (graftfs.hides.HideStore)."""

    generation: int

    def covers(self, vpath: VPath) -> bool: ...
    def hides_below(self, vpath: VPath) -> bool: ...
    def add(self, vpath: VPath) -> None: ...

#: The node's private state directory at the top of its RW tree (hides, saved scans).
STATE_DIR_NAME = ".graftfs"
#: Names at the top of a shared tree that belong to graftfs itself (marker, staging, leases).
SHARE_PRIVATE_PREFIX = ".graftfs"
#: The file at the top of a share that says "this is a share": without it, an empty directory
#: (an NFS export that is not mounted) would read as "every image was deleted".
MARKER_NAME = share.MARKER_NAME


@dataclass(frozen=True)
class Synthetic:
    """An entry computed from the catalog rather than read from a tree."""

    origin: str
    attr: Attr
    link_target: str | None = None  # set for symlinks
    content: bytes | None = None  # set for files composed in memory (see Layout.merged)


@dataclass(frozen=True, slots=True)
class ViewChange:
    """A name in the view whose entry may have appeared, vanished or changed.

    ``deep`` says the entry's contents changed as well (a record directory rewritten), so the
    kernel's cached entries below it are dropped too; only set where nothing is mounted below.
    """

    parent: tuple[str, ...]
    name: str
    deep: bool = False


def list_share_root(root: str) -> list[str]:
    """Names at the top of a shared tree, without graftfs' own files (marker, staging)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return [n for n in names if not n.startswith(SHARE_PRIVATE_PREFIX)]


class PlainLayout:
    """No image rules: every RO tree is shown as it is (apart from graftfs' own files)."""

    name = "plain"
    watchable = False  # no catalog to diff: changes show once the (short) kernel caches expire

    def __init__(self, trees: list[str]) -> None:
        self.trees = trees

    def ro_path(self, tree: int, vpath: VPath) -> str | None:
        if vpath and vpath[0].startswith(SHARE_PRIVATE_PREFIX):
            return None
        return os.path.join(self.trees[tree], *vpath)

    def ro_names(self, tree: int, vpath: VPath) -> list[str] | None:
        return list_share_root(self.trees[tree]) if not vpath else None

    def synthetic(self, vpath: VPath) -> Synthetic | None:
        return None

    def synthetic_names(self, vpath: VPath) -> list[str]:
        return []

    def missing(self, tree: int, vpath: VPath) -> Attr | None:
        return None

    def unavailable(self, tree: int) -> bool:
        return False

    def merged(self, vpath: VPath, hides: HideView) -> Synthetic | None:
        return None

    def direct_path(self, vpath: VPath) -> bool:
        return False

    def absorb(self, vpath: VPath, written: str, hides: HideView, writer: int = 0) -> None:
        raise OSError(errno.EPERM, "not a merged file", "/".join(vpath))

    def note_read(self, vpath: VPath, reader: int) -> None:
        return None

    def status(self) -> dict[str, object]:
        return {"layout": self.name}
