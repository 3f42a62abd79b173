"""Telling the kernel which of its cached entries went stale, and nothing more.

The kernel caches lookups (including "no such entry"), attributes and file pages for minutes.
When a backing tree changes behind the mount, the watcher hands the names concerned to
``KernelCache.apply``, which re-resolves each name and compares it with what the kernel was last
told (graftfs.fuse.inodes.Node.sig), then notifies only where they differ:

* a name that now exists but the kernel never saw: drop its (possibly negative) entry;
* a known entry that vanished or changed type: drop the entry and forget the node;
* a known entry whose attributes changed: drop its attributes (and, for a file nobody has open,
  its cached pages; for open files attributes only, which avoids a measured deadlock with an
  in-flight read);
* a composed file (inodes.FileVersion) whose content changed: drop the entry and forget the node
  (the kernel's pages of its number stay right for whoever has it open; the name gets a new one);
* an entry marked ``deep`` (a record directory rewritten): drop the entry with everything cached
  below it. Never used for directories that may have mounts below them: dropping a directory
  entry detaches the mounts under it;
* a link whose target may have changed (a layer's ``diff`` pointing to another tree after a pin,
  links below a renamed directory): drop its cached target too. The kernel keeps a link's target
  in the link inode's pages (graftfs asks for FUSE_CAP_CACHE_SYMLINKS where pyfuse3 is rebuilt,
  tools/build-pyfuse3), and a lookup that answers the same number finds those pages again.

The notifications are synchronous pyfuse3 calls, so they run in a worker thread, never in a
handler (the synchronous entry invalidation deadlocks there); names the kernel no longer knows
are skipped quietly.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

import pyfuse3
import trio

from graftfs.format.attrs import Attr
from graftfs.fuse.errors import BackingTimeout
from graftfs.fuse.inodes import InodeTable, Node
from graftfs.fuse.workers import Workers
from graftfs.view.layout import ViewChange
from graftfs.view.namespace import Namespace

log = logging.getLogger(__name__)

#: Longest a batch of notifications may take; the kernel answers them at once unless a request
#: on the same directory is itself stuck on a hung backing tree.
NOTIFY_TIME_LIMIT = 30.0


@dataclass(frozen=True, slots=True)
class Notice:
    """One notification: drop entry ``name`` in directory ``ino``, or the inode ``ino`` itself."""

    ino: int
    name: str | None = None
    attr_only: bool = True


@dataclass(frozen=True, slots=True)
class Current:
    """What a changed name resolves to now: its attributes (None where nothing shows, _UNKNOWN
    where its tree cannot be read), the content of a file composed in memory, the target of a
    link graftfs made up."""

    attr: Attr | None
    content: bytes | None = None
    link: bytes | None = None


class ViewGeneration:
    """A counter the watcher bumps around every change of the view.

    The FUSE adapter notes the generation before computing an answer; an answer computed across a
    bump may predate the kernel being told of the change, so the kernel keeps it only briefly.
    """

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        self.value += 1


class KernelCache:
    def __init__(self, inodes: InodeTable, ns: Namespace, workers: Workers) -> None:
        self.inodes = inodes
        self.ns = ns
        self.workers = workers
        self.notified = 0
        self._limiter = trio.CapacityLimiter(1)

    async def apply(self, changes: Iterable[ViewChange]) -> int:
        """Bring the kernel's caches in line for these names; return the notifications sent."""
        items: list[tuple[Node, ViewChange, Node | None]] = []
        changes = list(changes)
        composed = self.ns.layout.composed_files()
        if any((*ch.parent, ch.name) in composed for ch in changes):
            # which images show depends on which layers do: the other composed files too
            changes += [ViewChange(vpath[:-1], vpath[-1]) for vpath in composed]
        for ch in dict.fromkeys(changes):
            parent = self.inodes.find(ch.parent)
            if parent is not None and not parent.detached and may_hold_entries(parent) \
                    and not self.inodes.is_busy(parent, ch.name):
                # (nothing is cached below an unknown directory, nor below what the kernel knows
                # as a link or file; busy names are a request's own)
                items.append((parent, ch, parent.children.get(ch.name)))
        if not items:
            return 0
        try:
            now = await self.workers.run_thread(self._resolve_all, [(*ch.parent, ch.name) for _, ch, _ in items])
        except BackingTimeout as e:
            # a backing tree hangs: notify without knowing, where that is harmless (see _decide)
            log.warning("re-resolving %d changed names: %s; dropping their cached entries unseen", len(items),
                        e.strerror)
            now = [Current(_UNKNOWN)] * len(items)
        notices = [n for (parent, ch, before), current in zip(items, now, strict=True)
                   for n in self._decide(parent, ch, before, current)]
        if notices:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("notifying the kernel: %s", notices[:10])
            with trio.move_on_after(NOTIFY_TIME_LIMIT) as scope:
                await trio.to_thread.run_sync(_notify_all, notices, abandon_on_cancel=True, limiter=self._limiter)
            if scope.cancelled_caught:
                log.warning("the kernel took longer than %g s to take %d cache notifications", NOTIFY_TIME_LIMIT,
                            len(notices))
            self.notified += len(notices)
        return len(notices)

    def _resolve_all(self, vpaths: list[tuple[str, ...]]) -> list[Current]:
        """What each view path is now (worker thread)."""
        out: list[Current] = []
        for vpath in vpaths:
            try:
                res = self.ns.resolve(vpath)
                link = res.top.link_target
                out.append(Current(res.attr, res.top.content, os.fsencode(link) if link is not None else None))
            except (FileNotFoundError, NotADirectoryError):
                out.append(Current(None))
            except OSError as e:  # e.g. an unavailable share
                log.debug("cannot re-resolve %s: %s", "/".join(vpath), e)
                out.append(Current(_UNKNOWN))
        return out

    def _decide(self, parent: Node, ch: ViewChange, before: Node | None, current: Current) -> list[Notice]:
        """The notifications for one name (trio thread: it updates the inode table).

        ``before`` is the node the name had when the change was picked up: if a request through
        the mount replaced it meanwhile (a rename, a create), the kernel already knows best and
        the possibly older resolution is not acted on.
        """
        node = parent.children.get(ch.name)
        if node is not before or self.inodes.is_busy(parent, ch.name):
            return []
        now, content = current.attr, current.content
        if now is _UNKNOWN:
            return self._unseen(parent, ch, node)
        if node is None or node.detached:
            # the kernel holds no positive entry; a negative one is stale only if the name exists now
            return [Notice(parent.ino, ch.name)] if now is not None else []
        told_link, node.link = node.link, None  # resolved afresh by the next readlink or lookup
        if now is not None and (node.version is not None or content is not None):
            if node.version is not None and node.version.content == content:
                return []  # the same content under the same number: nothing went stale
            self.inodes.replace(parent, ch.name)  # a new content gets a new number (FileVersion)
            return [Notice(parent.ino, ch.name)]
        if now is None or node.sig is None or stat.S_IFMT(now.mode) != stat.S_IFMT(node.sig[0]):
            self.inodes.detach(parent, ch.name)
            return [Notice(parent.ino, ch.name)]
        notices = []
        if ch.deep:
            notices.append(Notice(parent.ino, ch.name))
            notices += [Notice(link.ino, attr_only=False) for link in links_below(node)]
        # a link's target is its pages: unknown as told (a link on disk, or cleared by a
        # rename) counts as changed
        target_changed = stat.S_ISLNK(now.mode) and (told_link is None or told_link != current.link)
        if now.sig != node.sig or target_changed:
            node.sig = now.sig
            keep_pages = now.is_dir or bool(node.open_fds)
            notices.append(Notice(node.ino, attr_only=keep_pages))
        return notices

    @staticmethod
    def _unseen(parent: Node, ch: ViewChange, node: Node | None) -> list[Notice]:
        """Notifications for a name whose current state cannot be read (a hung or unavailable
        tree): drop what may be stale without changing the inode table. A directory's entry is
        kept (dropping it would detach mounts below it); its attributes are refreshed."""
        if node is None or node.detached:
            return [Notice(parent.ino, ch.name)]
        if told_directory(node):
            return [Notice(node.ino, attr_only=True)]
        return [Notice(parent.ino, ch.name), Notice(node.ino, attr_only=bool(node.open_fds))]


def links_below(node: Node) -> list[Node]:
    """The nodes below ``node`` the kernel was last told are links (their targets are cached)."""
    found = []
    todo = list(node.children.values())
    while todo:
        child = todo.pop()
        if child.sig is not None and stat.S_ISLNK(child.sig[0]):
            found.append(child)
        todo.extend(child.children.values())
    return found


def told_directory(node: Node) -> bool:
    """Whether the kernel was last told ``node`` is a directory.

    The type told is ``node.sig``, which every reply sets; ``node.link`` is no guide, since a
    change of the link's attributes clears it (_decide) while the kernel still holds a link (a
    layer's ``diff``, see Namespace._direct).
    """
    return node.sig is not None and stat.S_ISDIR(node.sig[0])


def may_hold_entries(node: Node) -> bool:
    """Whether the kernel may cache entries below ``node``: it was last told the node is a
    directory (told_directory), or was never told its type, like the root before its first
    getattr.

    What the kernel knows as a link has no entries in the kernel even where the backing
    directory behind it changes, and the kernel refuses an entry notification naming it as the
    parent (ENOTDIR, which libfuse prints on stderr).
    """
    return node.sig is None or told_directory(node)


#: Marks a name that could not be re-resolved (its tree is unreachable).
_UNKNOWN = Attr(0, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0)


def _notify_all(notices: list[Notice]) -> None:
    """Send the notifications (worker thread; each one is a write to /dev/fuse)."""
    for n in notices:
        try:
            if n.name is not None:
                pyfuse3.invalidate_entry(n.ino, os.fsencode(n.name))
            else:
                pyfuse3.invalidate_inode(n.ino, attr_only=n.attr_only)
        except FileNotFoundError:
            continue  # the kernel already forgot it: nothing cached to drop
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                log.warning("cache notification for inode %d %s failed: %s", n.ino, n.name or "", e)
