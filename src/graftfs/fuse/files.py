"""File I/O by inode number, for a kernel that opens files without asking graftfs.

With a pyfuse3 built by tools/build-pyfuse3, graftfs answers ENOSYS to the first open. From then
on the kernel opens and closes files itself, for the whole mount: no open and no release
request (a third of what a container start costs), and every read, write and fsync names the
inode instead of a file handle. graftfs then keeps one backing file descriptor per inode that
was read or written, opened at the first such request: read-only on the tree the file comes
from, and read-write in RW from its first write on (the copy-up an open for writing made before
now comes with the first write, or with the truncating setattr the kernel sends for O_TRUNC).

The kernel keeps every such file's pages across opens, so each inode's content must only change
through the kernel, as on a local filesystem:

* a file composed in memory (the merged index files) is one immutable content per inode number
  (graftfs.fuse.inodes.FileVersion) and is read from memory;
* a file whose name goes (unlink, a rename over it) while the kernel still holds it keeps its
  descriptor (``hold``), so the processes that have it open keep reading and writing it;
* a descriptor is closed when the kernel forgets the inode, or, beyond ``MAX_IDLE_FDS``, when it
  is the least recently used one of a file still in the view (opened again by path when next
  needed).
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import stat
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pyfuse3

from graftfs.fuse.inodes import InodeTable, Node
from graftfs.fuse.workers import Workers
from graftfs.view.namespace import Namespace, NeedsCopyUp

#: Descriptors kept for files still in the view before the least recently used one is closed.
MAX_IDLE_FDS = 1024


def descriptor_budget() -> int:
    """How many descriptors to keep for files still in the view: MAX_IDLE_FDS, or a quarter of
    the process' limit on open files after raising it as far as it may go (often 1,024 of a
    hard 524,288); the rest serve directories, the watcher and the files whose names went."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if wanted > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
            except (ValueError, OSError):
                pass
    return max(16, min(MAX_IDLE_FDS, soft // 4))


def supported() -> bool:
    """Whether this pyfuse3 hands read, write and fsync the inode when no open gave a handle
    (built by tools/build-pyfuse3); the stock one does not, and graftfs then serves opens."""
    return bool(getattr(pyfuse3, "INODE_IO_WITHOUT_OPEN", False))


@dataclass(eq=False, slots=True)
class _Backing:
    fd: int
    writable: bool
    sig: tuple[int, int, int, int] | None  # the node's attributes as last told when it was opened
    users: int = 0  # requests using the descriptor now (a read in a worker thread)
    retired: bool = False  # replaced or no longer needed: closed once unused

    def close_if_unused(self) -> None:
        if self.retired and self.users == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class InodeFiles:
    """The backing descriptors of the files the kernel opened itself (trio thread only)."""

    def __init__(self, ns: Namespace, workers: Workers, inodes: InodeTable, limit: int | None = None) -> None:
        self.ns = ns
        self.workers = workers
        self.inodes = inodes
        self.limit = descriptor_budget() if limit is None else limit
        self._fds: OrderedDict[int, _Backing] = OrderedDict()  # least recently used first
        self._held: set[int] = set()  # inodes whose name went: the descriptor is the only way left

    def __len__(self) -> int:
        return len(self._fds)

    @asynccontextmanager
    async def use(self, node: Node, write: bool) -> AsyncIterator[int]:
        """The inode's backing descriptor for one request (read-write in RW when ``write``)."""
        backing = await self._backing(node, write)
        backing.users += 1
        try:
            yield backing.fd
        finally:
            backing.users -= 1
            backing.close_if_unused()

    def fd_of(self, ino: int) -> int | None:
        """The descriptor kept for ``ino``, if any (the attributes of a file whose name went)."""
        backing = self._fds.get(ino)
        return backing.fd if backing is not None else None

    def writable_fd_of(self, ino: int) -> int | None:
        backing = self._fds.get(ino)
        return backing.fd if backing is not None and backing.writable else None

    def adopt(self, node: Node, fd: int) -> None:
        """A file created through the mount: its descriptor from create (read-write)."""
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
            rdwr = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)  # the same file, readable too
            os.close(fd)
            fd = rdwr
        self._install(node.ino, _Backing(fd, True, node.sig))
        if node.detached:
            self._held.add(node.ino)  # created where the view shows a link: no path leads to it

    def stale(self, node: Node) -> None:
        """The file behind ``node`` moved to another tree (a copy-up by setattr): open it
        afresh at its next request."""
        backing = self._fds.get(node.ino)
        if backing is not None and not backing.writable:
            self._retire(node.ino)

    async def hold(self, node: Node | None) -> None:
        """``node``'s name is about to go (unlink, a rename over it) while the kernel may have
        the file open: keep a descriptor, writable where the file is the node's own, as the
        kernel's own open files would be on a local filesystem."""
        if node is None or node.lookups == 0 or node.version is not None or node.sig is None \
                or not stat.S_ISREG(node.sig[0]):
            return
        try:
            try:
                await self._backing(node, write=True, copy_up=False)
            except (NeedsCopyUp, OSError):  # a shared file (or EROFS, EPERM): read-only it stays
                await self._backing(node, write=False)
        except OSError:
            if node.ino not in self._fds:
                return  # gone already: nothing to keep
        self._held.add(node.ino)

    def forget(self, ino: int) -> None:
        """The kernel forgot the inode: nothing has it open any more."""
        self._held.discard(ino)
        self._retire(ino)

    async def _backing(self, node: Node, write: bool, copy_up: bool = True) -> _Backing:
        """The descriptor for ``node``: the kept one while it serves (writable when ``write``;
        opened while the node's attributes were the ones told since, else the file may have
        been replaced behind the mount, e.g. by an RW copy made over a shared file), else one
        opened by path (for ``write``, read-write in RW: a copy-up first unless not ``copy_up``)."""
        backing = self._fds.get(node.ino)
        held = node.ino in self._held
        if backing is not None and (backing.writable or not write) and (held or backing.sig == node.sig):
            self._fds.move_to_end(node.ino)
            return backing
        if held:
            # its name went while it was a shared file: there is no copy to make any more
            raise OSError(errno.EROFS, "a shared file removed from the view is never changed")
        vpath = self.inodes.path(node.ino)
        flags = os.O_RDWR if write else os.O_RDONLY
        try:
            fd, _ = await self.workers.run(self.ns.open, vpath, flags, 0, copy_up=False)
        except NeedsCopyUp:
            if not copy_up:
                raise
            fd, _ = await self.workers.run_thread(self.ns.open, vpath, flags, 0)
        current = self._fds.get(node.ino)
        if current is not None and current is not backing and (current.writable or not write) \
                and current.sig == node.sig:
            os.close(fd)  # another request opened it meanwhile
            return current
        opened = _Backing(fd, write, node.sig)
        self._install(node.ino, opened)
        return opened

    def _install(self, ino: int, backing: _Backing) -> None:
        self._retire(ino)
        self._fds[ino] = backing
        while len(self._fds) - len(self._held) > self.limit:
            victim = next((i for i in self._fds if i not in self._held), None)
            if victim is None:
                break
            self._retire(victim)

    def _retire(self, ino: int) -> None:
        backing = self._fds.pop(ino, None)
        if backing is not None:
            backing.retired = True
            backing.close_if_unused()

