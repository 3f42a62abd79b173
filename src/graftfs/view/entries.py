"""The per-entry part of the view: shared layers and images shown one directory per entry.

Both runtimes' layouts show a shared layer as ``overlay/<id>/`` with ``overlay/l/<short>``
pointing at its ``diff``, only while the catalog lists it as complete; the iSulad layout also
shows ``overlay-layers/<id>/`` and ``overlay-images/<id>/`` record directories. ``EntryView``
answers those paths from the catalog (dictionary reads, no directory scans) and is held by the
presenters that show entries so: graftfs.view.isulad and graftfs.view.containers_storage build on
it (neither on the other), the latter changing what it shows below ``overlay-layers/``.
"""

from __future__ import annotations

import errno
import os

from graftfs.catalog.catalog import CatalogDiff
from graftfs.catalog.live import LiveCatalog
from graftfs.catalog.scan import RECORD_DIR_SIG, Sig
from graftfs.format.attrs import Attr
from graftfs.format.names import (
    IMAGES,
    LAYERS,
    MANAGED_DIRS,
    OVERLAY,
    SHARE_PRIVATE_PREFIX,
    SHORT_DIR,
    is_id,
    origin_of,
)
from graftfs.view.layout import Synthetic, ViewChange, VPath
from graftfs.view.status import SKIPPED_LISTED, LayoutStatus

#: The directories of a layer that the kernel's overlay mount uses as lower, upper and work.
DIRECT_NAMES = frozenset({"diff", "work"})
#: A layer's small files the runtime reads for every container it starts on the layer.
SMALL_LAYER_FILES = frozenset({"link", "lower"})


class EntryView:
    """Shared entries at their per-entry paths, from ``live``'s current catalog.

    ``direct``: each layer's ``diff/`` and ``work/`` are shown as links to their backing
    directories, so the kernel's overlay mounts (and everything a container does) bypass
    graftfs (graftfs.view.namespace, Namespace._direct). With ``WHOLE_LAYER_LINKS`` too, a
    layer's whole directory (``overlay/<id>``) that the node holds itself is shown as a link to
    its RW directory: the runtime makes, mounts and removes a container's layer (and imports a
    pulled one) on the backing filesystem, with no request to graftfs below the link.
    """

    #: whether ``overlay/<id>`` itself may be a link (the runtime's own directories in it only)
    WHOLE_LAYER_LINKS = False

    def __init__(self, live: LiveCatalog, direct: bool) -> None:
        self.live = live
        self.trees = live.trees
        self.direct = direct

    def entry_base(self, tree: int, top: str, name: str) -> str | None:
        """The backing directory of entry ``name`` of managed dir ``top`` when ``tree`` is the one
        that shows it (None otherwise)."""
        cat = self.live.catalog
        if top == IMAGES:
            image = cat.images.get(name)
            return image[1].record_dir if image and image[0] == tree else None
        layer = cat.layers.get(name)
        if layer is None or layer[0] != tree:
            return None
        return layer[1].overlay_dir if top == OVERLAY else layer[1].record_dir

    def ro_path(self, tree: int, vpath: VPath) -> str | None:
        root = self.trees[tree]
        if not vpath:
            return root
        top = vpath[0]
        if top.startswith(SHARE_PRIVATE_PREFIX):
            return None
        known = self.live.shared[tree].top_attrs
        if known and top not in known:
            # the tree's top as its last poll saw it (a new name there shows once polled): names
            # of the node's own (the runtime's files at the graph root, its directories) never
            # ask a share that may hang
            return None
        if top not in MANAGED_DIRS or len(vpath) == 1:
            return os.path.join(root, *vpath)
        if top == OVERLAY and vpath[1] == SHORT_DIR:
            return None  # overlay/l is synthesized from the link files
        base = self.entry_base(tree, top, vpath[1])
        if base is None:
            return None
        if vpath[2:] == ("lower",) and top == OVERLAY and self._parentless(vpath[1]):
            return None  # a layer without a parent has no lower file: no need to ask the tree
        return os.path.join(base, *vpath[2:])

    def _parentless(self, lid: str) -> bool:
        layer = self.live.catalog.layers.get(lid)
        return layer is not None and layer[1].parent is None

    def ro_names(self, tree: int, vpath: VPath) -> list[str] | None:
        if not vpath:
            return list(self.live.shared[tree].top_names)
        if len(vpath) == 1 and vpath[0] in MANAGED_DIRS:
            if vpath[0] == IMAGES:
                return self.live.catalog.image_ids_in(tree)
            return self.live.catalog.layer_ids_in(tree)
        return None

    def known_attr(self, tree: int, vpath: VPath) -> Attr | None:
        """Attributes answered without asking the tree, so that what the view already knows
        never waits on a share that hangs: the tree's root and the directories at its top as its
        last poll saw them (the runtime looks them up all the time), and the directories of each
        layer (overlay and record) and image the catalog shows from it, as its scan saw them (a
        share's entry is placed whole and never changed), also for a layer's ``diff`` shown as a
        link. None: ask the tree."""
        if len(vpath) <= 1:
            attr = self.live.shared[tree].top_attrs.get(vpath[0] if vpath else "")
            return attr if attr is not None and attr.is_dir else None
        if vpath[0] not in (OVERLAY, IMAGES, LAYERS) or len(vpath) > 3:
            return None
        if len(vpath) == 3 and not (vpath[2] == "diff" and self.direct_path(vpath)):
            return None  # a file of the entry: its own attributes (or its cached copy's)
        sigs = self._entry_sigs(tree, vpath[0], vpath[1])
        index = RECORD_DIR_SIG if vpath[0] == LAYERS else 0  # a layer's record dir, else the entry's dir
        sig = sigs[index] if sigs and len(sigs) > index else None
        if sig is None:
            return None
        _, size, mtime, ctime, mode, nlink, uid, gid = sig
        return Attr(mode, nlink, uid, gid, size, 0, (size + 511) // 512, 4096, mtime, mtime, ctime)

    def cache_key(self, tree: int, vpath: VPath) -> str | None:
        """Where a node-local copy of a small file of a shared entry is kept
        (graftfs.view.small_files): an image's files, a layer's ``link`` and ``lower``; under the
        entry and the identity of its directory and record, so an entry placed anew, or a record
        rewritten in place (which the scan notices), is never answered from an old copy. None
        for anything else."""
        if len(vpath) != 3 or not (vpath[0] == IMAGES or (vpath[0] == OVERLAY and vpath[2] in SMALL_LAYER_FILES)):
            return None
        sigs = self._entry_sigs(tree, vpath[0], vpath[1])
        if not sigs or any(sig is None for sig in sigs):
            return None
        # sizes and mtimes only: a network filesystem may number inodes anew (sshfs does)
        identity = "-".join(f"{sig[1]}.{sig[2]}" for sig in sigs if sig is not None)
        return f"{vpath[0]}/{vpath[1]}/{identity}/{vpath[2]}"

    def _entry_sigs(self, tree: int, top: str, eid: str) -> tuple[Sig | None, ...] | None:
        """The scan's signatures of a layer's (``overlay``) or an image's entry when ``tree`` shows
        it: its directory first, then its files (see graftfs.catalog.scan)."""
        kind, entries = ("image", self.live.catalog.images) if top == IMAGES else ("layer", self.live.catalog.layers)
        entry = entries.get(eid)
        if entry is None or entry[0] != tree:
            return None
        return self.live.shared[tree].scan.sigs.get((kind, eid))

    def synthetic(self, vpath: VPath) -> Synthetic | None:
        """``overlay/l`` and its links to the shared layers' diffs."""
        if len(vpath) < 2 or vpath[0] != OVERLAY or vpath[1] != SHORT_DIR:
            return None
        cat = self.live.catalog
        if not cat.shorts:
            return None
        if len(vpath) == 2:
            return Synthetic(origin_of(self.trees[0]), Attr.synthetic_dir(cat.shorts_mtime_ns))
        if len(vpath) == 3 and vpath[2] in cat.shorts:
            tree, entry = cat.shorts[vpath[2]]
            target = f"../{entry.id}/diff"
            attr = Attr.synthetic_symlink(target, entry.mtime_ns)
            return Synthetic(origin_of(self.trees[tree]), attr, target)
        return None

    def synthetic_names(self, vpath: VPath) -> list[str]:
        if not self.live.catalog.shorts:
            return []
        if vpath == (OVERLAY,):
            return [SHORT_DIR]
        if vpath == (OVERLAY, SHORT_DIR):
            return list(self.live.catalog.shorts)
        return []

    def missing(self, tree: int, vpath: VPath) -> Attr | None:
        """Called when a backing entry is missing: the attributes to show instead, if any.

        For an available tree the entry is simply absent (None). For an unavailable one the last
        known top of the tree is shown as it was, and anything deeper fails with EIO: the share
        cannot tell, and ENOENT could make a runtime drop an image that is only out of reach.
        """
        shared = self.live.shared[tree]
        if shared.available:
            return None
        if len(vpath) <= 1:
            return shared.top_attrs.get(vpath[0] if vpath else "")
        if vpath[0] not in MANAGED_DIRS and vpath[0] not in shared.top_attrs:
            return None  # nothing of that name at the top when last seen: nothing below it either
        if len(vpath) == 2 and vpath[0] in MANAGED_DIRS and self.entry_base(tree, vpath[0], vpath[1]):
            # an entry the catalog still lists: keep showing it (its contents are out of reach)
            managed = shared.top_attrs.get(vpath[0])
            return Attr.synthetic_dir(managed.mtime_ns if managed else 0, 0o755)
        raise OSError(errno.EIO, f"shared tree {shared.root} is unavailable ({shared.unavailable_reason})",
                      "/".join(vpath))

    def unavailable(self, tree: int) -> bool:
        """Is shared tree ``tree`` out of reach (its last known view is shown: see missing)?"""
        return not self.live.available(tree)

    def direct_path(self, vpath: VPath) -> bool:
        """True for ``overlay/<id>/diff`` and ``overlay/<id>/work`` when direct is on (layers only:
        containers/storage's own overlay checks make other directories there), and for
        ``overlay/<id>`` itself with WHOLE_LAYER_LINKS (see link_shared)."""
        if not self.direct or vpath[:1] != (OVERLAY,) or len(vpath) < 2 or not is_id(vpath[1]):
            return False
        return (len(vpath) == 3 and vpath[2] in DIRECT_NAMES) or (len(vpath) == 2 and self.WHOLE_LAYER_LINKS)

    def link_shared(self, vpath: VPath) -> bool:
        """Whether a direct path that a shared tree alone holds is linked into the share too: a
        layer's ``diff`` and ``work`` are (only the kernel's overlay mounts read them), its
        whole directory is not (the runtime makes ``merged`` and the like in it: those go to RW,
        merged with the share's part by graftfs)."""
        return len(vpath) == 3

    def own_layer_dir(self, vpath: VPath) -> bool:
        """Is ``vpath`` a layer directory of a layer the node holds itself (its RW copy whole)?

        The node that pulled, built or published a layer keeps its own copy: where a share holds
        the same layer (the node published it), the view links to the RW copy alone, so the node's
        containers stay off FUSE and the entry never turns from a link into a merged directory."""
        return self.direct_path(vpath) and vpath[1] in self.live.local_layers()

    def view_changes(self, diff: CatalogDiff) -> list[ViewChange]:
        """The view names to re-check after the catalog changed."""
        changes: list[ViewChange] = []
        moved = set(diff.moved)
        for lid in diff.layers:
            changes.append(ViewChange((OVERLAY,), lid))
            changes.append(ViewChange((LAYERS,), lid, deep=True))
            changes.extend(ViewChange((OVERLAY, lid), name) for name in ("link", "lower"))
            if lid in moved:
                # another shared tree holds it now (a pin, or the share after an unpin): diff/ and
                # work/, shown as links, must point there
                changes.extend(ViewChange((OVERLAY, lid), name) for name in sorted(DIRECT_NAMES))
        changes.extend(ViewChange((IMAGES,), iid, deep=True) for iid in diff.images)
        changes.extend(ViewChange((OVERLAY, SHORT_DIR), short) for short in diff.shorts)
        if diff.shorts:
            changes.append(ViewChange((OVERLAY,), SHORT_DIR))
        changes.extend(ViewChange((), name) for name in sorted(diff.top_names | diff.managed))
        return changes

    def entry_status(self, name: str) -> LayoutStatus:
        problems = self.live.catalog.problems
        skipped = [{"tree": p.tree, "kind": p.kind, "id": p.id, "reason": p.reason} for p in problems[:SKIPPED_LISTED]]
        return LayoutStatus(name, self.live.tree_status(), skipped, len(problems))
