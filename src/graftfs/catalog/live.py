"""The catalog a mount keeps current: its trees polled, each change committed, then acknowledged.

``LiveCatalog`` owns one ``SharedTree`` per shared tree and the current ``Catalog`` built from
their scans. The watcher (graftfs.fuse.watcher) polls trees (``poll_tree``), commits their changes
(``commit``: a new catalog and what differs since the kernel was last told), and acknowledges a
commit once the kernel has been told (``ack``). The presenters (graftfs.view) read ``catalog``;
the lease keeper reads ``acked``. Polls and commits are blocking I/O: worker threads only.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from graftfs.catalog import scan_cache
from graftfs.catalog.catalog import Catalog, CatalogDiff, build_catalog, diff_catalogs
from graftfs.catalog.scan import TreeScan
from graftfs.catalog.tree import SharedTree, TreeChange


class LocalLayers:
    """The layer ids the node's RW tree holds itself, read again only when ``probe`` changes.

    ``probe`` is the file or directory whose inode, size and mtime move when the node's layers
    do (containers/storage's layers.json, iSulad's overlay-layers/); ``read`` lists the ids. Asked
    at every catalog build and whenever the view decides how to show a layer directory, so it
    must cost one stat, not a parse.
    """

    def __init__(self, probe: str, read: Callable[[], set[str]]) -> None:
        self.probe = probe
        self.read = read
        self._cached: tuple[tuple[int, int, int] | None, frozenset[str]] | None = None

    def __call__(self) -> frozenset[str]:
        try:
            st = os.stat(self.probe)
            sig: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            sig = None
        cached = self._cached
        if cached is not None and cached[0] == sig:
            return cached[1]
        ids = frozenset(self.read())
        self._cached = (sig, ids)
        return ids


@dataclass(frozen=True)
class TreeStatus:
    """One shared tree as ``graftfs status`` reports it."""

    tree: str
    pins: bool  # the node's own pin tree (graftfs.share.pins)
    remote_ro: bool  # entries found in iSulad's RO/ subdirectories
    layers: int  # complete layers this tree contributes
    images: int
    available: bool
    marker: bool
    polls: int
    unavailable_since: float | None = None
    unavailable_reason: str = ""


class LiveCatalog:
    """The shared trees of one mount and their current catalog (see the module docstring).

    ``local_layers`` answers which layer ids the node's RW tree holds (a shared layer may sit on
    one of them); ``state_dir`` keeps the trees' scans between mounts; ``pin_tree`` is the index
    of the node's own pin tree, when it has one (listed first, so its copies win).
    """

    def __init__(self, trees: list[str], state_dir: str, local_layers: Callable[[], frozenset[str]],
                 pin_tree: int | None = None) -> None:
        self.trees = trees
        self.state_dir = state_dir
        self.local_layers = local_layers
        self.pin_tree = pin_tree
        self.shared = [SharedTree(t) for t in trees]
        self.catalog = Catalog(list(trees))
        self._acked = self.catalog  # the catalog the kernel was last told about
        self._unacked: dict[int, TreeChange] = {}
        self._seq = 0
        #: commit sequence at which each shared id entered the catalog (see ``appeared_at``)
        self._appeared: dict[str, int] = {}
        self.generation = 0  # bumped by every commit that changed the view
        self._lock = threading.Lock()

    # -- keeping the catalog current (blocking I/O: worker threads only) ----------------------

    def refresh(self) -> Catalog:
        """Scan every tree in full and rebuild the catalog."""
        for tree in self.shared:
            tree.poll(full=True)
        self.ack(self.commit()[0])
        return self.catalog

    def load(self, timeout: float) -> list[str]:
        """The first scan, each tree in its own thread: a tree that does not answer within
        ``timeout`` (a hung share) starts out empty instead of holding up the mount; its scan,
        once it completes, is committed by the watcher. Returns the roots of such trees."""
        saved = scan_cache.load(self.state_dir, self.trees)
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

    def save(self) -> None:
        """Keep the trees' last scans for the next mount (graftfs.catalog.scan_cache)."""
        scan_cache.save(self.state_dir, [t.scan for t in self.shared if t.available])

    def poll_tree(self, tree: int) -> bool:
        """Look for changes in one tree; True when there are some to commit (see SharedTree.poll)."""
        return self.shared[tree].poll()

    def commit(self, quiet: bool = False) -> tuple[int, CatalogDiff]:
        """Rebuild the catalog from every tree's current scan and return (sequence number, what
        differs since the last *acknowledged* commit; nothing when ``quiet``: the first commit,
        before the kernel has seen anything).

        The caller acknowledges (``ack``) once the kernel has been told. A commit whose caller
        gave up waiting (a worker time limit) is not acknowledged, so the next one reports its
        changes again instead of losing them. Commits are serialized.
        """
        with self._lock:
            for ti, tree in enumerate(self.shared):
                change = tree.take_pending()
                if change is not None:
                    self._unacked[ti] = change.merged(self._unacked.get(ti))
            new = build_catalog([t.scan for t in self.shared], set(self.local_layers()), self.catalog)
            self.catalog = new
            self._seq += 1
            for eid in [*new.layers, *new.images]:
                self._appeared.setdefault(eid, self._seq)
            diff = CatalogDiff() if quiet else self._diff_since_ack(new)
            if diff:
                self.generation += 1
            return self._seq, diff

    def _diff_since_ack(self, new: Catalog) -> CatalogDiff:
        touched = {key for ch in self._unacked.values() for key in ch.touched}
        diff = diff_catalogs(self._acked, new, touched)
        for ch in self._unacked.values():
            diff.top_names |= ch.top_names
            diff.managed |= ch.managed
        return diff

    def ack(self, seq: int) -> None:
        """The changes of commit ``seq`` reached the kernel (never blocks: see commit)."""
        if not self._lock.acquire(blocking=False):
            return  # a commit is running: the next acknowledgement covers it
        try:
            if seq == self._seq:
                self._acked = self.catalog
                self._unacked = {}
        finally:
            self._lock.release()

    # -- reading it (any thread) ---------------------------------------------------------------

    @property
    def acked(self) -> Catalog:
        """The catalog the kernel was last told about (see commit/ack)."""
        return self._acked

    @property
    def seq(self) -> int:
        """The sequence number of the latest commit."""
        return self._seq

    def appeared_at(self, eid: str) -> int:
        """The commit at which shared entry ``eid`` entered the catalog (0: from the start).

        A runtime rewriting an index file may only drop shared ids it could have read: one that
        appeared after its read is new, not deleted (graftfs.view.containers_storage)."""
        return self._appeared.get(eid, 0)

    def available(self, tree: int) -> bool:
        """Does shared tree ``tree`` answer (else its last known view is shown)?"""
        return self.shared[tree].available

    def pinned_images(self) -> set[str]:
        """Images in this node's pin tree (graftfs.share.pins), when it has one."""
        if self.pin_tree is None:
            return set()
        scan = self.shared[self.pin_tree].scan
        return set(scan.images) - scan.retired

    def unpinned_waiting(self) -> bool:
        """Unpinned images whose copies are still in the pin tree (a container used them)."""
        return self.pin_tree is not None and bool(self.shared[self.pin_tree].scan.retired)

    def pin_scan(self) -> TreeScan | None:
        """The pin tree's last scan, when this mount has one."""
        return self.shared[self.pin_tree].scan if self.pin_tree is not None else None

    def tree_status(self) -> list[TreeStatus]:
        """Each shared tree for ``graftfs status``."""
        cat = self.catalog
        out = []
        for ti, tree in enumerate(self.shared):
            since, reason = tree.unavailability()
            out.append(TreeStatus(
                tree=tree.root, pins=ti == self.pin_tree,
                remote_ro=cat.remote_ro[ti] if ti < len(cat.remote_ro) else False,
                layers=len(cat.layer_ids_in(ti)), images=len(cat.image_ids_in(ti)),
                available=tree.available, marker=tree.marked, polls=tree.polls,
                unavailable_since=since, unavailable_reason=reason))
        return out
