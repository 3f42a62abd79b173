"""The merged namespace: a local RW tree over shared RO trees, as one directory tree.

This is the union model, free of FUSE: it maps a *view path* (a tuple of names below the mount
root) to the backing entries that make it up, and carries out changes on the RW tree. The FUSE
adapter (graftfs.fuse.operations) turns inode numbers into view paths and calls these methods in worker
threads, since a backing tree may be a slow or hung network share.

Resolution, like overlayfs: a name resolves in RW first, then in each RO tree in order. A
non-directory on top wins; directories of one name merge until a non-directory breaks the chain.
RO trees contribute only what the layout lets them (complete image entries) and nothing at or
below a path this node has hidden (graftfs.view.hides).

Changes go to RW only: new names are created there (parent directories are copied up first,
keeping their metadata), an RO file opened for writing or changed in its metadata is copied up
first, and deleting or renaming away an RO entry records a hide. The RO trees are never written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import queue
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from graftfs.format.attrs import Attr
from graftfs.format.names import IMAGES, LAYERS, RW_ORIGIN, STATE_DIR, is_id, origin_of
from graftfs.linux import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from graftfs.view.hidden import HiddenImage, hidden_images, match_hidden, unhiding
from graftfs.view.hides import HideStore
from graftfs.view.layout import Layout, ViewChange, VPath
from graftfs.view.small_files import SmallFiles
from graftfs.view.status import HIDDEN_LISTED, RwStatus, ViewStatus

log = logging.getLogger(__name__)

#: Prefix of layer directories being deleted in the private tmp dir.
TRASH_PREFIX = "trash-"


@dataclass(frozen=True, slots=True)
class Source:
    """One backing entry that contributes to a view path."""

    origin: str  # "rw" or "ro:<tree root>"
    attr: Attr
    path: str | None = None  # backing path; None for synthesized entries
    tree: int | None = None  # index of the RO tree; None for RW and synthesized entries
    link_target: str | None = None  # synthesized symlinks only
    content: bytes | None = None  # merged files composed by the layout (e.g. layers.json)
    direct: bool = False  # a layer directory shown as a link to its backing path (link_target)

    @property
    def is_rw(self) -> bool:
        return self.origin == RW_ORIGIN


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a view path is: its sources (top first; several only for merged directories)."""

    vpath: VPath
    sources: tuple[Source, ...]
    ro_visible: bool  # an RO or synthesized entry shows at this path (possibly shadowed by RW)

    @property
    def top(self) -> Source:
        return self.sources[0]

    @property
    def attr(self) -> Attr:
        return self.sources[0].attr

    @property
    def is_dir(self) -> bool:
        return self.sources[0].attr.is_dir

    @property
    def origin(self) -> str:
        return self.sources[0].origin


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _memory_file(content: bytes) -> int:
    """A read-only file descriptor holding ``content`` (for files composed in memory)."""
    fd = os.memfd_create("graftfs-merged", os.MFD_CLOEXEC)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        return fd
    except BaseException:
        os.close(fd)
        raise


class HungTrees:
    """Backing calls in flight on each shared tree, to fail fast on a tree that hangs.

    The kernel sends a pyfuse3 mount's lookups in one directory one at a time (libfuse 3.14
    does not ask for parallel directory operations), so on a hung share N lookups waiting in one
    directory each waited the full ``timeout=`` in turn: the last one N times as long. Once a
    call on a tree has been in flight longer than ``hang_after`` seconds (graftfs' time limit),
    further calls on that tree fail at once with ETIMEDOUT, until the stuck calls return.
    """

    def __init__(self, hang_after: float | None) -> None:
        self.hang_after = hang_after  # None: never fail fast
        self._lock = threading.Lock()
        self._inflight: dict[int, dict[int, float]] = {}  # tree -> {call number: start time}
        self._next = 0

    @contextlib.contextmanager
    def call(self, tree: int, root: str) -> Iterator[None]:
        now = time.monotonic()
        with self._lock:
            calls = self._inflight.setdefault(tree, {})
            oldest = min(calls.values(), default=now)
            if self.hang_after is not None and now - oldest > self.hang_after:
                raise OSError(errno.ETIMEDOUT, f"shared tree {root} has not answered for {now - oldest:.0f} s")
            self._next += 1
            key = self._next
            calls[key] = now
        try:
            yield
        finally:
            with self._lock:
                calls.pop(key, None)


P = ParamSpec("P")
R = TypeVar("R")


class NeedsCopyUp(Exception):
    """Opening this file for writing copies it to RW first (see Namespace.open)."""


class Busy(Exception):
    """Another thread is changing the view (see Namespace.unless_busy)."""


_trash: queue.SimpleQueue[str] = queue.SimpleQueue()
_deleter_lock = threading.Lock()
_deleter: threading.Thread | None = None


def _delete_in_background(path: str) -> None:
    """rmtree in one daemon thread, one tree after the other (a prune of hundreds of layers must
    not start hundreds of threads): a layer may hold gigabytes; what an exit interrupts is left
    in the tmp dir, which the next mount sweeps (Namespace.sweep_tmp)."""
    global _deleter
    _trash.put(path)
    with _deleter_lock:
        if _deleter is None:
            _deleter = threading.Thread(target=_delete_loop, name="graftfs-rmtree", daemon=True)
            _deleter.start()


def _delete_loop() -> None:
    while True:
        shutil.rmtree(_trash.get(), ignore_errors=True)


def opens_for_writing(flags: int) -> bool:
    """Does an open with these flags change the file (copy-up, truncation)?"""
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


def _enoent(vpath: VPath) -> OSError:
    return FileNotFoundError(errno.ENOENT, "no such entry in the view", "/".join(vpath))


class Namespace:
    """The union of one RW tree and the RO trees a layout presents (see module docstring)."""

    def __init__(self, rw_root: str, layout: Layout, hides: HideStore, hang_after: float | None = None,
                 small_files: SmallFiles | None = None) -> None:
        self.rw_root = rw_root
        self.layout = layout
        self.hides = hides
        self.state_dir = os.path.join(rw_root, STATE_DIR)
        self.tmp_dir = os.path.join(self.state_dir, "tmp")
        # Worker threads run namespace operations concurrently. Copy-ups copy data unlocked, but
        # publishing a copy and the remove/hide/rename steps are serialized, so that a copy-up
        # never replaces a newer RW entry or brings back an entry deleted meanwhile.
        self._mutating = threading.RLock()
        #: shared trees with calls stuck past ``hang_after`` seconds (the mount's time limit)
        self.hung = HungTrees(hang_after)
        #: node-local copies of shared images' small files (graftfs.view.small_files)
        self.small_files = small_files

    # -- resolution -------------------------------------------------------------------------

    def rw_path(self, vpath: VPath) -> str:
        return os.path.join(self.rw_root, *vpath)

    @staticmethod
    def is_private(vpath: VPath) -> bool:
        return len(vpath) >= 1 and vpath[0] == STATE_DIR

    def _ro_sources(self, vpath: VPath) -> list[Source]:
        found = []
        for tree, root in enumerate(self.layout.trees):
            path = self.layout.ro_path(tree, vpath)
            if path is None:
                continue
            known = self.layout.known_attr(tree, vpath)
            if known is not None:
                found.append(Source(origin_of(root), known, path, tree))
                continue
            copy = self._cached_copy(tree, vpath)
            if copy is not None:
                found.append(Source(origin_of(root), Attr.from_stat(copy[1]), copy[0], tree))
                continue
            try:
                with self.hung.call(tree, root):
                    st = _lstat(path)
            except OSError:
                # a share that fails (EIO, ENOTCONN from a network filesystem whose server is
                # gone) rather than showing an empty directory: once it is known unavailable it
                # is answered from its last known view, as below; until then the error stands
                if not self.layout.unavailable(tree):
                    raise
                st = None
            if st is not None:
                found.append(Source(origin_of(root), Attr.from_stat(st), path, tree))
                continue
            remembered = self.layout.missing(tree, vpath)  # an unavailable share: last known, or EIO
            if remembered is not None:
                found.append(Source(origin_of(root), remembered, path, tree))
        synth = self.layout.synthetic(vpath)
        if synth is not None:
            found.append(Source(synth.origin, synth.attr, link_target=synth.link_target))
        return found

    def is_direct(self, vpath: VPath) -> bool:
        """True where a directory is shown as a link to its backing directory (see _direct)."""
        return self.layout.direct_path(vpath)

    def resolve(self, vpath: VPath, direct: bool = True) -> Resolved:
        """Resolve a view path; raise FileNotFoundError when nothing shows there.

        With ``direct`` False a layer directory is resolved as the directory it is (mkdir must
        answer with a directory), not as the link the view shows (see _direct)."""
        if self.is_private(vpath):
            raise _enoent(vpath)
        merged = self.layout.merged(vpath, self.hides) if len(vpath) == 2 else None
        if merged is not None:
            # an index file the layout composes from the node's file and the share's records
            return Resolved(vpath, (Source(merged.origin, merged.attr, content=merged.content),), False)
        sources: list[Source] = []
        rw_path = self.rw_path(vpath)
        rw = _lstat(rw_path)
        if rw is not None:
            sources.append(Source(RW_ORIGIN, Attr.from_stat(rw), rw_path))
        ro: list[Source] = []
        if not (vpath and self.hides.covers(vpath)):
            try:
                ro = self._ro_sources(vpath)
            except OSError:
                if not sources or sources[0].attr.is_dir:
                    raise
                # an RW file shadows whatever an unreachable share has here: serve it, and assume
                # something is below (a delete then records a hide, harmless if nothing was)
                return Resolved(vpath, tuple(sources), True)
        for src in ro:
            if not sources or (sources[0].attr.is_dir and src.attr.is_dir):
                sources.append(src)
            elif sources[0].attr.is_dir:
                break  # a non-directory below a directory ends the merge, as in overlayfs
        if not sources:
            raise _enoent(vpath)
        res = Resolved(vpath, tuple(sources), bool(ro))
        if direct and (sources[0].attr.is_dir or stat.S_ISREG(sources[0].attr.mode)) and self.layout.direct_path(vpath):
            return self._direct(res)
        return res

    def _direct(self, res: Resolved) -> Resolved:
        """An entry shown as a symlink to the one backing entry that holds it (where the
        layout says so: layer directories, lock files, the runtime's node-local directories).

        The kernel resolves an overlay mount's lowerdir/upperdir/workdir with symlinks followed,
        so linking each layer's diff/ and work/ to its backing directory puts every read and
        write of a container on the backing filesystem itself, with no FUSE request and no
        Python; what must be merged (index files) still goes through
        graftfs. A path walk through a link costs one readlink request, not open/read/release.
        Only a directory that one tree alone holds is linked: where the node's RW tree and a
        share both hold part of it (a copy-up into a shared layer), or something below it is
        hidden, it stays a merged directory served by graftfs, since a link could show only one
        of the parts. A layer the node holds itself and has published is linked to its RW copy:
        the share's is the same bytes (Layout.own_layer_dir).
        """
        top = res.top
        # several shared trees only while a layer moves between them (a pin): the same bytes in
        # each, so the first is as good as a merge; RW and shared parts must be merged, unless the
        # RW part is the node's own whole copy of a layer it published (the same bytes again)
        merged = len(res.sources) > 1 and any(src.is_rw for src in res.sources)
        if merged and top.is_rw and self.layout.own_layer_dir(res.vpath):
            merged = False
        if top.path is None or merged or (not top.is_rw and self.hides.hides_below(res.vpath)):
            return res
        if not top.is_rw and not self.layout.link_shared(res.vpath):
            return res  # (a layer's whole directory is linked where it is the node's own only)
        a = top.attr
        size = len(os.fsencode(top.path))
        link = Attr(stat.S_IFLNK | 0o777, 1, a.uid, a.gid, size, 0, 0, a.blksize, a.atime_ns, a.mtime_ns, a.ctime_ns)
        source = Source(top.origin, link, None, top.tree, link_target=top.path, direct=True)
        return Resolved(res.vpath, (source,), res.ro_visible)

    def _names_of(self, res: Resolved) -> list[str]:
        """Names in a merged directory, in first-seen order, without duplicates."""
        names: dict[str, None] = {}
        for src in res.sources:
            if src.is_rw:
                assert src.path is not None
                listed = os.listdir(src.path)
                if not res.vpath:
                    listed = [n for n in listed if n != STATE_DIR]
            elif src.tree is not None:
                shown = self.layout.ro_names(src.tree, res.vpath)
                if shown is None:
                    assert src.path is not None
                    with self.hung.call(src.tree, self.layout.trees[src.tree]):
                        shown = os.listdir(src.path)
                listed = shown
            else:
                continue
            names.update(dict.fromkeys(listed))
        names.update(dict.fromkeys(self.layout.synthetic_names(res.vpath)))
        return list(names)

    def _children(self, res: Resolved) -> Iterator[tuple[str, Resolved]]:
        """The visible entries of merged directory ``res``, resolved one by one."""
        for name in self._names_of(res):
            try:
                yield name, self.resolve((*res.vpath, name))
            except FileNotFoundError:
                continue  # hidden, or vanished while listing

    def listdir(self, vpath: VPath) -> list[tuple[str, Resolved]]:
        """A directory's entries with their resolution (for readdirplus)."""
        res = self.resolve(vpath)
        if not res.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", "/".join(vpath))
        plain = self._plain_children(res)
        return plain if plain is not None else list(self._children(res))

    def _plain_children(self, res: Resolved) -> list[tuple[str, Resolved]] | None:
        """The entries of a directory inside a shared entry that one tree alone holds, listed
        with one scandir and an lstat each; None where the general merge is needed.

        Below ``overlay/<id>/`` and ``overlay-images/<id>/`` the layouts show a tree's
        directories as they are, so with no RW part, no other tree and nothing hidden below,
        the merge would resolve every child to that same tree: resolving each name again (an
        RW lstat that fails, the catalog, the hides) made listing a layer's files cost 5x more.
        """
        if len(res.vpath) < 3 or len(res.sources) != 1:
            return None
        src = res.sources[0]
        if src.tree is None or src.path is None or self.hides.hides_below(res.vpath):
            return None
        if self.layout.ro_names(src.tree, res.vpath) is not None or self.layout.synthetic_names(res.vpath):
            return None
        out = []
        try:
            with os.scandir(src.path) as listing:
                for item in listing:
                    try:
                        attr = Attr.from_stat(item.stat(follow_symlinks=False))
                    except FileNotFoundError:
                        continue  # removed while listing
                    source = Source(src.origin, attr, item.path, src.tree)
                    out.append((item.name, Resolved((*res.vpath, item.name), (source,), True)))
        except OSError:
            return None  # e.g. the share went away: the general path knows what to show
        return out

    def _is_empty_dir(self, res: Resolved) -> bool:
        return next(self._children(res), None) is None

    def readlink(self, vpath: VPath) -> str:
        top = self.resolve(vpath).top
        if top.link_target is not None:
            return top.link_target
        if not stat.S_ISLNK(top.attr.mode):
            raise OSError(errno.EINVAL, "not a symlink", "/".join(vpath))
        assert top.path is not None
        return os.readlink(top.path)

    # -- copy-up ----------------------------------------------------------------------------

    def _copy_meta(self, src: Source, dst: str) -> None:
        """Give a fresh RW copy its source's owner, mode, xattrs and times."""
        a = src.attr
        is_link = stat.S_ISLNK(a.mode)
        os.chown(dst, a.uid, a.gid, follow_symlinks=False)
        if not is_link:
            os.chmod(dst, stat.S_IMODE(a.mode))
        if src.path is not None:
            try:
                names = os.listxattr(src.path, follow_symlinks=False)
            except OSError:
                names = []
            for name in names:
                try:
                    value = os.getxattr(src.path, name, follow_symlinks=False)
                    os.setxattr(dst, name, value, follow_symlinks=False)
                except OSError as e:
                    log.debug("copy-up of xattr %s to %s failed: %s", name, dst, e)
        os.utime(dst, ns=(a.atime_ns, a.mtime_ns), follow_symlinks=False)

    def ensure_rw_dir(self, vpath: VPath) -> str:
        """Make sure directory ``vpath`` exists in RW (copying up its chain); return its path."""
        path = self.rw_path(vpath)
        st = _lstat(path)
        if st is not None:
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", "/".join(vpath))
            return path
        self.ensure_rw_dir(vpath[:-1])
        res = self.resolve(vpath)
        if not res.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", "/".join(vpath))
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return path  # another request copied it up first
        self._copy_meta(res.top, path)
        return path

    def copy_up(self, vpath: VPath, with_data: bool = True, quick: bool = False) -> str:
        """Make ``vpath`` an RW entry (files get a full copy unless ``with_data`` is False).
        With ``quick``, an entry not in RW yet raises NeedsCopyUp instead (the caller is on a
        thread that must not copy)."""
        res = self.resolve(vpath)
        if res.top.content is not None:
            raise PermissionError(errno.EPERM, "a merged file is changed by renaming a new one over it",
                                  "/".join(vpath))
        if res.top.direct:
            if res.top.is_rw:
                return self.rw_path(vpath)  # the link stands for the node's own directory
            raise PermissionError(errno.EPERM, "a shared layer directory is never changed", "/".join(vpath))
        if res.top.is_rw:
            assert res.top.path is not None
            return res.top.path
        if quick:
            raise NeedsCopyUp(vpath)
        if res.is_dir:
            return self.ensure_rw_dir(vpath)
        self.ensure_rw_dir(vpath[:-1])
        dst = self.rw_path(vpath)
        os.makedirs(self.tmp_dir, exist_ok=True)
        tmp = os.path.join(self.tmp_dir, f"copyup-{uuid.uuid4().hex}")
        try:
            self._materialize(res.top, tmp, with_data)
            with self._mutating:
                self.resolve(vpath)  # still there (not deleted while we copied)?
                self._publish(tmp, dst)
        finally:
            if _lstat(tmp) is not None:
                os.unlink(tmp)
        return dst

    @staticmethod
    def _publish(tmp: str, dst: str) -> None:
        """Move a finished copy into place unless another copy-up got there first."""
        try:
            renameat2(tmp, dst, RENAME_NOREPLACE)
        except FileExistsError:
            return  # a concurrent copy-up won; its copy (maybe already written to) stays
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            # the RW parent is another mount (e.g. a tmpfs inside a container dir)
            if _lstat(dst) is None:
                shutil.move(tmp, dst)

    def _materialize(self, src: Source, dst: str, with_data: bool) -> None:
        """Create ``dst`` as a copy of non-directory ``src`` (content and metadata)."""
        mode = src.attr.mode
        if stat.S_ISLNK(mode):
            target = src.link_target if src.link_target is not None else os.readlink(src.path or "")
            os.symlink(target, dst)
        elif stat.S_ISREG(mode) and src.content is not None:
            with open(dst, "xb") as f:
                f.write(src.content if with_data else b"")
        elif stat.S_ISREG(mode):
            assert src.path is not None
            if with_data:
                shutil.copyfile(src.path, dst, follow_symlinks=False)
            else:
                os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        else:
            os.mknod(dst, mode, src.attr.rdev)
        self._copy_meta(src, dst)

    # -- creation ---------------------------------------------------------------------------

    def _prepare_new(self, vpath: VPath) -> str:
        """Check that ``vpath`` is free in the view and return its RW path, parents made."""
        if self.is_private(vpath):
            raise PermissionError(errno.EPERM, "name reserved for graftfs state", "/".join(vpath))
        try:
            self.resolve(vpath)
        except FileNotFoundError:
            pass
        else:
            raise FileExistsError(errno.EEXIST, "entry exists", "/".join(vpath))
        self.ensure_rw_dir(vpath[:-1])
        return self.rw_path(vpath)

    def mkdir(self, vpath: VPath, mode: int, uid: int, gid: int) -> Resolved:
        path = self._prepare_new(vpath)
        os.mkdir(path, stat.S_IMODE(mode))
        os.chown(path, uid, gid)
        return self.resolve(vpath, direct=False)

    def mknod(self, vpath: VPath, mode: int, rdev: int, uid: int, gid: int) -> Resolved:
        path = self._prepare_new(vpath)
        os.mknod(path, mode, rdev)
        os.chown(path, uid, gid, follow_symlinks=False)
        return self.resolve(vpath, direct=False)

    def symlink(self, vpath: VPath, target: str, uid: int, gid: int) -> Resolved:
        path = self._prepare_new(vpath)
        os.symlink(target, path)
        os.chown(path, uid, gid, follow_symlinks=False)
        return self.resolve(vpath)

    def create(self, vpath: VPath, mode: int, flags: int, uid: int, gid: int) -> tuple[int, Resolved]:
        """Create and open a new regular file in RW; return (fd, resolution)."""
        path = self._prepare_new(vpath)
        fd = os.open(path, (flags | os.O_CREAT | os.O_EXCL) & ~os.O_APPEND, stat.S_IMODE(mode))
        try:
            os.fchown(fd, uid, gid)
            return fd, self.resolve(vpath, direct=False)
        except BaseException:
            os.close(fd)
            raise

    def link(self, src: VPath, dst: VPath) -> Resolved:
        src_res = self.resolve(src)
        if src_res.is_dir:
            raise PermissionError(errno.EPERM, "hard links to directories are not allowed", "/".join(src))
        src_path = self.copy_up(src)
        os.link(src_path, self._prepare_new(dst), follow_symlinks=False)
        return self.resolve(dst)

    # -- opening ----------------------------------------------------------------------------

    def open(self, vpath: VPath, flags: int, pid: int = 0, copy_up: bool = True) -> tuple[int, bool]:
        """Open a file; writers get an RW copy first. Returns (backing fd, fd is on RW).
        A merged file opens as an in-memory copy of its current content. With ``copy_up``
        False, a writer of a shared file gets NeedsCopyUp instead (the caller is on a thread
        that must not copy a file)."""
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND)
        writing = opens_for_writing(flags)
        res = self.resolve(vpath)
        if res.top.direct and res.top.link_target is not None:
            # the kernel still knows this entry as the file it was created as (see fs.create)
            if writing and not res.top.is_rw:
                raise OSError(errno.EROFS, "a shared entry is never changed", "/".join(vpath))
            return os.open(res.top.link_target, flags), res.top.is_rw
        if res.top.content is not None:
            if writing:
                # the runtime replaces index files by renaming a new file over them, which is split
                # back into this node's records; an in-place write could not be told apart
                raise PermissionError(errno.EPERM, "replace this file by renaming a new one over it", "/".join(vpath))
            self.layout.note_read(vpath, pid)
            return _memory_file(res.top.content), False
        if writing:
            if not copy_up and not res.top.is_rw:
                raise NeedsCopyUp(vpath)
            return os.open(self.copy_up(vpath, with_data=not flags & os.O_TRUNC), flags), True
        if res.top.path is None:
            raise OSError(errno.ELOOP, "cannot open a symlink", "/".join(vpath))
        return os.open(self._local_copy(res) or res.top.path, flags), res.top.is_rw

    def open_version(self, vpath: VPath, content: bytes, pid: int = 0) -> int | None:
        """Open a composed file as ``content`` if that is still what ``vpath`` shows (noting the
        read, as open does); None when it shows something else now. The caller has ``content``
        cached under one inode number and may let the kernel serve it from its pages only
        while an open would read exactly that."""
        return _memory_file(content) if self.read_version(vpath, content, pid) else None

    def read_version(self, vpath: VPath, content: bytes, reader: int) -> bool:
        """Note that ``reader`` (a pid, or ANY_READER) read composed file ``vpath`` as
        ``content``, if that is still what it shows; False when it shows something else now
        (what a runtime read then says nothing about what it will write)."""
        res = self.resolve(vpath)
        if res.top.content != content:
            return False
        self.layout.note_read(vpath, reader)
        return True

    def _cached_copy(self, tree: int, vpath: VPath) -> tuple[str, os.stat_result] | None:
        """The node-local copy of a shared image's small file, when there is one."""
        if self.small_files is None:
            return None
        key = self.layout.cache_key(tree, vpath)
        return self.small_files.get(key) if key is not None else None

    def _local_copy(self, res: Resolved) -> str | None:
        """Make the node-local copy of a shared image's small file as it is first read."""
        top = res.top
        if self.small_files is None or top.is_rw or top.tree is None or self.small_files.holds(top.path):
            return None
        key = self.layout.cache_key(top.tree, res.vpath)
        if key is None or top.path is None:
            return None
        return self.small_files.fill(key, top.path)

    # -- removal and rename -----------------------------------------------------------------

    def unlink(self, vpath: VPath) -> None:
        discard = self.unlink_entry(vpath)
        if discard is not None:
            # outside the lock: moving a layer's directory waits on kernel locks of the RW
            # filesystem (the moved directory's, the cross-directory rename lock) that a process
            # may hold while it waits on a request of ours that needs this lock
            self.discard_rw_dir(discard)

    def unlink_entry(self, vpath: VPath) -> str | None:
        """unlink's change of the view. A layer directory the view showed as a link is not
        removed here: its path is returned, for the caller to move aside with discard_rw_dir
        outside the mutation lock (see unlink)."""
        with self._mutating:
            res = self.resolve(vpath)
            if res.is_dir:
                raise IsADirectoryError(errno.EISDIR, "is a directory", "/".join(vpath))
            if res.ro_visible:
                self.hides.add(vpath)  # first: a crash between the steps must not revive the RO entry
            if res.top.is_rw and res.top.direct:
                return self.rw_path(vpath)
            if res.top.is_rw:
                os.unlink(self.rw_path(vpath))
        return None

    def unless_busy(self, change: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``change(*args)`` if no other thread is changing the view right now, else Busy.

        For the trio thread, which runs quick changes itself when every tree is local (a hop to
        a worker thread costs ten times the change) but must never wait for the mutation lock:
        a worker may hold it through an fsync (a merged file's split) or a copy-up's rename."""
        if not self._mutating.acquire(blocking=False):
            raise Busy
        try:
            return change(*args, **kwargs)
        finally:
            self._mutating.release()

    def discard_rw_dir(self, path: str) -> None:
        """Remove a layer directory the view showed as a link (the runtime unlinks the link):
        moved aside at once, so the request returns quickly, and deleted in the background."""
        os.makedirs(self.tmp_dir, exist_ok=True)
        trash = os.path.join(self.tmp_dir, f"{TRASH_PREFIX}{uuid.uuid4().hex}")
        os.rename(path, trash)
        _delete_in_background(trash)

    def sweep_tmp(self) -> None:
        """Delete what a killed daemon left in the private tmp dir (copy-ups, discarded layers)."""
        try:
            names = os.listdir(self.tmp_dir)
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(self.tmp_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                _delete_in_background(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def rmdir(self, vpath: VPath) -> None:
        with self._mutating:
            res = self.resolve(vpath)
            if not res.is_dir:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", "/".join(vpath))
            if not self._is_empty_dir(res):
                raise OSError(errno.ENOTEMPTY, "directory not empty", "/".join(vpath))
            if res.ro_visible:
                self.hides.add(vpath)
            if res.top.is_rw:
                os.rmdir(self.rw_path(vpath))

    def _try_resolve(self, vpath: VPath) -> Resolved | None:
        try:
            return self.resolve(vpath)
        except FileNotFoundError:
            return None

    @staticmethod
    def _refuse_ro_dir_move(res: Resolved) -> None:
        # Moving a directory that has shared content would need a deep copy; like overlayfs
        # without redirect_dir, answer EXDEV so that mv and friends copy and delete instead.
        if (res.is_dir or res.top.direct) and res.ro_visible:
            raise OSError(errno.EXDEV, "directory with shared content cannot be renamed", "/".join(res.vpath))

    def rename(self, src: VPath, dst: VPath, flags: int = 0, pid: int = 0) -> None:
        """rename(2) over the view, honouring RENAME_NOREPLACE/EXCHANGE/WHITEOUT; ``pid`` is the
        process asking (a merged file's split needs to know what that process read)."""
        with self._mutating:
            self._rename(src, dst, flags, pid)

    def _rename(self, src: VPath, dst: VPath, flags: int, pid: int = 0) -> None:
        if self.is_private(dst) or self.is_private(src):
            raise PermissionError(errno.EPERM, "name reserved for graftfs state", "/".join(dst))
        src_res = self.resolve(src)
        dst_res = self._try_resolve(dst)
        if flags & RENAME_NOREPLACE and dst_res is not None:
            raise FileExistsError(errno.EEXIST, "entry exists", "/".join(dst))
        if dst_res is not None and dst_res.top.content is not None and not flags and src_res.top.is_rw \
                and stat.S_ISREG(src_res.attr.mode):
            # the runtime replaces a merged index file: keep its own records, hide what it dropped
            try:
                self.layout.absorb(dst, self.rw_path(src), self.hides, pid)
                return
            except ValueError as e:
                log.error("%s: kept as written, its records are this node's own", e)
        self._refuse_ro_dir_move(src_res)
        if flags & RENAME_EXCHANGE:
            if dst_res is None:
                raise _enoent(dst)
            self._refuse_ro_dir_move(dst_res)
            renameat2(self.copy_up(src), self.copy_up(dst), flags)
            return
        if dst_res is not None and dst_res.is_dir:
            if not src_res.is_dir:
                raise IsADirectoryError(errno.EISDIR, "is a directory", "/".join(dst))
            if not self._is_empty_dir(dst_res):
                raise OSError(errno.ENOTEMPTY, "directory not empty", "/".join(dst))
        elif dst_res is not None and src_res.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", "/".join(dst))
        src_path = self.copy_up(src)
        self.ensure_rw_dir(dst[:-1])
        renameat2(src_path, self.rw_path(dst), flags)
        if dst_res is not None and dst_res.ro_visible:
            self.hides.add(dst)  # the moved entry replaces the shared one; do not merge them
        if src_res.ro_visible:
            self.hides.add(src)

    # -- metadata ---------------------------------------------------------------------------

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.rw_root)

    # -- hidden shared images ---------------------------------------------------------------

    def hidden_images(self) -> tuple[list[HiddenImage], int]:
        """Shared images this node deleted (graftfs.view.hidden), and its hidden shared layers."""
        live = self.layout.live
        if live is None:
            return [], 0
        return hidden_images(live.catalog, self.hides)

    def unhide(self, ref: str) -> tuple[str, list[ViewChange]]:
        """Give the hidden shared image ``ref`` names back to this node (``graftfs unhide``): its
        id and the view names to re-check. ENOENT when no hidden image matches, ENOTUNIQ when
        several do. Memory and the node's own hides log only (no share is touched), and not
        under the lock of the changing requests, which a call stuck on a share may hold."""
        live = self.layout.live
        found = match_hidden(live.catalog, self.hides, ref) if live is not None else []
        if not found:
            raise FileNotFoundError(errno.ENOENT, "no image hidden on this node matches", ref)
        if len(found) > 1:
            raise OSError(errno.ENOTUNIQ, f"names {len(found)} hidden images", ref)
        assert live is not None
        iid = found[0]
        plan = unhiding(live.catalog, iid, live.local_layers())
        if not self.hides.remove(plan.covers):
            return iid, []
        log.info("image %s given back to this node (graftfs unhide)", iid[:12])
        return iid, self.layout.view_changes(plan.diff)

    # -- status -----------------------------------------------------------------------------

    def status(self) -> ViewStatus:
        """Counts for `graftfs status`: what each origin shows, what is hidden or skipped."""
        layout = self.layout.status()
        layout.ro = [dataclasses.replace(t, layers=self._visible_count(ti, LAYERS),
                                         images=self._visible_count(ti, IMAGES))
                     for ti, t in enumerate(layout.ro)]
        hidden = self.hides.sorted_paths()
        rw = RwStatus(self.rw_root, self._count_rw(LAYERS), self._count_rw(IMAGES))
        cache = self.small_files.status() if self.small_files is not None else None
        images, layers = self.hidden_images()
        return ViewStatus(layout, rw, ["/".join(p) for p in hidden[:HIDDEN_LISTED]], len(hidden), cache,
                          [h.as_dict() for h in images[:HIDDEN_LISTED]], len(images), layers)

    def _count_rw(self, managed: str) -> int:
        try:
            return sum(1 for n in os.listdir(self.rw_path((managed,))) if is_id(n))
        except OSError:
            return 0

    def _visible_count(self, tree: int, managed: str) -> int:
        """Entries of ``managed`` that shared tree ``tree`` shows on this node (its hides left out)."""
        names = self.layout.ro_names(tree, (managed,)) or []
        return sum(1 for n in names if not self.hides.covers((managed, n)))
