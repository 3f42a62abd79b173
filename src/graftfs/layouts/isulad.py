"""The iSulad graph layout: which shared layers and images a node may see.

iSulad (and the legacy containers/storage per-entry layout) keeps one directory per entry:

    overlay/<id>/{diff,link,lower,work,merged}     the layer's files and its short link name
    overlay/l/<short> -> ../<id>/diff               short names that keep mount(2) options short
    overlay-layers/<id>/layer.json                  the layer record (parent, digests, ...)
    overlay-images/<id>/images.json                 the image record (top layer, names, ...)

A shared tree may also be an iSulad *remote-RO* share, where the same entries sit one level down
in ``overlay/RO/<id>`` and ``overlay-layers/RO/<id>`` and iSulad keeps real symlinks beside them.
graftfs presents both shapes in the legacy layout and never shows the ``RO`` directories.

The rule that makes sharing safe is that a reader only ever sees *complete* entries: a layer
whose files, short link and record are all there and whose parent is visible, and an image whose
record parses and whose whole layer chain is visible. Everything else is left out of the view
and reported (with the reason) by ``graftfs status``.

The catalog is rebuilt whenever a poll of a tree (graftfs.layouts.share_tree) finds a change,
and compared with the previous one to tell the kernel exactly which names changed. Polling and
rebuilding are plain blocking I/O; the watcher runs them in worker threads.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from graftfs.attrs import Attr
from graftfs.layouts import SHARE_PRIVATE_PREFIX, STATE_DIR_NAME, HideView, Synthetic, ViewChange, scan_cache
from graftfs.layouts.share_tree import (
    ID_RE,
    IMAGES,
    LAYERS,
    MANAGED_DIRS,
    OVERLAY,
    REMOTE_RO_DIR,
    SHORT_DIR,
    EntryKey,
    ImageEntry,
    LayerEntry,
    Problem,
    SharedTree,
    TreeChange,
    TreeScan,
    _entry_dirs,
    scan_tree,
)

__all__ = ["IMAGES", "LAYERS", "MANAGED_DIRS", "OVERLAY", "REMOTE_RO_DIR", "SHORT_DIR", "Catalog", "IsuladLayout",
           "build_catalog", "diff_catalogs", "scan_tree"]

log = logging.getLogger(__name__)

@dataclass
class Catalog:
    """The shared entries every RO tree contributes to the view, after the chain checks.

    ``layers``/``images`` map an id to (tree index, entry); the first tree that has a complete
    entry wins, which is the union's resolution order. A catalog is never changed once built:
    a new one replaces it, so readers in other threads always see a consistent one.
    """

    trees: list[str]
    layers: dict[str, tuple[int, LayerEntry]] = field(default_factory=dict)
    images: dict[str, tuple[int, ImageEntry]] = field(default_factory=dict)
    shorts: dict[str, tuple[int, LayerEntry]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    remote_ro: list[bool] = field(default_factory=list)
    layers_by_tree: list[list[str]] = field(default_factory=list)
    images_by_tree: list[list[str]] = field(default_factory=list)
    shorts_mtime_ns: int = 0  # newest link file: the times of the synthesized overlay/l
    layer_problems: list[Problem] = field(default_factory=list)  # broken chains
    layer_inputs: tuple[list[dict[str, LayerEntry]], frozenset[str]] | None = None  # what the layer half used

    def layer_ids_in(self, tree: int) -> list[str]:
        return self.layers_by_tree[tree] if tree < len(self.layers_by_tree) else []

    def image_ids_in(self, tree: int) -> list[str]:
        return self.images_by_tree[tree] if tree < len(self.images_by_tree) else []


def _chain_reasons(candidates: dict[str, LayerEntry], local: set[str],
                   known_good: Iterable[str] = ()) -> dict[str, str | None]:
    """For every candidate layer: why its parent chain is not visible, or None when it is.

    Each chain is walked once (results are shared along it), so 10,000 layers in deep images
    cost one pass, not one walk per layer.
    """
    result: dict[str, str | None] = dict.fromkeys(known_good)
    for lid in candidates:
        chain: list[str] = []
        on_chain: set[str] = set()
        cur: str | None = lid
        reason: str | None = None
        while cur is not None:
            if cur in result:
                reason = result[cur]
                break
            if cur in on_chain:
                reason = "parent chain loops"
                break
            entry = candidates.get(cur)
            if entry is None:
                reason = None if cur in local else f"parent layer {cur[:12]} is not visible"
                break
            chain.append(cur)
            on_chain.add(cur)
            cur = entry.parent
        for c in chain:
            result[c] = reason
    return result


def build_catalog(scans: Iterable[TreeScan], local_layers: set[str], old: Catalog | None = None) -> Catalog:
    """Combine per-tree scans into the view's catalog, dropping broken chains.

    ``local_layers`` are the layer ids the RW tree holds; a shared layer may sit on one of them.
    When no tree's layers changed since ``old`` (the same dictionaries, see TreeScan), the layer
    half of ``old`` is reused: publishing an image on known layers costs no layer work. Problems
    not already in ``old`` are logged (once, not at every rebuild).
    """
    scans = list(scans)
    cat = Catalog([s.root for s in scans], remote_ro=[s.remote_ro for s in scans])
    inputs = ([s.layers for s in scans], frozenset(local_layers))
    if old is not None and _same_inputs(old.layer_inputs, inputs):
        cat.layers, cat.layers_by_tree, cat.shorts = old.layers, old.layers_by_tree, old.shorts
        cat.shorts_mtime_ns, cat.layer_problems = old.shorts_mtime_ns, old.layer_problems
    elif old is None or not _add_layers(cat, old, scans, local_layers):
        _build_layers(cat, scans, local_layers)
    cat.layer_inputs = inputs
    cat.problems = [p for s in scans for p in s.problems] + cat.layer_problems
    cat.images_by_tree = [[] for _ in scans]
    for ti, scan in enumerate(scans):
        for iid, img in scan.images.items():
            if iid in cat.images or iid in scan.retired:
                continue  # first tree wins; a retired image is kept from new use (graftfs unpublish)
            top = img.top_layer
            if top is not None and top not in cat.layers and top not in local_layers:
                reason = f"top layer {top[:12]} is not visible"
                cat.problems.append(Problem(scan.root, "image", iid, reason))
                continue
            cat.images[iid] = (ti, img)
            cat.images_by_tree[ti].append(iid)
    known = set(old.problems) if old is not None else set()
    for p in cat.problems:
        if p not in known:
            log.warning("skipping %s %s in %s: %s", p.kind, p.id, p.tree, p.reason)
    return cat


def _same_inputs(a: tuple[list[dict[str, LayerEntry]], frozenset[str]] | None,
                 b: tuple[list[dict[str, LayerEntry]], frozenset[str]]) -> bool:
    if a is None or len(a[0]) != len(b[0]) or a[1] != b[1]:
        return False
    return all(x is y for x, y in zip(a[0], b[0], strict=True))


def _added_layers(old: Catalog, scans: list[TreeScan], local_layers: set[str]
                  ) -> dict[str, tuple[int, LayerEntry]] | None:
    """The layers that are new since ``old`` (first tree wins), or None when anything else changed
    (a layer gone or rewritten, the trees or the local layers different)."""
    if old.layer_inputs is None or len(old.layer_inputs[0]) != len(scans) or old.layer_inputs[1] != local_layers:
        return None
    added: dict[str, tuple[int, LayerEntry]] = {}
    for ti, (before, scan) in enumerate(zip(old.layer_inputs[0], scans, strict=True)):
        now = scan.layers
        if before.keys() - now.keys():
            return None
        for lid in now.keys() - before.keys():
            added.setdefault(lid, (ti, now[lid]))
        if any(now[lid] is not entry for lid, entry in before.items()):
            return None
    return added


def _add_layers(cat: Catalog, old: Catalog, scans: list[TreeScan], local_layers: set[str]) -> bool:
    """Extend ``old``'s layer half with newly published layers; False when a full build is needed.

    Adding layers never hides a visible one, so only the new layers and the ones whose chain was
    broken before need their chains walked: publishing into a 10,000-layer share stays cheap.
    """
    added = _added_layers(old, scans, local_layers)
    waiting = {p.id: p for p in old.layer_problems}
    if added is None or any(lid in old.layers or lid in waiting for lid in added):
        return False  # an id in several trees: which tree wins is the full build's business
    candidates: dict[str, tuple[int, LayerEntry]] = dict(added)
    for lid, problem in waiting.items():
        for ti, scan in enumerate(scans):
            if scan.root == problem.tree and lid in scan.layers:
                candidates.setdefault(lid, (ti, scan.layers[lid]))
    flat = {lid: e for lid, (_, e) in candidates.items()}
    visible = {lid: e for lid, (_, e) in old.layers.items()}
    reasons = _chain_reasons(flat, local_layers, known_good=visible.keys())
    cat.layers = dict(old.layers)
    cat.layers_by_tree = [list(ids) for ids in old.layers_by_tree]
    cat.shorts = dict(old.shorts)
    cat.shorts_mtime_ns = old.shorts_mtime_ns
    for lid, (ti, entry) in candidates.items():
        _place_layer(cat, scans, lid, ti, entry, reasons[lid])
    return True


def _place_layer(cat: Catalog, scans: list[TreeScan], lid: str, ti: int, entry: LayerEntry, reason: str | None) -> None:
    if reason is None:
        cat.layers[lid] = (ti, entry)
        cat.layers_by_tree[ti].append(lid)
        cat.shorts.setdefault(entry.short, (ti, entry))
        if entry.mtime_ns > cat.shorts_mtime_ns:
            cat.shorts_mtime_ns = entry.mtime_ns
    else:
        cat.layer_problems.append(Problem(scans[ti].root, "layer", lid, reason))


def _build_layers(cat: Catalog, scans: list[TreeScan], local_layers: set[str]) -> None:
    """The layer half of the catalog: first tree wins, then every chain must be visible."""
    candidates: dict[str, tuple[int, LayerEntry]] = {}
    for ti, scan in enumerate(scans):
        for lid, entry in scan.layers.items():
            candidates.setdefault(lid, (ti, entry))
    reasons = _chain_reasons({lid: e for lid, (_, e) in candidates.items()}, local_layers)
    cat.layers_by_tree = [[] for _ in scans]
    for lid, (ti, entry) in candidates.items():
        _place_layer(cat, scans, lid, ti, entry, reasons[lid])


def diff_catalogs(old: Catalog, new: Catalog, touched: set[tuple[int, EntryKey]]) -> list[ViewChange]:
    """The view names that differ between two catalogs (plus entries changed in place)."""
    changes: list[ViewChange] = []
    for lid in _changed(old.layers, new.layers, {eid for _, (kind, eid) in touched if kind == "layer"}):
        changes.append(ViewChange((OVERLAY,), lid))
        changes.append(ViewChange((LAYERS,), lid, deep=True))
        changes.extend(ViewChange((OVERLAY, lid), name) for name in ("link", "lower"))
        before, now = old.layers.get(lid), new.layers.get(lid)
        if before is not None and now is not None and before[0] != now[0]:
            # another shared tree holds it now (a pin, or the share after an unpin): diff/ and
            # work/, shown as links, must point there
            changes.extend(ViewChange((OVERLAY, lid), name) for name in ("diff", "work"))
    for iid in _changed(old.images, new.images, {eid for _, (kind, eid) in touched if kind == "image"}):
        changes.append(ViewChange((IMAGES,), iid, deep=True))
    shorts = _changed(old.shorts, new.shorts, set())
    changes.extend(ViewChange((OVERLAY, SHORT_DIR), short) for short in shorts)
    if shorts:
        changes.append(ViewChange((OVERLAY,), SHORT_DIR))
    return changes


def _changed(old: Mapping[str, object], new: Mapping[str, object], touched: set[str]) -> list[str]:
    """Keys added, removed, or whose value differs, plus ``touched`` ones."""
    if old is new:
        return [k for k in touched if k in old]
    out = [k for k, v in new.items() if old.get(k) != v]
    out += [k for k in old if k not in new]
    out += [k for k in touched if k in old or k in new]
    return list(dict.fromkeys(out))


def local_layer_ids(rw_root: str) -> set[str]:
    """Layer ids the node's own RW tree holds (a shared layer's parent may be one of them)."""
    return set(_entry_dirs(rw_root, LAYERS))


#: The directories of a layer that the kernel's overlay mount uses as lower, upper and work.
DIRECT_NAMES = frozenset({"diff", "work"})


class IsuladLayout:
    """Presents RO trees in the legacy iSulad layout, showing complete entries only.

    ``refresh`` scans every tree; ``poll_tree`` and ``commit`` (used by graftfs.watcher) keep the
    catalog current. Lookups cost dictionary reads, not directory scans.
    """

    name = "isulad"
    watchable = True
    #: Show each layer's diff/ and work/ as a link to the backing directory, so the kernel's
    #: overlay mounts (and everything the container does) bypass graftfs: see
    #: Namespace._direct. Off for iSulad until its driver is tested with it.
    direct = False

    def __init__(self, trees: list[str], rw_root: str) -> None:
        self.trees = trees
        self.rw_root = rw_root
        #: index of the node's own pin tree (copies of shared images it must keep: `graftfs pin`),
        #: listed first so that its copies win over a share's, whether the share answers or not
        self.pin_tree: int | None = None
        self.shared = [SharedTree(t) for t in trees]
        self.catalog = Catalog(list(trees))
        self._acked = self.catalog  # the catalog the kernel was last told about
        self._unacked: dict[int, TreeChange] = {}
        self._commit_seq = 0
        self.share_generation = 0  # bumped by every commit that changed the view
        self._commit_lock = threading.Lock()

    # -- keeping the catalog current (blocking I/O: worker threads only) ----------------------

    def refresh(self) -> Catalog:
        """Scan every RO tree in full and rebuild the catalog."""
        for tree in self.shared:
            tree.poll(full=True)
        self.ack(self.commit()[0])
        return self.catalog

    def load(self, timeout: float) -> list[str]:
        """The first scan, each tree in its own thread: a tree that does not answer within
        ``timeout`` (a hung share) starts out empty instead of holding up the mount; its scan,
        once it completes, is committed by the watcher. Returns the roots of such trees."""
        saved = scan_cache.load(os.path.join(self.rw_root, STATE_DIR_NAME), self.trees)
        for tree in self.shared:
            tree.hang_after = timeout  # a poll waiting longer than a request may: the tree hangs
            if tree.root in saved:
                tree.scan = saved[tree.root]  # then only what changed since is checked
        threads = [threading.Thread(target=t.poll, kwargs={"full": t.root not in saved}, daemon=True)
                   for t in self.shared]
        for th in threads:
            th.start()
        deadline = time.monotonic() + timeout
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        for tree, th in zip(self.shared, threads, strict=True):
            if th.is_alive() and tree.root in saved:
                tree.scan = TreeScan(tree.root)  # not confirmed by the share: shown once its poll returns
        self.ack(self.commit(quiet=True)[0])
        return [t.root for t, th in zip(self.shared, threads, strict=True) if th.is_alive()]

    def save_scans(self) -> None:
        """Keep the shares' last scans for the next mount (graftfs.layouts.scan_cache)."""
        scan_cache.save(os.path.join(self.rw_root, STATE_DIR_NAME), [t.scan for t in self.shared if t.available])

    def poll_tree(self, tree: int) -> bool:
        """Look for changes in one tree; True when there are some to commit (see SharedTree.poll)."""
        return self.shared[tree].poll()

    def commit(self, quiet: bool = False) -> tuple[int, list[ViewChange]]:
        """Rebuild the catalog from every tree's current scan and return (sequence number, the
        view names that changed since the last *acknowledged* commit; none when ``quiet``: the
        first commit, before the kernel has seen anything).

        The caller acknowledges (``ack``) once the kernel has been told. A commit whose caller
        gave up waiting (a worker time limit) is not acknowledged, so the next one reports its
        changes again instead of losing them. Commits are serialized.
        """
        with self._commit_lock:
            for ti, tree in enumerate(self.shared):
                change = tree.take_pending()
                if change is not None:
                    self._unacked[ti] = change.merged(self._unacked.get(ti))
            new = build_catalog([t.scan for t in self.shared], self.local_layers(), self.catalog)
            self.catalog = new
            out: list[ViewChange] = []
            if not quiet:
                touched = {(ti, key) for ti, ch in self._unacked.items() for key in ch.touched}
                out = diff_catalogs(self._acked, new, touched)
                for ch in self._unacked.values():
                    out.extend(ViewChange((), name) for name in sorted(ch.top_names | ch.managed))
            self._commit_seq += 1
            if out:
                self.share_generation += 1
            return self._commit_seq, out

    def ack(self, seq: int) -> None:
        """The changes of commit ``seq`` reached the kernel (never blocks: see commit)."""
        if not self._commit_lock.acquire(blocking=False):
            return  # a commit is running: the next acknowledgement covers it
        try:
            if seq == self._commit_seq:
                self._acked = self.catalog
                self._unacked = {}
        finally:
            self._commit_lock.release()

    # -- answering the namespace (any thread) --------------------------------------------------

    def missing(self, tree: int, vpath: tuple[str, ...]) -> Attr | None:
        """Called when a backing entry is missing: the attributes to show instead, if any.

        For an available tree the entry is simply absent (None). For an unavailable one the last
        known top of the tree is shown as it was, and anything deeper fails with EIO: the share
        cannot tell, and ENOENT could make a runtime drop an image that is only out of reach.
        """
        shared = self.shared[tree]
        if shared.available:
            return None
        if len(vpath) <= 1:
            return shared.top_attrs.get(vpath[0] if vpath else "")
        if vpath[0] not in MANAGED_DIRS and vpath[0] not in shared.top_attrs:
            return None  # nothing of that name at the top when last seen: nothing below it either
        if len(vpath) == 2 and vpath[0] in MANAGED_DIRS and self._entry_base(tree, vpath[0], vpath[1]):
            # an entry the catalog still lists: keep showing it (its contents are out of reach)
            managed = shared.top_attrs.get(vpath[0])
            return Attr.synthetic_dir(managed.mtime_ns if managed else 0, 0o755)
        raise OSError(errno.EIO, f"shared tree {shared.root} is unavailable ({shared.unavailable_reason})",
                      "/".join(vpath))

    def unavailable(self, tree: int) -> bool:
        """Is shared tree ``tree`` out of reach (its last known view is shown: see missing)?"""
        return not self.shared[tree].available

    def local_layers(self) -> set[str]:
        """Layer ids the node's RW tree holds (a shared layer's parent may be one of them)."""
        return local_layer_ids(self.rw_root)

    def merged(self, vpath: tuple[str, ...], hides: HideView) -> Synthetic | None:
        return None  # iSulad keeps one record per entry: nothing to compose

    def announce(self, wait: float = 0.0) -> None:
        """After a change of the share's part of the view: nothing to tell iSulad (it rescans)."""

    def direct_path(self, vpath: tuple[str, ...]) -> bool:
        """True for ``overlay/<id>/diff`` and ``overlay/<id>/work`` when direct is on (layers only:
        containers/storage's own overlay checks make other directories there)."""
        return (self.direct and len(vpath) == 3 and vpath[0] == OVERLAY and vpath[2] in DIRECT_NAMES
                and ID_RE.match(vpath[1]) is not None)

    def absorb(self, vpath: tuple[str, ...], written: str, hides: HideView, writer: int = 0) -> None:
        raise OSError(errno.EPERM, "not a merged file", "/".join(vpath))

    def note_read(self, vpath: tuple[str, ...], reader: int) -> None:
        return None

    def _entry_base(self, tree: int, top: str, name: str) -> str | None:
        cat = self.catalog
        if top == IMAGES:
            image = cat.images.get(name)
            return image[1].record_dir if image and image[0] == tree else None
        layer = cat.layers.get(name)
        if layer is None or layer[0] != tree:
            return None
        return layer[1].overlay_dir if top == OVERLAY else layer[1].record_dir

    def ro_path(self, tree: int, vpath: tuple[str, ...]) -> str | None:
        root = self.trees[tree]
        if not vpath:
            return root
        top = vpath[0]
        if top.startswith(SHARE_PRIVATE_PREFIX):
            return None
        if top not in MANAGED_DIRS or len(vpath) == 1:
            return os.path.join(root, *vpath)
        if top == OVERLAY and vpath[1] == SHORT_DIR:
            return None  # overlay/l is synthesized from the link files
        base = self._entry_base(tree, top, vpath[1])
        if base is None:
            return None
        return os.path.join(base, *vpath[2:])

    def ro_names(self, tree: int, vpath: tuple[str, ...]) -> list[str] | None:
        if not vpath:
            return list(self.shared[tree].top_names)
        if len(vpath) == 1 and vpath[0] in MANAGED_DIRS:
            if vpath[0] == IMAGES:
                return self.catalog.image_ids_in(tree)
            return self.catalog.layer_ids_in(tree)
        return None

    def synthetic(self, vpath: tuple[str, ...]) -> Synthetic | None:
        if len(vpath) < 2 or vpath[0] != OVERLAY or vpath[1] != SHORT_DIR:
            return None
        cat = self.catalog
        if not cat.shorts:
            return None
        if len(vpath) == 2:
            return Synthetic(f"ro:{self.trees[0]}", Attr.synthetic_dir(cat.shorts_mtime_ns))
        if len(vpath) == 3 and vpath[2] in cat.shorts:
            tree, entry = cat.shorts[vpath[2]]
            target = f"../{entry.id}/diff"
            attr = Attr.synthetic_symlink(target, entry.mtime_ns)
            return Synthetic(f"ro:{self.trees[tree]}", attr, target)
        return None

    def synthetic_names(self, vpath: tuple[str, ...]) -> list[str]:
        if not self.catalog.shorts:
            return []
        if vpath == (OVERLAY,):
            return [SHORT_DIR]
        if vpath == (OVERLAY, SHORT_DIR):
            return list(self.catalog.shorts)
        return []

    def pinned_images(self) -> set[str]:
        """Images in this node's pin tree (graftfs.share.pins), when it has one."""
        if self.pin_tree is None:
            return set()
        scan = self.shared[self.pin_tree].scan
        return set(scan.images) - scan.retired

    @property
    def acked_catalog(self) -> Catalog:
        """The catalog the kernel was last told about (see commit/ack)."""
        return self._acked

    def unpinned_waiting(self) -> bool:
        """Unpinned images whose copies are still in the pin tree (a container used them)."""
        return self.pin_tree is not None and bool(self.shared[self.pin_tree].scan.retired)

    def status(self) -> dict[str, object]:
        cat = self.catalog
        per_tree = []
        for ti, root in enumerate(self.trees):
            per_tree.append({
                "tree": root,
                "pins": ti == self.pin_tree,
                "remote_ro": cat.remote_ro[ti] if ti < len(cat.remote_ro) else False,
                "layers": len(cat.layer_ids_in(ti)),
                "images": len(cat.image_ids_in(ti)),
                **self.shared[ti].status(),
            })
        problems = [{"tree": p.tree, "kind": p.kind, "id": p.id, "reason": p.reason} for p in cat.problems]
        return {"layout": self.name, "ro": per_tree, "skipped": problems[:500], "skipped_count": len(problems)}
