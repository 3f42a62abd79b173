"""The plain layout: every shared tree shown as it is, apart from graftfs' own files.

No image rules and no catalog: changes in a shared tree show once the kernel's (short) caches
expire.
"""

from __future__ import annotations

import os

from graftfs.catalog.catalog import CatalogDiff
from graftfs.catalog.scan import list_share_root
from graftfs.format.attrs import Attr
from graftfs.format.names import SHARE_PRIVATE_PREFIX
from graftfs.view.layout import NoMergedFiles, Synthetic, ViewChange, VPath
from graftfs.view.status import LayoutStatus


class PlainLayout(NoMergedFiles):
    name = "plain"
    live = None
    binds = False
    leases = False

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

    def known_attr(self, tree: int, vpath: VPath) -> Attr | None:
        return None

    def cache_key(self, tree: int, vpath: VPath) -> str | None:
        return None

    def unavailable(self, tree: int) -> bool:
        return False

    def direct_path(self, vpath: VPath) -> bool:
        return False

    def own_layer_dir(self, vpath: VPath) -> bool:
        return False

    def link_shared(self, vpath: VPath) -> bool:
        return False

    def view_changes(self, diff: CatalogDiff) -> list[ViewChange]:
        return []

    def announce(self, wait: float | None = None) -> None:
        return None

    def status(self) -> LayoutStatus:
        return LayoutStatus(self.name)
