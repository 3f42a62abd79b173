"""One shared tree kept current: cheap polls, and the availability of a tree that may fail or hang.

``SharedTree`` keeps the last scan of one tree (graftfs.catalog.scan) and brings it up to date
cheaply: each poll opens and stats the few directories whose mtime changes when entries appear
or vanish (and the share's marker file), re-lists only those that changed, re-checks only new or
changed entries, and sweeps the records of known entries a slice at a time so that in-place
rewrites are noticed too. A tree whose marker vanished, or whose managed directories all vanished
at once, or whose poll waits longer than a request may, is *unavailable*: its last good scan is
kept, never read as mass deletion.

Everything here is plain blocking I/O on a tree that may be remote: callers run it in worker
threads with time limits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from graftfs.catalog.scan import (
    PROBE_DIRS,
    EntryKey,
    Sig,
    TreeScan,
    entry_sig,
    fresh_stat,
    list_share_root,
    lstat_entry,
    probe_paths,
    rescan,
    sig_of,
)
from graftfs.format.attrs import Attr
from graftfs.format.names import IMAGES, LAYERS, MANAGED_DIRS, MARKER_NAME, OVERLAY, REMOTE_RO_DIR, RETIRED_DIR

log = logging.getLogger(__name__)

#: Known entries whose record files are re-checked per poll (all of them on small shares).
SWEEP_BUDGET = 128


def rotate(keys: list[EntryKey], pos: int, budget: int) -> tuple[list[EntryKey], int]:
    """The next ``budget`` keys from ``pos``, wrapping around; all of them when they fit."""
    if len(keys) <= budget:
        return keys, 0
    start = pos % len(keys)
    return [keys[(start + i) % len(keys)] for i in range(budget)], start + budget


@dataclass
class TreeChange:
    """What one poll found changed in one tree (the catalog diff finds the rest)."""

    touched: set[EntryKey] = field(default_factory=set)  # entries whose files changed in place
    top_names: set[str] = field(default_factory=set)  # names at the tree root that changed
    managed: set[str] = field(default_factory=set)  # managed dirs whose listing was re-read

    def merged(self, other: TreeChange | None) -> TreeChange:
        if other is None:
            return self
        return TreeChange(self.touched | other.touched, self.top_names | other.top_names, self.managed | other.managed)


class SharedTree:
    """One RO tree's last good scan, kept up to date by ``poll`` (see the module docstring).

    Only one poll runs at a time (a poll abandoned on a hung share keeps the lock; later polls
    skip until it returns). Readers use ``scan`` and the ``top_*`` fields, which are replaced,
    never changed in place.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.scan = TreeScan(root)
        self.top_names: list[str] = []
        self.top_attrs: dict[str, Attr] = {}  # "" is the root itself
        self.marked = False  # the marker file was seen: from now on its absence means "unavailable"
        self.had_managed = False  # a managed dir was seen: all of them vanishing means "unavailable"
        self.unavailable_since: float | None = None
        self.unavailable_reason = ""
        self.polls = 0
        self.last_success: float | None = None  # time.monotonic() of the last poll the tree answered
        #: a poll still running after this many seconds means the tree hangs (an NFS hard mount,
        #: a stopped server): it is then unavailable like a failing one (None: never)
        self.hang_after: float | None = None
        self._poll_started: float | None = None
        self.lock = threading.Lock()
        # what changed since the layout last took it: kept here, not only returned, so that the
        # findings of a poll whose caller gave up waiting (a slow share) are not lost
        self._pending: TreeChange | None = None
        self._pending_lock = threading.Lock()
        self._probe: dict[str, Sig | None] = {}
        self._hot: set[str] = set()
        self._sweep_pos = 0
        self._sweep_broken_pos = 0

    @property
    def available(self) -> bool:
        return self.unavailable_since is None and self.hung_for() is None

    def hung_for(self) -> float | None:
        """Seconds the running poll has waited on the tree, when that is longer than hang_after."""
        started = self._poll_started
        if started is None or self.hang_after is None:
            return None
        waited = time.monotonic() - started
        return waited if waited > self.hang_after else None

    def poll(self, full: bool = False) -> bool:
        """Bring the scan up to date; True when there are changes to take (``take_pending``).
        Nothing is found while the tree is unavailable or another poll still runs."""
        if not self.lock.acquire(blocking=False):
            return self.has_pending
        try:
            self.polls += 1
            self._poll_started = time.monotonic()
            change = self._poll(full)
        except OSError as e:
            self._set_unavailable(f"{e.strerror or e} ({e.filename or self.root})")
            change = None
        finally:
            self._poll_started = None
            self.lock.release()
        if change is not None:
            with self._pending_lock:
                self._pending = change.merged(self._pending)
        return self.has_pending

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    def take_pending(self) -> TreeChange | None:
        """The changes found since the last call (the layout commits them)."""
        with self._pending_lock:
            change, self._pending = self._pending, None
        return change

    def _poll(self, full: bool) -> TreeChange | None:
        probe = {d: sig_of(fresh_stat(path)) for d, path in zip(PROBE_DIRS, probe_paths(self.root), strict=True)}
        if probe[""] is None:
            self._set_unavailable("the directory is missing")
            return None
        marker = fresh_stat(os.path.join(self.root, MARKER_NAME))
        if marker is not None:
            self.marked = True
        has_managed = any(probe[d] is not None for d in MANAGED_DIRS)
        if self.marked and marker is None:
            self._set_unavailable(f"its marker file {MARKER_NAME} is missing")
            return None
        if not self.marked and self.had_managed and not has_managed:
            self._set_unavailable("overlay/, overlay-layers/ and overlay-images/ all vanished")
            return None
        full = full or not self.available
        changed = {d for d, sig in probe.items() if full or sig != self._probe.get(d)}
        # a directory that changed is listed once more at the next poll: a second change within
        # the same timestamp tick as the first (after our listing) would not move its mtime again
        dirty = changed | self._hot
        touched = self._sweep() | self.scan.provisional  # (entries shown as they last checked good)
        change = None
        if dirty or touched:
            change = self._rescan(dirty, touched, full)
        self._probe = probe
        self._hot = changed
        self.had_managed = self.had_managed or has_managed
        self._set_available()
        return change

    def _rescan(self, dirty: set[str], touched: set[EntryKey], full: bool) -> TreeChange:
        list_layers = bool(dirty & {OVERLAY, f"{OVERLAY}/{REMOTE_RO_DIR}", LAYERS, f"{LAYERS}/{REMOTE_RO_DIR}"})
        list_images = bool(dirty & {IMAGES, f"{IMAGES}/{REMOTE_RO_DIR}"})
        old = None if full else self.scan
        new = rescan(self.root, old, touched, list_layers, list_images, RETIRED_DIR in dirty)
        change = TreeChange(touched=touched)
        change.managed = {d.split("/")[0] for d in dirty if d and d != RETIRED_DIR}
        if "" in dirty:
            change.top_names = self._read_top()
        self.scan = new
        return change

    def _read_top(self) -> set[str]:
        """Re-read the names at the tree root; return those that appeared, vanished or changed."""
        names = list_share_root(self.root)
        attrs = {"": Attr.from_stat(os.lstat(self.root))}
        for name in names:
            st = lstat_entry(os.path.join(self.root, name))
            if st is not None:
                attrs[name] = Attr.from_stat(st)
        old = self.top_attrs
        changed = {n for n in set(attrs) | set(old) if n and attrs.get(n) != old.get(n)}
        self.top_names, self.top_attrs = names, attrs
        return changed

    def _sweep(self) -> set[EntryKey]:
        """Re-stat the record files of a slice of the broken entries and of the known ones.

        Each kind gets its own rotating slice (half the budget each, or all of it when the
        other has none), so neither starves the other: a share full of half-written entries
        still notices a record rewritten in place, and every entry is re-checked in turn.
        """
        scan = self.scan
        broken = list(scan.broken)
        known = [k for k in scan.sigs if k not in scan.broken]
        half = SWEEP_BUDGET // 2
        broken_budget = SWEEP_BUDGET - min(half, len(known)) if broken else 0
        known_budget = SWEEP_BUDGET - min(broken_budget, len(broken))
        part_b, self._sweep_broken_pos = rotate(broken, self._sweep_broken_pos, broken_budget)
        part_k, self._sweep_pos = rotate(known, self._sweep_pos, known_budget)
        touched = set()
        for key in part_b + part_k:
            if key in scan.sigs and entry_sig(scan.entry_paths(key)) != scan.sigs[key]:
                touched.add(key)
        return touched

    def _set_unavailable(self, reason: str) -> None:
        if self.unavailable_since is None:
            self.unavailable_since = time.time()
            log.error("shared tree %s is unavailable: %s; keeping its last known view until it returns",
                      self.root, reason)
        self.unavailable_reason = reason

    def _set_available(self) -> None:
        self.last_success = time.monotonic()
        if self.unavailable_since is not None:
            log.warning("shared tree %s is available again after %.1f s", self.root,
                        time.time() - self.unavailable_since)
        self.unavailable_since = None
        self.unavailable_reason = ""

    def unavailability(self) -> tuple[float | None, str]:
        """(since when, why) the tree is unavailable, or (None, "") while it answers."""
        if self.unavailable_since is not None:
            return self.unavailable_since, self.unavailable_reason
        hung = self.hung_for()
        if hung is not None:
            return time.time() - hung, f"does not answer (a poll has waited {hung:.0f} s)"
        return None, ""
