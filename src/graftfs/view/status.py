"""What ``graftfs status`` reports about the view, as typed values.

The daemon adds its own part (version, pid, FUSE counters, watcher, leases: graftfs.node.daemon)
and serves the whole as JSON through the ``user.graftfs.status`` extended attribute; the keys of
``as_dict`` are that JSON's keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from graftfs.catalog.live import TreeStatus

#: The version of the status JSON (README: "graftfs status --json"). Within a version fields are
#: only added; renaming or removing one, or changing what it means, raises it.
STATUS_VERSION = 1
#: At most this many hidden paths and skipped entries are listed (the counts are exact).
HIDDEN_LISTED = 200
SKIPPED_LISTED = 500


@dataclass
class LayoutStatus:
    """A layout's part: its shared trees, the entries it leaves out and why, the node's pins."""

    layout: str
    ro: list[TreeStatus] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # the first SKIPPED_LISTED
    skipped_count: int = 0
    pins: list[dict[str, object]] | None = None  # pinned images (containers-storage mounts)


@dataclass(frozen=True)
class RwStatus:
    tree: str
    layers: int  # entries in the RW tree's managed directories
    images: int


@dataclass
class ViewStatus:
    """The view's part of the status: the layout's, the RW tree's, and the node's hides."""

    layout: LayoutStatus
    rw: RwStatus
    hidden: list[str]  # the first HIDDEN_LISTED hidden paths
    hidden_count: int
    cache: dict[str, object] | None = None  # node-local copies of shared images' small files
    hidden_images: list[dict[str, object]] = field(default_factory=list)  # the first HIDDEN_LISTED
    hidden_images_count: int = 0  # shared images hidden on this node (graftfs.view.hidden)
    hidden_layers: int = 0  # shared layers hidden on this node

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "status_version": STATUS_VERSION,
            "layout": self.layout.layout,
            "ro": [_tree_dict(t) for t in self.layout.ro],
            "skipped": self.layout.skipped,
            "skipped_count": self.layout.skipped_count,
            "rw": dataclasses.asdict(self.rw),
            "hidden": self.hidden,
            "hidden_count": self.hidden_count,
            "hidden_images": self.hidden_images,
            "hidden_images_count": self.hidden_images_count,
            "hidden_layers": self.hidden_layers,
        }
        if self.layout.pins is not None:
            out["pins"] = self.layout.pins
        if self.cache is not None:
            out["cache"] = self.cache
        return out


def _tree_dict(tree: TreeStatus) -> dict[str, object]:
    """One shared tree; the unavailability keys only while it is unavailable."""
    out = dataclasses.asdict(tree)
    if tree.unavailable_since is None:
        del out["unavailable_since"], out["unavailable_reason"]
    return out
