"""The watcher: notices changes behind the mount and keeps the kernel's caches exact.

Two sources of change, one pipeline:

* Shared (RO) trees. Network filesystems report no other client's changes through inotify, so
  each tree is polled (``-o poll=SECONDS``, default 0.5 s) by its own task: a poll costs a few
  opens and stats (graftfs.catalog.tree). Trees on local filesystems are also watched with
  inotify, which only wakes their poller early, so a local change shows at once. A tree that
  hangs holds up only its own task.
* The node's RW tree. Every directory with an RW part that the kernel knows of is watched with
  inotify (added as the kernel learns of it: the FUSE adapter calls ``watch_rw_dir``): the kernel
  can only hold stale entries for names in directories it has seen.

A change found in a shared tree makes the live catalog rebuild itself (``commit``) and the layout
list the view names that differ; the kernel is then told about exactly those names (graftfs.fuse.kernel_cache).
The view generation is bumped around every change, so that a lookup answered from the old state
while the change was applied is cached only briefly.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from graftfs.catalog.live import LiveCatalog
from graftfs.catalog.scan import probe_paths
from graftfs.fuse.errors import BackingTimeout
from graftfs.fuse.inodes import InodeTable, Node
from graftfs.fuse.inotify import IN_IGNORED, IN_ISDIR, Event, Inotify, is_local_fs
from graftfs.fuse.kernel_cache import KernelCache, ViewGeneration, may_hold_entries, told_directory
from graftfs.fuse.workers import Workers, guarded
from graftfs.view.layout import Layout, ViewChange
from graftfs.view.lock_tokens import LOCK_WAIT_SECONDS

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL = 0.5
#: Events arriving together are handled as one batch after this pause.
COALESCE_SECONDS = 0.005
#: A local share's poller, woken by inotify, waits this long for the rest of a publish.
KICK_DEBOUNCE = 0.01
#: A watcher task that failed unexpectedly starts again after this pause.
RESTART_DELAY = 1.0
#: Attempts at telling the kernel about one batch of changes before giving up on it.
APPLY_ATTEMPTS = 3
#: Latencies kept for the status' percentiles and the metrics' histogram.
RECENT_LATENCIES = 200


@dataclass
class ChangeRecord:
    """The last change applied, for `graftfs status`."""

    at: float
    source: str  # "share" or "rw"
    names: int  # view names re-checked
    notified: int  # kernel notifications sent
    latency_ms: float  # from the poll or event that found it to the kernel being told

    def as_dict(self) -> dict[str, object]:
        return {"at": self.at, "source": self.source, "names": self.names, "notified": self.notified,
                "latency_ms": round(self.latency_ms, 1)}


class Watcher:
    """Keeps ``live`` current and the kernel told, for a mount whose layout presents it.

    ``rw_root`` is the node's RW tree (its directories are watched as the kernel learns of
    them); ``generation`` is shared with the FUSE adapter, which caches briefly what it answered
    across a bump. The adapter calls ``watch_rw_dir``, ``forget_rw_dir`` and ``stale_entry``
    (graftfs.fuse.operations.ViewListener).
    """

    def __init__(self, live: LiveCatalog, layout: Layout, rw_root: str, inodes: InodeTable, kernel: KernelCache,
                 generation: ViewGeneration, workers: Workers, interval: float = DEFAULT_POLL_INTERVAL,
                 share_inotify: bool = True) -> None:
        self.live = live
        self.layout = layout
        self.rw_root = rw_root
        self.trees = live.trees
        self.inodes = inodes
        self.kernel = kernel
        self.generation = generation
        self.workers = workers
        self.interval = interval
        self.share_inotify = share_inotify
        self.inotify: Inotify | None = None
        #: (changes applied, latencies in ms of the last RECENT_LATENCIES of them): one tuple, replaced
        #: whole, so that a reader in another thread (metrics) gets a count and values that agree
        self.applied: tuple[int, tuple[float, ...]] = (0, ())
        self.failures = 0
        self.last_change: ChangeRecord | None = None
        self._pending_since: float | None = None  # monotonic time of the first poll that found a change
        self._commit_wanted = trio.Event()
        self._stale: list[ViewChange] = []
        self._stale_wanted = trio.Event()
        self._announce_after_stale = False  # a view change in _stale is announced once applied
        self._announce_wanted = trio.Event()
        self._kicks = [trio.Event() for _ in live.trees]
        self._rw_dirs: dict[int, Node] = {}  # inotify wd -> directory node
        self._ro_dirs: dict[int, int] = {}  # inotify wd -> index of the shared tree
        self._local_trees: set[int] = set()
        self._watch_limit_logged = False
        self._bound: set[int] = set()  # nodes the daemon bind-mounted RW entries over (behind_binds)

    # -- setup ------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the inotify instance (before serving, so RW directories can be added early)."""
        try:
            self.inotify = Inotify()
        except OSError as e:
            log.warning("inotify unavailable (%s): changes made in the RW tree behind the mount are not seen", e)

    def watch_rw_dir(self, node: Node, path: str) -> None:
        """Watch a directory's RW part (called from the FUSE handlers, on the trio thread)."""
        if self.inotify is None:
            return
        try:
            wd = self.inotify.add(path)
        except OSError as e:
            if e.errno == errno.ENOSPC and not self._watch_limit_logged:
                self._watch_limit_logged = True
                log.error("out of inotify watches (fs.inotify.max_user_watches): changes made behind the "
                          "mount in newly seen RW directories show only when the kernel's cache expires")
            else:
                log.debug("cannot watch %s: %s", path, e)
            return
        node.wd = wd
        self._rw_dirs[wd] = node

    def behind_binds(self, vpaths: list[tuple[str, ...]]) -> None:
        """The daemon bind-mounted these RW files and directories over their names in the view
        (graftfs.node.binds; trio thread). Path walks cross into the binds inside the kernel, so
        the runtime's constant changes there (its database, its lock files) need not be told:
        the kernel caches nothing of the view below a bound directory until something looks a
        name up through the view there (a bind removed, another mount namespace), and a lock
        file is read uncached and keeps its size (graftfs.view.lock_tokens)."""
        for vpath in vpaths:
            node = self.inodes.find(vpath)
            if node is not None:
                self._bound.add(node.ino)

    def _nothing_to_tell(self, node: Node, name: str) -> bool:
        """Is there nothing the kernel could hold stale after this RW event? So for a request's
        own change (InodeTable.changed_through_mount) and for changes behind binds (behind_binds)."""
        if self.inodes.changed_through_mount(node, name):
            return True
        if node.ino in self._bound and not node.children:
            return True
        child = node.children.get(name)
        return child is not None and child.ino in self._bound

    def forget_rw_dir(self, node: Node) -> None:
        """The kernel forgot a directory: nothing of it is cached any more, so stop watching it."""
        if self.inotify is not None and node.wd:
            self._rw_dirs.pop(node.wd, None)
            self.inotify.remove(node.wd)
        node.wd = 0

    async def run(self) -> None:
        """Run until cancelled. A failing loop is logged and restarted, never allowed to end the
        nursery it shares with the FUSE loop (that would unmount)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._guard("commit", self._commit_loop))
            nursery.start_soon(self._guard("stale entries", self._stale_loop))
            nursery.start_soon(self._guard("lock tokens", self._announce_loop))
            if self.inotify is not None:
                nursery.start_soon(self._guard("inotify", self._inotify_loop))
            for tree, root in enumerate(self.trees):
                nursery.start_soon(self._guard(f"poll {root}", self._tree_loop, tree))

    def _guard(self, what: str, loop: Callable[..., Awaitable[None]], *args: object) -> Callable[[], Awaitable[None]]:
        """A watcher loop as a guarded task (graftfs.fuse.workers.guarded): failures are counted."""
        return functools.partial(guarded, f"watcher {what}", functools.partial(loop, *args), RESTART_DELAY,
                                 self._count_failure)

    def _count_failure(self) -> None:
        self.failures += 1

    def stale_entry(self, parent: tuple[str, ...], name: str) -> None:
        """A request changed what a name is behind the kernel's back (see fs._recheck_links):
        re-check it once the request is over (trio thread)."""
        self._stale.append(ViewChange(parent, name))
        self._stale_wanted.set()

    def view_changed(self, changes: list[ViewChange]) -> None:
        """A request changed the view itself (``graftfs unhide``): re-check these names once it
        is over, then tell the runtime's long-running clients, as for a change of a shared tree
        (trio thread)."""
        self._stale.extend(changes)
        self._announce_after_stale = True
        self._stale_wanted.set()

    async def _stale_loop(self) -> None:
        while True:
            await self._stale_wanted.wait()
            self._stale_wanted = trio.Event()
            await trio.sleep(0)  # let the request that asked reply first (its names are busy)
            changes, self._stale = self._stale, []
            announce, self._announce_after_stale = self._announce_after_stale, False
            self.bump()
            await self._apply("rw", changes, time.monotonic())
            if announce:
                self._announce_wanted.set()  # after the kernel was told: clients re-read fresh entries

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None

    def bump(self) -> None:
        self.generation.bump()

    # -- shared trees ------------------------------------------------------------------------

    async def _tree_loop(self, tree: int) -> None:
        root = self.trees[tree]
        try:
            if self.share_inotify and await self.workers.run_thread(is_local_fs, root):
                self._local_trees.add(tree)
                await self._watch_tree(tree)
        except OSError as e:
            log.warning("cannot tell whether %s is local: polling only (%s)", root, e)
        while True:
            with trio.move_on_after(self.interval) as waited:
                await self._kicks[tree].wait()
            if not waited.cancelled_caught:
                await trio.sleep(KICK_DEBOUNCE)  # a publisher renames several entries in a row: take them together
            self._kicks[tree] = trio.Event()
            started = time.monotonic()
            try:
                found = await self.workers.run_thread(self.live.poll_tree, tree)
            except BackingTimeout as e:
                log.warning("polling %s: %s", root, e.strerror)
                continue
            if not found:
                continue
            if tree in self._local_trees:
                await self._watch_tree(tree)  # managed directories may have appeared
            self._want_commit(started)

    async def _watch_tree(self, tree: int) -> None:
        """Watch a local shared tree's probe directories with inotify (they only wake the poller)."""
        if self.inotify is None:
            return
        for path in probe_paths(self.trees[tree]):
            try:
                wd = await self.workers.run_thread(self.inotify.add, path)
            except OSError:
                continue  # not there (yet): the poll finds it and this runs again
            self._ro_dirs[wd] = tree

    def _want_commit(self, since: float) -> None:
        self._pending_since = since if self._pending_since is None else min(self._pending_since, since)
        self._commit_wanted.set()

    async def _commit_loop(self) -> None:
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted = trio.Event()
            since, self._pending_since = self._pending_since or time.monotonic(), None
            self.bump()  # lookups racing with the catalog swap get short cache times
            try:
                seq, changes = await self.workers.run_thread(self._commit)
            except Exception as e:
                # nothing is lost: an unacknowledged commit's changes are reported again
                log.error("rebuilding the catalog failed (%s); retrying in %g s", e, RESTART_DELAY)
                await trio.sleep(RESTART_DELAY)
                self._want_commit(since)
                continue
            self.bump()
            if await self._apply("share", changes, since):
                self.live.ack(seq)
                if changes:
                    self._announce_wanted.set()

    def _commit(self) -> tuple[int, list[ViewChange]]:
        """A new catalog, and the view names that changed since the kernel was last told."""
        seq, diff = self.live.commit()
        return seq, self.layout.view_changes(diff)

    async def _announce_loop(self) -> None:
        """Let the runtime's long-running clients know (lock tokens: graftfs.view.lock_tokens), in a
        task of its own: a client may hold a lock file for seconds (a pull), and commits must
        not wait for that. Changes arriving meanwhile are announced once, afterwards."""
        while True:
            await self._announce_wanted.wait()
            self._announce_wanted = trio.Event()
            try:
                with trio.move_on_after(LOCK_WAIT_SECONDS * 2):
                    await trio.to_thread.run_sync(self.layout.announce, abandon_on_cancel=True)
            except Exception as e:
                log.error("writing new lock tokens failed: %s", e)

    async def _apply(self, source: str, changes: list[ViewChange], since: float) -> bool:
        """Tell the kernel; False when that failed even after retries."""
        if not changes:
            return True
        for attempt in range(APPLY_ATTEMPTS):
            try:
                notified = await self.kernel.apply(changes)
                break
            except Exception as e:
                log.error("telling the kernel about %d changed names failed (%s)%s", len(changes), e,
                          "; retrying" if attempt + 1 < APPLY_ATTEMPTS else "; giving up")
                await trio.sleep(RESTART_DELAY)
        else:
            self.failures += 1
            return False
        latency = (time.monotonic() - since) * 1000
        count, recent = self.applied
        self.applied = (count + 1, (*recent, latency)[-RECENT_LATENCIES:])
        self.last_change = ChangeRecord(time.time(), source, len(changes), notified, latency)
        log.debug("applied %d %s change(s), %d notification(s), %.1f ms", len(changes), source, notified, latency)
        return True

    # -- inotify: the RW tree and local shared trees --------------------------------------------

    async def _inotify_loop(self) -> None:
        assert self.inotify is not None
        while True:
            events = await self.inotify.read()
            started = time.monotonic()
            await trio.sleep(COALESCE_SECONDS)
            changes = self._rw_changes(events)
            if changes:
                self.bump()
                await self._apply("rw", changes, started)

    def _rw_changes(self, events: list[Event]) -> list[ViewChange]:
        changes: dict[ViewChange, None] = {}
        for ev in events:
            if ev.overflow:
                log.warning("inotify queue overflowed: re-checking every watched directory")
                changes.update(dict.fromkeys(self._everything()))
                for kick in self._kicks:
                    kick.set()
                continue
            tree = self._ro_dirs.get(ev.wd)
            if tree is not None:
                self._kicks[tree].set()
                if ev.mask & IN_IGNORED:
                    del self._ro_dirs[ev.wd]
                continue
            node = self._rw_dirs.get(ev.wd)
            if node is None:
                continue
            if ev.mask & IN_IGNORED:  # the directory is gone (or was replaced): watch it again when seen
                del self._rw_dirs[ev.wd]
                node.wd = 0
                continue
            if not ev.name or node.detached or self._nothing_to_tell(node, ev.name):
                continue
            if not may_hold_entries(node):
                # the kernel knows this directory as a link now (a layer's diff, see
                # Namespace._direct): it caches nothing below it, and a notification about a name
                # in it would be refused (ENOTDIR, which libfuse prints)
                self.forget_rw_dir(node)
                continue
            try:
                parent = self.inodes.path(node.ino)
            except (KeyError, OSError):
                continue
            changes[ViewChange(parent, ev.name)] = None
            if ev.mask & IN_ISDIR:
                child = node.children.get(ev.name)
                if child is not None and child.wd == 0 and _known_dir(child):
                    changes.update(dict.fromkeys(self._watch_new_rw_dir(child, (*parent, ev.name))))
        return list(changes)

    def _watch_new_rw_dir(self, node: Node, vpath: tuple[str, ...]) -> list[ViewChange]:
        """A known directory got an RW part behind the mount: watch it, and re-check the names
        already in it (created before the watch existed), down through the directories below it
        that the kernel knows (``mkdir -p a/b/c`` behind the mount). Dropping the directory's
        entry instead would be simpler, but would detach any mount below it."""
        out: list[ViewChange] = []
        stack = [(node, vpath)]
        while stack:
            dnode, dpath = stack.pop()
            path = os.path.join(self.rw_root, *dpath)
            if dnode.wd == 0:
                self.watch_rw_dir(dnode, path)
            try:
                names = os.listdir(path)
            except OSError:
                continue
            out.extend(ViewChange(dpath, name) for name in names)
            for name in names:
                child = dnode.children.get(name)
                if child is not None and child.wd == 0 and _known_dir(child):
                    stack.append((child, (*dpath, name)))
        return out

    def _everything(self) -> list[ViewChange]:
        out: list[ViewChange] = []
        for node in list(self._rw_dirs.values()):
            if not may_hold_entries(node):
                continue
            try:
                parent = self.inodes.path(node.ino)
            except (KeyError, OSError):
                continue
            out.extend(ViewChange(parent, name) for name in node.children)
        return out

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """What ``graftfs status`` shows. Also called from the metrics server's thread while the
        trio thread changes the watcher: containers are copied in one C call (atomic under the
        GIL) before any Python loop over them, so that none changes size under an iteration."""
        applied, recent = self.applied
        lat = sorted(recent)
        last = self.last_change
        out: dict[str, object] = {
            "generation": self.generation.value,
            "poll_interval": self.interval,
            "changes_applied": applied,
            "failures": self.failures,
            "kernel_notifications": self.kernel.notified,
            "inotify_watches": len(self._rw_dirs) + len(self._ro_dirs),
            "local_shared_trees": sorted(self.trees[t] for t in self._local_trees.copy()),
        }
        if last is not None:
            out["last_change"] = last.as_dict()
        if lat:
            out["latency_ms"] = {"p50": round(lat[len(lat) // 2], 1), "max": round(lat[-1], 1), "count": len(lat)}
        return out


def _known_dir(node: Node) -> bool:
    """A node still in the view that the kernel was last told is a directory (told_directory:
    not one it knows as a link, like a layer's ``diff``). Unlike may_hold_entries, a node whose
    type was never told does not count: a directory found behind the mount is only worth
    watching once the kernel knows it."""
    return not node.detached and told_directory(node)
