"""The FUSE adapter: pyfuse3 Operations over the merged namespace, and nothing more.

Each handler turns inode numbers into view paths (graftfs.fuse.inodes), runs the namespace operation
in a worker thread with a time limit (graftfs.fuse.workers), updates the inode table, and converts
attributes for the kernel. Every handler is wrapped by graftfs.fuse.errors.fuse_boundary, so that an
unexpected exception becomes EIO instead of ending the mount.

Virtual extended attributes let operators ask the mount about itself with plain getfattr:
``user.graftfs.origin`` (also ``trusted.graftfs.origin``, which works on symlinks too) on any
entry answers ``rw`` or ``ro:<tree>``; ``user.graftfs.status`` on the root answers the status
JSON that ``graftfs status`` prints.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import pyfuse3

from graftfs.format.attrs import Attr
from graftfs.format.names import ORIGIN_XATTRS, PID_XATTR, STATUS_XATTR, UNHIDE_XATTR
from graftfs.fuse.errors import REQUEST_SECONDS, REQUESTS, fuse_boundary
from graftfs.fuse.files import InodeFiles
from graftfs.fuse.inodes import FileVersion, InodeTable, Node
from graftfs.fuse.kernel_cache import ViewGeneration
from graftfs.fuse.workers import Workers
from graftfs.linux import RENAME_EXCHANGE
from graftfs.view.layout import ANY_READER, ViewChange
from graftfs.view.lock_tokens import write_token_fd
from graftfs.view.namespace import Busy, Namespace, NeedsCopyUp, Resolved, opens_for_writing

log = logging.getLogger(__name__)

VPath = tuple[str, ...]

OWN_XATTR_PREFIXES = ("user.graftfs.", "trusted.graftfs.")
#: Requests whose first argument is a file handle (a backing descriptor), a directory handle
#: (numbered apart), or a directory and a name: what GraftOperations.trace needs to name paths.
FILE_HANDLE_REQUESTS = frozenset({"read", "write", "fsync", "release"})
DIR_HANDLE_REQUESTS = frozenset({"readdir", "releasedir", "fsyncdir"})
NAMED_REQUESTS = frozenset({"lookup", "mkdir", "mknod", "symlink", "create", "unlink", "rmdir", "rename"})
#: Longest image reference ``graftfs unhide`` passes (a registry name, a path and a tag).
MAX_REF_CHARS = 1024
STATUS_MAX_BYTES = 60_000

#: With the watcher telling the kernel exactly what changed (graftfs.fuse.watcher), the kernel may
#: keep entries, attributes and file pages for long, so warm lookups never reach Python.
WATCHED_CACHE_TIMEOUT = 300.0
#: Without a watcher (plain layout, or -o poll=0) changes behind the mount show after this.
UNWATCHED_CACHE_TIMEOUT = 1.0
#: A reply computed while the view changed under it may be stale: the kernel keeps it this long.
RACED_CACHE_TIMEOUT = 0.0


@dataclass
class DirHandle:
    node: Node
    entries: list[tuple[str, Resolved]] | None = None
    generation: int = 0  # of the view when the listing was taken


R = TypeVar("R")


class ViewListener(Protocol):
    """Who wants to know what the kernel learns and forgets (the watcher, when there is one)."""

    def watch_rw_dir(self, node: Node, path: str) -> None:
        """The kernel learned of a directory with an RW part at ``path``: changes made there
        behind the mount must reach it."""

    def forget_rw_dir(self, node: Node) -> None:
        """The kernel forgot a watched directory (nothing below it is cached any more)."""

    def stale_entry(self, parent: VPath, name: str) -> None:
        """The kernel may hold this entry with a wrong type or link target: re-check it after
        the request that found out (graftfs.fuse.kernel_cache decides how)."""

    def view_changed(self, changes: list[ViewChange]) -> None:
        """A request changed the view itself (``graftfs unhide``): re-check these names after it
        and tell the runtime's long-running clients, as for a change of a shared tree."""


class Unwatched:
    """The listener of a mount without a watcher: nothing to tell."""

    def watch_rw_dir(self, node: Node, path: str) -> None:
        return None

    def forget_rw_dir(self, node: Node) -> None:
        return None

    def stale_entry(self, parent: VPath, name: str) -> None:
        return None

    def view_changed(self, changes: list[ViewChange]) -> None:
        return None  # without a watcher the kernel keeps entries for a second only


class GraftOperations(pyfuse3.Operations):
    """pyfuse3 handlers for one graftfs mount.

    ``inodes`` and ``generation`` are shared with the watcher (``listener``), which keeps the
    kernel's caches exact; without one (``watched`` False) the kernel caches for a second only.
    ``info`` adds the daemon's part to the status the root's ``user.graftfs.status`` answers.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        ns: Namespace,
        workers: Workers,
        inodes: InodeTable,
        generation: ViewGeneration,
        listener: ViewListener | None = None,
        info: Callable[[], dict[str, Any]] | None = None,
        kernel_opens: bool = False,
    ) -> None:
        super().__init__()
        self.ns = ns
        self.workers = workers
        self.inodes = inodes
        self.info = info or (lambda: {})
        watched = listener is not None
        self.cache_timeout = WATCHED_CACHE_TIMEOUT if watched else UNWATCHED_CACHE_TIMEOUT
        self.keep_cache = watched
        #: Bumped by the watcher around every change of the view; a reply whose answer was
        #: computed across a bump is cached only briefly (it may predate the invalidation).
        self.generation = generation
        self.listener: ViewListener = listener or Unwatched()
        self._files: dict[int, tuple[Node, bool]] = {}  # fd -> (node, fd is on the RW tree)
        self._dirs: dict[int, DirHandle] = {}
        self._next_dir_fh = 1
        #: the kernel opens files itself (graftfs.fuse.files): file I/O by inode, no handles
        self.files = InodeFiles(ns, workers, inodes) if kernel_opens else None
        self.bytes_read = self.bytes_written = 0  # data through FUSE (status: what bypasses us)
        self.unsupported_xattrs = unsupported_xattrs()

    # -- helpers ----------------------------------------------------------------------------

    def trace(self, op: str, args: tuple[object, ...]) -> None:
        """Log one request with the path it is for (set as graftfs.fuse.errors' tracer by a
        daemon logging at debug level): what the runtime walks, request by request."""
        try:
            where = "/".join(self._trace_path(op, args)) or "."
        except Exception:  # a node gone from the view (deleted while open), an unknown handle
            where = "?"
        log.debug("request %s %s", op, where)

    def _trace_path(self, op: str, args: tuple[object, ...]) -> VPath:
        first = args[1] if len(args) > 1 else None
        if op in FILE_HANDLE_REQUESTS and isinstance(first, int):
            # (the kernel opening files itself: the handle is the inode, graftfs.fuse.files)
            return self.inodes.path(self._files[first][0].ino if self.files is None else first)
        if op in DIR_HANDLE_REQUESTS and isinstance(first, int):
            return self.inodes.path(self._dirs[first].node.ino)
        if op in NAMED_REQUESTS and isinstance(first, int) and isinstance(args[2], bytes):
            return (*self.inodes.path(first), os.fsdecode(args[2]))
        if isinstance(first, int):
            return self.inodes.path(first)
        return ()

    def _reply(self, node: Node, res: Resolved, generation: int | None = None) -> pyfuse3.EntryAttributes:
        """Attributes of a resolved entry for the kernel; a link graftfs made up (a layer's
        diff, an ``l/`` link) keeps its target on the node, so readlink is answered from memory
        (with the stock pyfuse3 the kernel asks on every path walk through it; see
        session.links_cached)."""
        node.link = os.fsencode(res.top.link_target) if res.top.link_target is not None else None
        attr = res.attr
        if node.version is not None:
            if res.top.content == node.version.content:
                if attr != node.version.attr:
                    node.version = replace(node.version, attr=attr)  # e.g. a chmod: same pages
            else:
                attr = node.version.attr  # this number keeps its content (see _child_node)
        return self._entry(node, attr, generation)

    def _entry(self, node: Node, attr: Attr, generation: int | None = None) -> pyfuse3.EntryAttributes:
        """Attributes for the kernel; ``generation`` is the view generation the answer was
        computed in (None: not subject to watcher races). Merged index files are cached like the
        rest: the watcher tells the kernel when the share changes them, and a rename over one
        (the runtime saving it) makes the kernel fetch them again."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        e.generation = 0
        timeout = self.cache_timeout if generation in (None, self.generation.value) else RACED_CACHE_TIMEOUT
        e.entry_timeout = timeout
        e.attr_timeout = timeout
        node.sig = attr.sig
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = attr.blksize
        e.st_blocks = attr.blocks
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    def _path(self, ino: int) -> VPath:
        try:
            return self.inodes.path(ino)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _node(self, ino: int) -> Node:
        try:
            return self.inodes.get(ino)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _child_path(self, parent_ino: int, name: bytes) -> tuple[Node, str, VPath]:
        parent = self._node(parent_ino)
        sname = os.fsdecode(name)
        return parent, sname, (*self._path(parent_ino), sname)

    def _new_entry(self, parent: Node, name: str, res: Resolved, generation: int | None = None
                   ) -> pyfuse3.EntryAttributes:
        node = self._child_node(parent, name, res, res.attr.identity)
        node.lookups += 1
        self._seen(node, res)
        return self._reply(node, res, generation)

    def _child_node(self, parent: Node, name: str, res: Resolved,
                    identity: tuple[int, int] | None) -> Node:
        """The node to tell the kernel of for ``name``. A file composed in memory gets a number
        per content (inodes.FileVersion): when the name shows another content than the number
        the kernel knows, or a composed content where the kernel knows another file (the one
        the runtime renamed over it), the name gets a new number and the old one keeps its
        content for as long as the kernel refers to it."""
        node = self.inodes.child(parent, name, identity)
        content = res.top.content
        if node.version is None and content is None:
            return node
        if node.version is not None and node.version.content == content:
            return node
        if node.sig is not None:  # told to the kernel as something else
            self.inodes.replace(parent, name)
            node = self.inodes.child(parent, name, identity)
        node.version = FileVersion(content, res.attr) if content is not None else None
        return node

    def _seen(self, node: Node, res: Resolved) -> None:
        """Note a directory the kernel now knows, so changes behind the mount reach it."""
        if res.is_dir and node.wd == 0:
            for src in res.sources:
                if src.is_rw and src.path is not None:
                    self.listener.watch_rw_dir(node, src.path)

    def _negative(self, generation: int) -> pyfuse3.EntryAttributes:
        """A "no such entry" answer the kernel may cache (the watcher drops it if the name appears)."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = self.cache_timeout if generation == self.generation.value else RACED_CACHE_TIMEOUT
        return e

    # -- lookup and attributes --------------------------------------------------------------

    @fuse_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if name == b".":
            node = parent
        elif name == b"..":
            node = parent.parent or parent
        else:
            node = None
        if node is not None:
            res = await self.workers.run(self.ns.resolve, self._path(node.ino))
            node.lookups += 1
            return self._reply(node, res)
        parent, sname, vpath = self._child_path(parent_inode, name)
        generation = self.generation.value
        try:
            res = await self.workers.run(self.ns.resolve, vpath)
        except FileNotFoundError:
            if self.ns.is_private(vpath):
                raise
            return self._negative(generation)
        return self._new_entry(parent, sname, res, generation)

    @fuse_boundary
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            node = self.inodes.forget(ino, count)
            if node is not None and node.lookups == 0:
                if node.wd:
                    self.listener.forget_rw_dir(node)
                if self.files is not None:
                    self.files.forget(ino)

    @fuse_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.version is not None:
            return self._entry(node, node.version.attr)  # what this number is never changes
        if node.detached and node.replaced_at is None:
            # removed from the view but still open somewhere: answer from the open file
            fd = next(iter(node.open_fds), None) if self.files is None else self.files.fd_of(inode)
            if fd is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            st = await self.workers.run(os.fstat, fd)
            return self._entry(node, Attr.from_stat(st))
        res = await self.workers.run(self.ns.resolve, self._path(inode))
        return self._reply(node, res)

    @fuse_boundary
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
        fh: int | None, ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.detached:
            fd = self._detached_fd(inode, fh)
            st = await self.workers.run_thread(_setattr_fd, fd, attr, fields)
            return self._entry(node, Attr.from_stat(st))
        vpath = self._path(inode)
        self.inodes.changed(node)
        try:
            if fields.update_size or not self.workers.inline:
                raise NeedsCopyUp(vpath)  # a truncation may free gigabytes: never in the trio thread
            res = self._setattr_path(vpath, attr, fields, fh, quick=True)  # the runtime's chmod of its new file
        except NeedsCopyUp:
            res = await self.workers.run_thread(self._setattr_path, vpath, attr, fields, fh)
        self.inodes.changed(node)
        if self.files is not None:
            self.files.stale(node)  # a copy-up moved the file to RW
        return self._reply(node, res)

    def _detached_fd(self, ino: int, fh: int | None) -> int:
        """The descriptor a file removed from the view but still open is changed through: the
        open's (or, with the kernel opening files itself, the inode's)."""
        if self.files is not None:
            kept, fd = self.files.fd_of(ino), self.files.writable_fd_of(ino)
        else:
            kept = fh
            fd = fh if fh is not None and fh in self._files and self._files[fh][1] else None
        if kept is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if fd is None:
            raise pyfuse3.FUSEError(errno.EROFS)  # never change a shared file through its fd
        return fd

    def _setattr_path(
        self, vpath: VPath, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
        quick: bool = False,
    ) -> Resolved:
        """Apply attribute changes in RW, copying the entry up first (in a worker); ``quick``:
        only to an entry already in RW (NeedsCopyUp otherwise)."""
        path = self.ns.copy_up(vpath, quick=quick)
        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(path, uid, gid, follow_symlinks=False)
        if fields.update_mode and not is_link:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_size:
            if fh is not None and self.files is None and self._files.get(fh, (None, False))[1]:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_atime or fields.update_mtime:
            _utime(path, attr, fields, lambda: os.lstat(path))
        return self.ns.resolve(vpath)

    @fuse_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.link is not None:
            return node.link
        target = await self.workers.run(self.ns.readlink, self._path(inode))
        return os.fsencode(target)

    @fuse_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await self.workers.run(self.ns.statfs)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                     "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(st, name))
        return out

    # -- creating and removing --------------------------------------------------------------

    @fuse_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
                    ) -> pyfuse3.EntryAttributes:
        parent, sname, vpath = self._child_path(parent_inode, name)
        with self.inodes.busy((parent, sname)):
            res = await self.workers.run(self.ns.mkdir, vpath, mode, ctx.uid, ctx.gid)
            return self._created_entry(parent, sname, vpath, res)

    def _created_entry(self, parent: Node, name: str, vpath: VPath, res: Resolved) -> pyfuse3.EntryAttributes:
        """The reply to mkdir or create. Where the view shows a link instead (Namespace._direct),
        the kernel still wants the directory or file it asked for: answer it uncached and under a
        number the link will not reuse, so the next path walk looks the name up again and
        follows the link to the backing entry."""
        if not self.ns.is_direct(vpath):
            return self._new_entry(parent, name, res)
        entry = self._new_entry(parent, name, res, generation=-1)
        node = parent.children.get(name)
        if node is not None:
            self.listener.forget_rw_dir(node)  # the link's target is not a directory the kernel knows
        self.inodes.detach(parent, name)
        return entry

    @fuse_boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent, sname, vpath = self._child_path(parent_inode, name)
        with self.inodes.busy((parent, sname)):
            res = await self.workers.run(self.ns.mknod, vpath, mode, rdev, ctx.uid, ctx.gid)
            return self._created_entry(parent, sname, vpath, res)

    @fuse_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent, sname, vpath = self._child_path(parent_inode, name)
        with self.inodes.busy((parent, sname)):
            res = await self.workers.run(self.ns.symlink, vpath, os.fsdecode(target), ctx.uid, ctx.gid)
            return self._new_entry(parent, sname, res)

    @fuse_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        src, source = self._path(inode), self._node(inode)
        parent, sname, vpath = self._child_path(new_parent_inode, new_name)
        with self.inodes.busy((parent, sname)):
            res = await self.workers.run_thread(self.ns.link, src, vpath)
            # the kernel holds the source under its number: the new name is that file too
            if res.attr.identity is not None and source.identity is None:
                self.inodes.set_identity(source, res.attr.identity)
            return self._new_entry(parent, sname, res)

    @fuse_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent, sname, vpath = self._child_path(parent_inode, name)
        with self.inodes.busy((parent, sname)):
            fd, res = await self.workers.run(self.ns.create, vpath, mode, flags, ctx.uid, ctx.gid)
            policy = self.ns.layout.file_policy(vpath, in_rw=True)
            try:
                if policy.token:
                    await self.workers.run(write_token_fd, fd)  # never shorter than a token (lock_tokens)
                    res = await self.workers.run(self.ns.resolve, vpath)  # (its size is the token's)
                node = self.inodes.child(parent, sname)
                entry = self._created_entry(parent, sname, vpath, res)
            except BaseException:
                os.close(fd)
                raise
        if self.files is not None:
            self.files.adopt(node, fd)  # I/O by inode from here on, like the kernel's own opens
            return pyfuse3.FileInfo(fh=0, direct_io=policy.direct_io, keep_cache=not policy.direct_io), entry
        self._opened(node, fd, in_rw=True)
        if policy.direct_io:
            return pyfuse3.FileInfo(fh=fd, direct_io=True), entry
        return pyfuse3.FileInfo(fh=fd, keep_cache=self.keep_cache), entry

    @fuse_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent, sname, vpath = self._child_path(parent_inode, name)
        with self.inodes.busy((parent, sname)):
            if self.files is not None:
                await self.files.hold(parent.children.get(sname))
            # in a worker, unlink moves a layer's directory aside itself; in the trio thread,
            # unlink_entry leaves that to a worker (it waits on the RW filesystem's rename locks)
            discard = await self._quick_change(self.ns.unlink_entry, vpath, in_worker=self.ns.unlink)
            if discard is not None:
                await self.workers.run_thread(self.ns.discard_rw_dir, discard)
            self.inodes.detach(parent, sname)

    @fuse_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent, sname, vpath = self._child_path(parent_inode, name)
        with self.inodes.busy((parent, sname)):
            await self._quick_change(self.ns.rmdir, vpath)
            self.inodes.detach(parent, sname)

    async def _quick_change(self, change: Callable[[VPath], R], vpath: VPath,
                            in_worker: Callable[[VPath], R] | None = None) -> R:
        """A change of the view that takes the mutation lock but no time (unlink, rmdir): in
        the trio thread when every tree is local and no worker holds the lock, else (as
        ``in_worker`` when given) in a worker. The hop to a worker and back cost 0.2-0.4 ms, ten
        times the change, and a container's start and removal make a dozen such changes."""
        if self.workers.inline:
            try:
                return self.ns.unless_busy(change, vpath)
            except Busy:
                pass
        return await self.workers.run_thread(in_worker or change, vpath)

    @fuse_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        old_parent, old_name, src = self._child_path(parent_inode_old, name_old)
        new_parent, new_name, dst = self._child_path(parent_inode_new, name_new)
        composed = self.ns.layout.composed_files()
        with self.inodes.busy((old_parent, old_name), (new_parent, new_name)):
            keep_written = self.files is not None and not flags & RENAME_EXCHANGE and dst in composed
            if self.files is not None and not keep_written:
                await self.files.hold(new_parent.children.get(new_name))
            written = await self.workers.run_thread(self._rename, src, dst, flags, ctx.pid, keep_written)
            if flags & RENAME_EXCHANGE:
                self.inodes.exchange(old_parent, old_name, new_parent, new_name)
            else:
                self.inodes.move(old_parent, old_name, new_parent, new_name, dst in composed)
            moved = new_parent.children.get(new_name)
            if written is not None and moved is not None:
                moved.version = written
        if dst in composed:
            # a merged index file renamed over shows the composed file, not the one renamed, and
            # under a number of its own (FileVersion): the kernel keeps the renamed file's number
            # for the name until told (the other composed files are re-checked with it)
            self.listener.stale_entry(dst[:-1], dst[-1])
        self._recheck_links(src, dst, moved)

    def _rename(self, src: VPath, dst: VPath, flags: int, pid: int, keep_written: bool) -> FileVersion | None:
        """The rename (in a worker); with ``keep_written``, what the runtime wrote to the file it
        renames over a composed one, read first. With the kernel opening files itself, that
        file's inode is read from the kernel's pages until the name's new number reaches it: it
        must stay what was written, not become the node's part the split-back leaves in RW
        (None: not a file the runtime wrote; the rename says what it is)."""
        written = None
        if keep_written:
            try:
                with open(self.ns.rw_path(src), "rb") as f:
                    st = os.fstat(f.fileno())
                    if stat.S_ISREG(st.st_mode):
                        written = FileVersion(f.read(), Attr.from_stat(st))
            except OSError:
                pass
        self.ns.rename(src, dst, flags, pid)
        return written

    def _recheck_links(self, src: VPath, dst: VPath, moved: Node | None) -> None:
        """A rename can turn a directory into a link the view shows instead (or back), under
        the number the kernel holds (e.g. a staged layer renamed to ``<id>/diff``), and moves
        links whose targets were derived from their old path: have the kernel look them up
        again once this request is over (never from here: a synchronous invalidation of an entry
        from inside a request on its directory deadlocks the mount)."""
        if moved is None:
            return
        if self.ns.is_direct(src) or self.ns.is_direct(dst):
            self.listener.stale_entry(dst[:-1], dst[-1])
        for name, child in moved.children.items():
            if child.link is not None:
                child.link = None
                self.listener.stale_entry(dst, name)

    # -- files ------------------------------------------------------------------------------

    @fuse_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.files is not None:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel opens files itself from now on
        node = self._node(inode)
        writing = opens_for_writing(flags)
        vpath = self._path(inode)  # (a replaced number: the name it was replaced at, InodeTable.replace)
        if node.version is not None and not writing:
            version_fd = await self.workers.run(self.ns.open_version, vpath, node.version.content, ctx.pid)
            if version_fd is not None:
                self._opened(node, version_fd, in_rw=False)
                return pyfuse3.FileInfo(fh=version_fd, keep_cache=True)  # this number's pages are its content
            # the name shows another content now: this open reads it past the page cache, and
            # the kernel looks the name up afresh for the next one
            self.listener.stale_entry(vpath[:-1], vpath[-1])
        if writing:
            self.inodes.changed(node)  # a copy-up or truncation made by this request
        try:
            fd, in_rw = await self.workers.run(self.ns.open, vpath, flags, ctx.pid, copy_up=False)
        except NeedsCopyUp:
            fd, in_rw = await self.workers.run_thread(self.ns.open, vpath, flags, ctx.pid)
        if writing:
            self.inodes.changed(node)
        self._opened(node, fd, in_rw)
        if self.ns.layout.file_policy(vpath, in_rw).direct_io:
            return pyfuse3.FileInfo(fh=fd, direct_io=True)  # a lock token, a file composed per open
        return pyfuse3.FileInfo(fh=fd, keep_cache=self.keep_cache)

    def _opened(self, node: Node, fd: int, in_rw: bool) -> None:
        """An open file graftfs served (its handle is the backing descriptor; release closes it)."""
        node.open_fds.add(fd)
        self._files[fd] = (node, in_rw)

    @fuse_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self.files is None:
            data = await self.workers.run_fd(os.pread, fh, size, off)
        else:  # fh is the inode (graftfs.fuse.files)
            node = self._node(fh)
            if node.version is not None:
                if off == 0:  # the kernel fills its pages of this content: someone reads it
                    await self._note_version_read(node)
                data = node.version.content[off:off + size]
            else:
                async with self.files.use(node, write=False) as fd:
                    data = await self.workers.run_fd(os.pread, fd, size, off)
        self.bytes_read += len(data)
        return data

    async def _note_version_read(self, node: Node) -> None:
        """Tell the layout a composed file's content was read (the split-back's ANY_READER);
        a content no longer shown, or a name that cannot be resolved now, tells nothing, and
        the read is served all the same."""
        assert node.version is not None
        try:
            await self.workers.run(self.ns.read_version, self.inodes.path(node.ino), node.version.content,
                                   ANY_READER)
        except OSError as e:
            log.debug("read of inode %d not noted: %s", node.ino, e)

    @fuse_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.files is None:
            self._changing(fh)
            written = await self.workers.run_fd(os.pwrite, fh, buf, off)
            self._changing(fh)  # (before and after: a slow write's event may be read while it runs)
        else:  # fh is the inode (graftfs.fuse.files)
            node = self._node(fh)
            if node.version is not None:
                raise PermissionError(errno.EPERM, "replace this file by renaming a new one over it")
            self.inodes.changed(node)  # (a copy-up by this request, then the write)
            async with self.files.use(node, write=True) as fd:
                written = await self.workers.run_fd(os.pwrite, fd, buf, off)
            self.inodes.changed(node)
        self.bytes_written += written
        return written

    def _changing(self, fh: int) -> None:
        """This open file is being written through the mount (InodeTable.changed)."""
        entry = self._files.get(fh)
        if entry is not None:
            self.inodes.changed(entry[0])

    @fuse_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        sync = os.fdatasync if datasync else os.fsync
        if self.files is None:
            node, in_rw = self._files.get(fh, (None, False))
            if node is None or not (in_rw and self._synced_later(node)):
                await self.workers.run_thread(sync, fh)
            return
        node = self._node(fh)  # fh is the inode (graftfs.fuse.files)
        if node.version is not None or self._synced_later(node):
            return  # composed in memory, or made durable when renamed into place
        # (any descriptor of the file will do: fsync makes the file durable, not the descriptor)
        async with self.files.use(node, write=False) as fd:
            await self.workers.run_thread(sync, fd)

    def _synced_later(self, node: Node) -> bool:
        """Whether the layout makes this RW file durable itself when the runtime renames it into
        place (FilePolicy.synced_by_absorb): the runtime's fsync of it then costs nothing."""
        try:
            vpath = self.inodes.path(node.ino)
        except FileNotFoundError:
            return False
        return self.ns.layout.file_policy(vpath, True).synced_by_absorb

    @fuse_boundary
    async def release(self, fh: int) -> None:
        if self.files is not None:
            return  # a file created through the mount (handle 0): its inode keeps the descriptor
        entry = self._files.pop(fh, None)
        if entry is not None:
            self.inodes.close_fd(entry[0], fh)
        await self.workers.run_fd(os.close, fh)

    # -- directories ------------------------------------------------------------------------

    @fuse_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = DirHandle(node)
        return fh

    @fuse_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        if handle.entries is None or start_id == 0:
            # one snapshot per listing keeps offsets stable while entries come and go; the path
            # is taken now, not at opendir, since the directory may have been renamed since
            handle.generation = self.generation.value
            handle.entries = await self.workers.run(self.ns.listdir, self._path(handle.node.ino))
        for index in range(start_id, len(handle.entries)):
            name, res = handle.entries[index]
            if handle.node.detached:
                break
            node = self._child_node(handle.node, name, res, None)
            entry = self._reply(node, res, handle.generation)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry, index + 1):
                break
            node.lookups += 1
            self._seen(node, res)

    @fuse_boundary
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @fuse_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self._dirs[fh]
        await self.workers.run_thread(self._fsyncdir, self._path(handle.node.ino))

    def _fsyncdir(self, vpath: VPath) -> None:
        self.ns.hides.sync()
        path = self.ns.rw_path(vpath)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return  # nothing of this directory is in RW, so nothing to make durable
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- extended attributes ----------------------------------------------------------------

    @fuse_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        sname = os.fsdecode(name)
        if inode == pyfuse3.ROOT_INODE and sname == STATUS_XATTR:
            return await self._status_json()
        if inode == pyfuse3.ROOT_INODE and sname == PID_XATTR:
            return str(os.getpid()).encode()
        node = self._node(inode)
        if node.detached:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        res = await self.workers.run(self.ns.resolve, self._path(inode))
        if sname in ORIGIN_XATTRS:
            return res.origin.encode()
        try:
            if res.top.path is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return await self.workers.run(os.getxattr, res.top.path, sname, follow_symlinks=False)
        except (pyfuse3.FUSEError, OSError) as e:
            if getattr(e, "errno", None) == pyfuse3.ENOATTR and sname in self.unsupported_xattrs:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP) from None
            raise

    @fuse_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._node(inode)
        if node.detached:
            return []
        res = await self.workers.run(self.ns.resolve, self._path(inode))
        if res.top.path is None:
            return []
        names = await self.workers.run(os.listxattr, res.top.path, follow_symlinks=False)
        return [os.fsencode(n) for n in names]

    @fuse_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        sname = os.fsdecode(name)
        if inode == pyfuse3.ROOT_INODE and sname == UNHIDE_XATTR:
            await self._unhide(value, ctx)
            return
        if sname.startswith(OWN_XATTR_PREFIXES):
            raise pyfuse3.FUSEError(errno.EPERM)
        await self.workers.run_thread(self._setxattr, self._path(inode), sname, value)

    def _setxattr(self, vpath: VPath, name: str, value: bytes) -> None:
        os.setxattr(self.ns.copy_up(vpath), name, value, follow_symlinks=False)

    @fuse_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        sname = os.fsdecode(name)
        if sname.startswith(OWN_XATTR_PREFIXES):
            raise pyfuse3.FUSEError(errno.EPERM)
        await self.workers.run_thread(self._removexattr, self._path(inode), sname)

    def _removexattr(self, vpath: VPath, name: str) -> None:
        res = self.ns.resolve(vpath)
        if res.top.path is None:
            raise OSError(pyfuse3.ENOATTR, "no such attribute")
        os.getxattr(res.top.path, name, follow_symlinks=False)  # ENODATA before any copy-up
        os.removexattr(self.ns.copy_up(vpath), name, follow_symlinks=False)

    async def _unhide(self, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        """``graftfs unhide``: give a shared image this node deleted back to it (root only; the
        value is the user's reference, resolved here against every hidden image)."""
        if ctx.uid != 0:
            raise pyfuse3.FUSEError(errno.EPERM)
        ref = value.decode("utf-8", "replace").strip()
        if not ref or len(ref) > MAX_REF_CHARS:
            raise pyfuse3.FUSEError(errno.EINVAL)
        _, changes = await self.workers.run_thread(self.ns.unhide, ref)
        if changes:
            self.listener.view_changed(changes)

    # -- status -----------------------------------------------------------------------------

    async def _status_json(self) -> bytes:
        info = dict(self.info())
        view = await self.workers.run_thread(self.ns.status)
        info.update(view.as_dict())
        info["inodes"] = len(self.inodes)
        info["open_files"] = len(self._files)
        info["requests"] = {op: {"count": n, "seconds": round(REQUEST_SECONDS[op], 3)} for op, n in REQUESTS.items()}
        info["bytes_read"], info["bytes_written"] = self.bytes_read, self.bytes_written
        info["time"] = time.time()
        data = json.dumps(info, sort_keys=True).encode()
        while len(data) > STATUS_MAX_BYTES:
            # an xattr value is at most 64 KiB: shorten the lists (their *_count fields stay exact)
            lists = [k for k in ("hidden", "hidden_images", "skipped") if isinstance(info.get(k), list) and info[k]]
            if not lists:
                break  # nothing left to shorten; the kernel answers E2BIG rather than loop here
            for key in lists:
                info[key] = info[key][: len(info[key]) // 2]
            data = json.dumps(info, sort_keys=True).encode()
        return data


#: POSIX ACLs: graftfs does not ask the kernel to enforce them (pyfuse3's enable_acl is off).
ACL_XATTRS = frozenset({"system.posix_acl_access", "system.posix_acl_default"})
SELINUX_XATTR = "security.selinux"


def unsupported_xattrs() -> frozenset[str]:
    """Names answered "not supported" (instead of "no such attribute") where an entry lacks them.

    `ls -l` asks for the SELinux label and both ACLs of every file, each a FUSE request (the
    kernel caches neither for a FUSE mount without POSIX ACL support): four requests per entry
    doubled `ls -lR`'s time. coreutils, like libselinux and libacl users, stops asking for a
    filesystem that answers EOPNOTSUPP. ACLs are not enforced through graftfs anyway, and an
    SELinux label only means something on a host with SELinux enabled. A value that exists on
    the backing entry is always returned."""
    names = set(ACL_XATTRS)
    if not os.path.exists("/sys/fs/selinux/enforce"):
        names.add(SELINUX_XATTR)
    return frozenset(names)


def _utime(path_or_fd: str | int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
           current: Callable[[], os.stat_result]) -> None:
    """Set atime and/or mtime, keeping the one not being changed."""
    if fields.update_atime and fields.update_mtime:
        times = (attr.st_atime_ns, attr.st_mtime_ns)
    else:
        st = current()
        times = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                 attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
    if isinstance(path_or_fd, int):
        os.utime(path_or_fd, ns=times)
    else:
        os.utime(path_or_fd, ns=times, follow_symlinks=False)


def _setattr_fd(fd: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> os.stat_result:
    """Attribute changes on a file already removed from the view, through its open fd."""
    if fields.update_uid or fields.update_gid:
        os.fchown(fd, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
    if fields.update_mode:
        os.fchmod(fd, stat.S_IMODE(attr.st_mode))
    if fields.update_size:
        os.ftruncate(fd, attr.st_size)
    if fields.update_atime or fields.update_mtime:
        _utime(fd, attr, fields, lambda: os.fstat(fd))
    return os.fstat(fd)
