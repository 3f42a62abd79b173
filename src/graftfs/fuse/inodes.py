"""The inode table: graftfs' own inode numbers for the entries of the view.

The kernel talks in inode numbers; the union model talks in view paths. Each entry the kernel
has seen gets a Node (parent, name) with a number that stays the same for the life of the mount
while the entry exists, whichever backing tree it comes from and even when it is copied up from
RO to RW. Nodes are kept after the kernel forgets them so numbers stay stable; a node is dropped
only when its entry is removed from the view and the kernel holds no reference to it.

The names of one hard-linked file share one node (and so one inode number and link count, as on
the backing filesystem: tar, rsync -H and du compare them): the node keeps its first name and
lists the others as aliases; when its first name goes, an alias takes its place.

Only the trio thread touches this table, so it needs no locking.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyfuse3

from graftfs.format.attrs import Attr

VPath = tuple[str, ...]

#: How long after a request through the mount changed a name the inotify events for it are
#: taken as that request's own (changed_through_mount). The kernel queues them during the
#: syscall and the watcher reads them within milliseconds; a change made behind the mount to
#: the very same name within this time is the only one that would be taken for the request's.
OWN_CHANGE_SECONDS = 1.0
#: Names whose last change is remembered before the old ones are dropped.
MAX_CHANGED_NAMES = 4096


@dataclass(frozen=True, slots=True)
class FileVersion:
    """One content of a file graftfs composes in memory (a merged index file), fixed for the
    inode number it was told to the kernel under.

    The kernel keeps a file's pages per inode. A composed file changes whenever the share or
    the node's own records do; were it one inode, an open could read pages another open of an
    older content left behind, so it used to be read past the page cache on every open. With a
    number per content, the kernel's pages of a number are always right, and a new content
    reaches the kernel as a new number behind the name (GraftOperations._child_node)."""

    content: bytes
    attr: Attr


@dataclass(eq=False, slots=True)
class Node:
    ino: int
    name: str
    parent: Node | None
    children: dict[str, Node] = field(default_factory=dict)
    lookups: int = 0
    detached: bool = False  # removed from the view; kept while the kernel still refers to it
    open_fds: set[int] = field(default_factory=set)
    sig: tuple[int, int, int, int] | None = None  # Attr.sig last told to the kernel
    wd: int = 0  # inotify watch on the directory's RW part (graftfs.fuse.watcher), 0 when none
    link: bytes | None = None  # target of a link graftfs made up, as last told (readlink answers it)
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of a hard-linked file's backing file
    aliases: list[tuple[Node, str]] = field(default_factory=list)  # its other names (parent, name)
    version: FileVersion | None = None  # a composed file's content under this number (FileVersion)
    replaced_at: VPath | None = None  # the composed file's path this detached number still answers for


class InodeTable:
    def __init__(self) -> None:
        self.root = Node(pyfuse3.ROOT_INODE, "", None, lookups=1)
        self._by_ino: dict[int, Node] = {self.root.ino: self.root}
        self._next = pyfuse3.ROOT_INODE + 1
        self._busy: dict[tuple[int, str], int] = {}  # (parent ino, name) -> requests changing it
        self._changed: dict[tuple[int, str], float] = {}  # (parent ino, name) -> when a request last changed it
        self._by_identity: dict[tuple[int, int], Node] = {}  # hard-linked files' nodes

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Node:
        """The node for an inode number; KeyError for numbers graftfs never gave out."""
        return self._by_ino[ino]

    def path(self, ino: int) -> VPath:
        """The view path of a node, walking up to the root."""
        node = self._by_ino[ino]
        if node.replaced_at is not None and node.detached:
            return node.replaced_at
        parts: list[str] = []
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        if node is not self.root:
            # the entry, or a directory above it, was removed from the view
            raise FileNotFoundError(errno.ENOENT, f"inode {ino} was removed from the view")
        return tuple(reversed(parts))

    @contextmanager
    def busy(self, *names: tuple[Node, str]) -> Iterator[None]:
        """Mark names that a request through the mount is changing, from before its backing
        operation until the table follows it: the watcher then leaves them alone (the events
        it sees for them are the request's own, and the table is briefly behind the disk)."""
        keys = [(parent.ino, name) for parent, name in names]
        for key in keys:
            self._busy[key] = self._busy.get(key, 0) + 1
        try:
            yield
        finally:
            for key in keys:
                left = self._busy[key] - 1
                if left:
                    self._busy[key] = left
                else:
                    del self._busy[key]
                self._note_changed(key)

    def is_busy(self, parent: Node, name: str) -> bool:
        return (parent.ino, name) in self._busy

    def changed(self, node: Node) -> None:
        """A request changed the entry through an open file or its attributes (a write, a
        truncate, a chmod): the kernel already knows what it did (see changed_through_mount)."""
        if node.parent is not None:
            self._note_changed((node.parent.ino, node.name))

    def changed_through_mount(self, parent: Node, name: str) -> bool:
        """Is a request changing this name now, or did one within OWN_CHANGE_SECONDS?

        Then an inotify event for it in the RW tree is that request's own: the kernel made the
        change through the mount and knows its outcome already (where the view shows something
        else, the request tells the watcher itself: GraftOperations._recheck_links; a merged
        index file renamed over has its attributes fetched again by the kernel after the rename).
        Acting on such events cost a re-resolution, a notification and a view generation each,
        twenty per container start."""
        key = (parent.ino, name)
        if key in self._busy:
            return True
        when = self._changed.get(key)
        return when is not None and time.monotonic() - when < OWN_CHANGE_SECONDS

    def _note_changed(self, key: tuple[int, str]) -> None:
        now = time.monotonic()
        self._changed.pop(key, None)  # re-inserted last: the dict stays in order of change
        self._changed[key] = now
        while len(self._changed) > MAX_CHANGED_NAMES:
            oldest = next(iter(self._changed))
            if now - self._changed[oldest] < OWN_CHANGE_SECONDS:
                break  # a burst of changes: kept until they are older
            del self._changed[oldest]

    def find(self, vpath: VPath) -> Node | None:
        """The node at a view path if the kernel was ever told of it (never creates one)."""
        node = self.root
        for name in vpath:
            child = node.children.get(name)
            if child is None:
                return None
            node = child
        return node

    def child(self, parent: Node, name: str, identity: tuple[int, int] | None = None) -> Node:
        """The node for ``name`` in ``parent``, numbered on first sight; a name of a hard-linked
        file (``identity``) the table already knows under another name gets that file's node."""
        if parent.detached:
            raise FileNotFoundError(errno.ENOENT, "the directory was removed from the view")
        node = parent.children.get(name)
        if node is None and identity is not None:
            known = self._by_identity.get(identity)
            if known is not None and not known.detached and known.identity == identity:
                return self.alias(parent, name, known)
        if node is None:
            node = Node(self._next, name, parent)
            self._next += 1
            parent.children[name] = node
            self._by_ino[node.ino] = node
        if identity is not None and node.identity != identity:
            self.set_identity(node, identity)
        return node

    def set_identity(self, node: Node, identity: tuple[int, int]) -> None:
        """``node`` is the hard-linked file ``identity``: its further names share it."""
        node.identity = identity
        self._by_identity[identity] = node

    def alias(self, parent: Node, name: str, node: Node) -> Node:
        """Give ``node`` (a hard-linked file) the further name ``name`` in ``parent``."""
        self.detach(parent, name)
        parent.children[name] = node
        node.aliases.append((parent, name))
        return node

    def forget(self, ino: int, count: int) -> Node | None:
        """The kernel dropped ``count`` references; returns the node (None if unknown)."""
        node = self._by_ino.get(ino)
        if node is None:
            return None
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)
        return node

    def _maybe_drop(self, node: Node) -> None:
        if node.detached and node.lookups == 0 and not node.open_fds and not node.children:
            self._by_ino.pop(node.ino, None)
            if node.identity is not None and self._by_identity.get(node.identity) is node:
                del self._by_identity[node.identity]

    def detach(self, parent: Node, name: str) -> None:
        """The entry ``name`` left the view (unlink, rmdir, replaced by a rename)."""
        node = parent.children.pop(name, None)
        if node is None:
            return
        if self._drop_name(node, parent, name):
            return  # another name of the same file remains
        for sub in list(node.children.values()):
            self.detach(node, sub.name)
        node.detached = True
        node.parent = None
        self._maybe_drop(node)

    def replace(self, parent: Node, name: str) -> None:
        """A composed file's name gets a new number (FileVersion), or a file is renamed over it.
        The old number leaves the view but keeps answering as that name until the kernel
        forgets it: a process may hold it from a lookup made a moment before (an open on its
        way, a stat), and must not see the name vanish meanwhile, as it would not on a local
        filesystem."""
        node = parent.children.get(name)
        if node is None:
            return
        try:
            vpath: VPath | None = (*self.path(parent.ino), name)
        except FileNotFoundError:
            vpath = None  # its directory left the view too: there is no name to answer as
        self.detach(parent, name)
        if node.detached:
            node.replaced_at = vpath

    def _drop_name(self, node: Node, parent: Node, name: str) -> bool:
        """Forget one name of a hard-linked node; True while it has another."""
        if (parent, name) in node.aliases:
            node.aliases.remove((parent, name))
            return True
        if node.aliases:
            node.parent, node.name = node.aliases.pop(0)  # the next name becomes its own
            return True
        return False

    def move(self, parent: Node, name: str, new_parent: Node, new_name: str, composed: bool = False) -> None:
        """Follow a rename: the node keeps its number, and its subtree moves with it. Over a
        ``composed`` file's name, the node renamed over keeps answering as the name (replace)."""
        node = parent.children.pop(name, None)
        if composed:
            self.replace(new_parent, new_name)
        else:
            self.detach(new_parent, new_name)
        if node is None:
            return
        if new_parent.detached:
            parent.children[name] = node
            self.detach(parent, name)
            return
        if (parent, name) in node.aliases:
            node.aliases[node.aliases.index((parent, name))] = (new_parent, new_name)
        else:
            node.name = new_name
            node.parent = new_parent
        new_parent.children[new_name] = node

    def exchange(self, parent: Node, name: str, new_parent: Node, new_name: str) -> None:
        """Follow RENAME_EXCHANGE: the two nodes swap places."""
        a = parent.children.pop(name, None)
        b = new_parent.children.pop(new_name, None)
        if a is not None:
            a.name, a.parent = new_name, new_parent
            new_parent.children[new_name] = a
        if b is not None:
            b.name, b.parent = name, parent
            parent.children[name] = b

    def close_fd(self, node: Node, fd: int) -> None:
        node.open_fds.discard(fd)
        self._maybe_drop(node)
