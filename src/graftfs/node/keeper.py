"""The daemon's lease keeper: this node's leases in every share, renewed and kept current.

What the node uses is read from the runtime's own state in the RW tree (graftfs.share.leases.
in_use) and the merged catalog (which shared layer sits on which). It is recomputed when one of
the runtime's index files changes or the catalog does, checked every second at most (three stats
of local files), and written to each share when it changed and at least once per lease period.
Writes go to worker threads with the mount's time limit: a hung share delays its own lease only,
and one stuck write per share at most (later renewals skip it until it returns).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import trio

from graftfs.catalog.live import LiveCatalog
from graftfs.format.names import CONTAINERS_JSON, IMAGES_JSON, LAYERS_JSON, MARKER_NAME
from graftfs.fuse.errors import BackingTimeout
from graftfs.fuse.workers import Workers
from graftfs.share.leases import TTL_PERIODS, NoMarker, in_use, write_lease
from graftfs.share.pins import collect_pins, wait_until
from graftfs.share.state import ShareError

log = logging.getLogger(__name__)

#: The runtime's files whose change may change what the node uses.
WATCHED = (LAYERS_JSON, IMAGES_JSON, CONTAINERS_JSON)
CHECK_SECONDS = 1.0


class LeaseKeeper:
    """Keeps node ``node``'s lease in each of ``shares`` (see the module docstring); ``live`` is
    the mount's catalog, ``rw_root`` the node's RW tree holding the runtime's files."""

    def __init__(self, live: LiveCatalog, rw_root: str, shares: list[str], node: str, period: float,
                 workers: Workers) -> None:
        self.live = live
        self.rw_root = rw_root
        self.shares = shares
        self.node = node
        self.period = period
        self.ttl = period * TTL_PERIODS
        self.workers = workers
        self.layers: set[str] = set()
        self.images: set[str] = set()
        self.pins: set[str] = set()
        self.held: dict[str, set[str]] = {}  # share -> layers the node holds itself that it holds too
        self.renewed: dict[str, float] = {}  # share -> time of the last successful write
        self.failing: dict[str, str] = {}  # share -> why the last write failed
        self.empty: set[str] = set()  # shares nothing was published to yet (no marker)
        # per share since the mount (metrics: graftfs_lease_*_total)
        self.renewals: dict[str, int] = dict.fromkeys(shares, 0)
        self.failures: dict[str, int] = dict.fromkeys(shares, 0)
        self._writing = {s: threading.Lock() for s in shares}

    def _key(self) -> tuple[object, ...]:
        sigs: list[object] = [id(self.live.catalog)]
        for rel in WATCHED:
            try:
                st = os.stat(os.path.join(self.rw_root, *rel))
                sigs.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                sigs.append(None)
        return tuple(sigs)

    def _compute(self) -> tuple[set[str], set[str], set[str], dict[str, set[str]]]:
        cat = self.live.catalog
        parents = {lid: entry.parent for lid, (_, entry) in cat.layers.items()}
        tops = {iid: entry.top_layer for iid, (_, entry) in cat.images.items()}
        pins = self.live.pinned_images()
        layers, images = in_use(self.rw_root, parents, tops, pins)
        own = self.live.local_layers()
        held = {t.root: set(own & t.scan.layers.keys()) for t in self.live.shared if t.root in self._writing}
        return layers, images, pins, held

    def _write(self, share: str) -> bool:
        """One renewal in one share; False when an earlier write there is still stuck."""
        lock = self._writing[share]
        if not lock.acquire(blocking=False):
            return False
        try:
            write_lease(share, self.node, self.ttl, self.layers, self.images, self.pins, self.held.get(share, ()))
            return True
        finally:
            lock.release()

    async def run(self) -> None:
        last_key: tuple[object, ...] | None = None
        while True:
            key = self._key()
            due = [s for s in self.shares if time.monotonic() - self.renewed.get(s, -1e9) >= self.period]
            if key != last_key:
                last_key = key  # a damaged file is read again once it changes, not every second
                try:
                    now = await self.workers.run(self._compute)
                except (ValueError, OSError) as e:  # a runtime file damaged or unreadable: keep the last lease
                    log.warning("leases: %s; keeping the last lease", e)
                else:
                    if now != (self.layers, self.images, self.pins, self.held):
                        self.layers, self.images, self.pins, self.held = now
                        due = list(self.shares)
                    if self.live.unpinned_waiting():
                        await self._collect_pins()
            for share in due:
                await self._renew(share)
            await trio.sleep(min(CHECK_SECONDS, self.period))

    async def _collect_pins(self) -> None:
        """Unpinned copies a container still ran on when they were unpinned go once it is gone
        (the runtime's state changed: maybe now)."""
        try:
            await self.workers.run_thread(collect_pins, self.rw_root, lambda line: log.info("pins: %s", line),
                                          lambda lids: wait_until(self._shows_pinned, lids))
        except (OSError, ShareError, BackingTimeout) as e:
            log.warning("collecting unpinned copies: %s", e)

    def _shows_pinned(self, lid: str) -> bool:
        """Does the view, as the kernel was last told, show this layer from the pin tree?"""
        entry = self.live.acked.layers.get(lid)
        return entry is not None and entry[0] == self.live.pin_tree

    async def _renew(self, share: str) -> None:
        try:
            written = await self.workers.run_thread(self._write, share)
        except NoMarker:
            if not (self.layers or self.images or self.pins):
                # a share nothing was published to yet, and the node uses nothing of it: the
                # normal start of a cluster, not a failure (the lease follows the first publish)
                self._set_empty(share)
                return
            self._set_failing(share, f"no {MARKER_NAME} marker (share not mounted?)")
            return
        except (OSError, BackingTimeout) as e:
            self._set_failing(share, str(e.strerror or e))
            return
        if written:
            self.renewed[share] = time.monotonic()
            self.renewals[share] += 1
            self.empty.discard(share)
            if self.failing.pop(share, None) is not None:
                log.info("lease in %s renewed again", share)

    def _set_empty(self, share: str) -> None:
        if share not in self.empty:
            log.info("%s is an empty share (no %s marker yet): this node's lease is written once something is "
                     "published there", share, MARKER_NAME)
        self.empty.add(share)
        self.failing.pop(share, None)

    def _set_failing(self, share: str, reason: str) -> None:
        self.failures[share] += 1
        if self.failing.get(share) != reason:
            log.error("cannot renew this node's lease in %s: %s (gc there will not see what this node uses "
                      "once it lapses, in %g s)", share, reason, self.ttl)
        self.failing[share] = reason
        self.empty.discard(share)

    def status(self) -> dict[str, object]:
        """What ``graftfs status`` shows. Also called from the metrics server's thread while the
        trio thread changes the keeper: the dicts and the set are copied in one C call each
        (atomic under the GIL), and only ``shares`` (never changed) is looped over in Python."""
        now = time.monotonic()
        renewed, failing, empty = self.renewed.copy(), self.failing.copy(), self.empty.copy()
        renewals, failures = self.renewals.copy(), self.failures.copy()
        return {"node": self.node, "period": self.period, "ttl": self.ttl, "layers": len(self.layers),
                "images": len(self.images), "pins": len(self.pins),
                "shares": {s: {"renewed_ago": round(now - renewed[s], 1) if s in renewed else None,
                               "failing": failing.get(s), "empty": s in empty,
                               "renewals": renewals.get(s, 0), "failures": failures.get(s, 0)}
                           for s in self.shares}}
