"""iSulad's overlay2 driver on a graftfs graph with ``direct`` on: the filesystem calls it makes.

``IsuladDriver`` below makes, in iSulad's order, the calls iSulad's overlay2 graph driver and its
layer store make on a layer (iSulad 2.x): at start-up, the ``l/`` directory, a check of every
``l/`` link (a stat; links that answer ENOENT are unlinked), the storage root's filesystem type
and a bind of ``overlay/`` over itself; creating a layer (mkdir and chmod of its directories, its
``l/`` link, ``link`` and ``lower`` files written under a temporary name and renamed, its record
directory); unpacking a pulled layer through a bind mount of its ``diff``; mounting a container's
overlay with absolute paths, or relative to ``overlay/`` after a chdir when the option string
exceeds a page; unmounting; a layer's size (an lstat walk of ``diff``); removing a layer (a
recursive lstat-and-unlink of its directories).

The tests run them on a real mount with ``--layout isulad -o direct=1``, where each layer's
``diff`` and ``work`` are links to the backing directory, and check that a container's data never
goes through FUSE. Two calls do not hold, and are checked as they behave:

- on any FUSE graph, direct or not, the driver's start-up names the storage root's filesystem
  with statfs(2) from a table that has no entry for FUSE's magic number, and refuses to start
  when it finds no name;
- with direct on, the start-up check of the ``l/`` links, run while the share's mount is gone,
  unlinks the shared layers' ``l/`` links (their stat answers ENOENT through the ``diff`` link
  into the empty mountpoint, where graftfs answers EIO): the reason ``direct`` stays off by
  default in the isulad layout.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import gzip
import io
import json
import os
import secrets
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import GraftMount, Sample, force_unmount, needs_mount, wait_for
from graftfs.linux import MNT_DETACH, MS_BIND, fs_type, umount
from graftfs.node.mounts import find_mount
from graftfs.share.sample import chain, digest, short_name, write_image, write_layer

pytestmark = needs_mount

MountFactory = Callable[..., GraftMount]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MS_REMOUNT, MS_NOEXEC, MS_PRIVATE = 32, 8, 1 << 18
FUSE_SUPER_MAGIC = 0x65735546
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: the modes iSulad gives a layer's directories and files
DIFF_MODE, PRIVATE_DIR_MODE, LINK_FILE_MODE, LOWER_FILE_MODE, RECORD_MODE = 0o755, 0o700, 0o644, 0o666, 0o600
MIB = 1024 * 1024
#: what may still go through FUSE while a container reads or writes MiBs: nothing
DATA_THROUGH_FUSE = 0

#: mount(2) in a child process, after a chdir when asked: util_mount_from's fork and chdir, and a
#: time limit on a call that could wait on the FUSE daemon
MOUNT_CHILD = """
import ctypes, ctypes.util, os, sys
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
if libc.mount(b"overlay", os.fsencode(sys.argv[1]), b"overlay", ctypes.c_ulong(0), os.fsencode(sys.argv[2])) != 0:
    sys.exit(os.strerror(ctypes.get_errno()))
"""

#: archive_unpack's child: chroot into the bind mount of the layer's diff, untar from stdin, and
#: turn the tar's whiteouts into overlay ones (overlay_whiteout_convert_read)
UNPACK_CHILD = """
import os, stat, sys, tarfile
os.chroot(sys.argv[1])
os.chdir("/")
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
    for member in tar:
        parent, name = os.path.split(member.name)
        if name == ".wh..wh..opq":
            os.setxattr(parent or ".", "trusted.overlay.opaque", b"y")
        elif name.startswith(".wh."):
            os.mknod(os.path.join(parent, name[4:]), stat.S_IFCHR | 0o600, 0)
        else:
            tar.extract(member, "/", filter="fully_trusted")
"""


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    src = os.fsencode(source) if source is not None else None
    kind = fstype.encode() if fstype is not None else None
    opts = data.encode() if data is not None else None
    if _libc.mount(src, os.fsencode(target), kind, ctypes.c_ulong(flags), opts) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


_libc.opendir.restype = ctypes.c_void_p
_libc.readdir64.restype = ctypes.POINTER(_Dirent)
_libc.readdir64.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]


def dirent_types(path: str) -> dict[str, int]:
    """readdir(3)'s d_type of each entry (util_support_d_type wants none DT_UNKNOWN)."""
    handle = _libc.opendir(os.fsencode(path))
    if not handle:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    out: dict[str, int] = {}
    try:
        while True:
            entry = _libc.readdir64(handle)
            if not entry:
                return out
            out[entry.contents.d_name.decode()] = entry.contents.d_type
    finally:
        _libc.closedir(handle)


@dataclass
class IsuladDriver:
    """iSulad's overlay2 driver and layer store on the graph ``root`` (iSulad's storage root, the
    graftfs mountpoint), call by call (see the module docstring for where each one is read).

    ``run_dir`` is iSulad's run root (layers' mountpoint.json), ``tmp_dir`` its ISULAD_TMPDIR
    (archive_unpack's bind mounts); neither is on the graph. Every mount made is noted and
    removed by ``teardown``, newest first, also when a test failed half-way."""

    root: str
    run_dir: str
    tmp_dir: str
    mounts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what iSulad logs and goes on
    small_bytes: int = 0  # bytes of the graph's small files (link, lower, records) read or written

    @property
    def home(self) -> str:
        return os.path.join(self.root, "overlay")

    @property
    def layer_records(self) -> str:
        return os.path.join(self.root, "overlay-layers")

    def layer_dir(self, lid: str) -> str:
        return os.path.join(self.home, lid)

    # -- src/utils/cutils ---------------------------------------------------------------------

    @staticmethod
    def mkdir_p(path: str, mode: int) -> None:
        """util_mkdir_p: mkdir(2) of every prefix (EEXIST is fine if stat says directory), then
        chmod(2) of the path (both follow a link at the end)."""
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/" + "/".join(parts[:i])
            try:
                os.mkdir(prefix, mode)
            except FileExistsError:
                if not os.path.isdir(prefix):
                    raise
        os.chmod(path, mode)

    def atomic_write(self, path: str, content: bytes, mode: int) -> None:
        """util_atomic_write_file: a ``.tmp-<name>-<random>`` file beside it, renamed over it."""
        self.small_bytes += len(content)
        tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}-{secrets.token_hex(5)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
        os.rename(tmp, path)

    def read_text(self, path: str) -> str | None:
        """util_read_text_file (fopen, seek to the end for the size, read); None where it fails."""
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(0)
                data = f.read(size)
        except OSError:
            return None
        self.small_bytes += len(data)
        return data.decode()

    def path_remove(self, path: str) -> None:
        """util_path_remove: unlink(2), else rmdir(2); a missing path is fine. Its callers log a
        failure and go on (noted in ``warnings``)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as e:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                return
            except OSError:
                self.warnings.append(f"remove {path}: {e.strerror}")

    def recursive_rmdir(self, path: str) -> None:
        """util_recursive_rmdir: stat(2) says directory, then readdir with an lstat(2) of each
        entry: directories recursively, everything else (a link too) unlink(2)ed, then rmdir(2).
        iSulad falls back to ``rm -rf`` when a call fails; here the failure is the test's."""
        if not os.path.isdir(path):
            return
        with os.scandir(path) as listing:  # readdir interleaved with the removals, as iSulad does
            for entry in listing:
                st = os.lstat(entry.path)
                if stat.S_ISDIR(st.st_mode):
                    self.recursive_rmdir(entry.path)
                else:
                    os.unlink(entry.path)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(path)

    def dir_size(self, path: str) -> tuple[int, int]:
        """util_calculate_dir_size: (bytes, inodes) from an lstat(2) of the directory itself and
        of everything below it, after a stat(2) that it is a directory."""
        if not os.path.isdir(path):
            return 0, 0
        size, inodes = os.lstat(path).st_size, 1
        with os.scandir(path) as listing:
            for entry in listing:
                st = os.lstat(entry.path)
                if stat.S_ISDIR(st.st_mode):
                    sub = self.dir_size(entry.path)
                    size, inodes = size + sub[0], inodes + sub[1]
                else:
                    size, inodes = size + st.st_size, inodes + 1
        return size, inodes

    def _note_mount(self, target: str) -> None:
        self.mounts.append(target)

    # -- overlay2_init ------------------------------------------------------------------------

    def init(self) -> int:
        """overlay2_init: ``overlay/l`` made (mode 0700), links in it that lead nowhere removed,
        the graph's filesystem named by statfs(2) of the storage root, d_type checked in
        ``overlay/``, and ``overlay/`` bind-mounted on itself and made private. Returns the
        storage root's f_type (iSulad's overlay2_init stops when util_get_fs_name has no name
        for it)."""
        links = os.path.join(self.home, "l")
        self.mkdir_p(links, PRIVATE_DIR_MODE)
        with os.scandir(links) as listing:  # rm_invalid_symlink
            for entry in listing:
                try:
                    os.stat(entry.path)
                except FileNotFoundError:
                    self.warnings.append(f"removed invalid link {entry.name}")
                    self.path_remove(entry.path)
                except OSError as e:
                    self.warnings.append(f"evaluate link {entry.name}: {e.strerror}")  # logged, kept
        magic = fs_type(os.path.dirname(self.home))
        assert magic is not None
        unknown = [name for name, kind in dirent_types(self.home).items() if kind == 0]
        assert not unknown, f"readdir gave DT_UNKNOWN for {unknown}: iSulad refuses the graph"
        # util_ensure_mounted_as(home, "private")
        if find_mount(self.home) is None:
            _mount(self.home, self.home, "none", MS_BIND, "")
            self._note_mount(self.home)
        _mount("", self.home, "", MS_PRIVATE, "")
        return magic

    def clean_up(self) -> None:
        """overlay2_clean_up: umount(2) of ``overlay/``."""
        umount(self.home)
        self.mounts.remove(self.home)

    # -- layer_store_create -------------------------------------------------------------------

    def create_layer(self, lid: str, parent: str | None, *, writable: bool, diff: bytes | None = None) -> str:
        """layer_store_create: the driver's layer (overlay2_create_rw / _ro), its record
        directory and layer.json (incomplete), the layer's tar applied (image layers), the
        driver's metadata for the mount point, layer.json again. Returns the link id."""
        link = self._driver_create(lid, parent)
        records = os.path.join(self.layer_records, lid)
        self.mkdir_p(records, PRIVATE_DIR_MODE)  # build_layer_dir
        record = {"id": lid, "parent": parent or "", "writable": writable, "incompelte": True}
        self.atomic_write(os.path.join(records, "layer.json"), json.dumps(record).encode(), RECORD_MODE)
        if diff is not None:
            self.apply_diff(lid, diff)
            self._tar_split(lid, diff)
        self.metadata(lid)  # update_mount_point
        record["incompelte"] = False
        self.atomic_write(os.path.join(records, "layer.json"), json.dumps(record).encode(), RECORD_MODE)
        return link

    def _driver_create(self, lid: str, parent: str | None) -> str:
        """do_create: the layer directory (0700; a quota only on xfs/ext4 graphs, never on FUSE),
        then mk_sub_directories: diff (0755), a random link name and its ``l/`` link, the link
        file, work and merged (0700), and ``empty`` (no parent) or the lower file (the parent's
        link, then the parent's lower)."""
        if parent is not None:
            assert os.path.isdir(self.layer_dir(parent)), f"parent layer {parent} does not exist"  # check_parent_valid
        layer_dir = self.layer_dir(lid)
        self.mkdir_p(layer_dir, PRIVATE_DIR_MODE)
        self.mkdir_p(os.path.join(layer_dir, "diff"), DIFF_MODE)
        link = secrets.token_hex(13)  # util_generate_random_str(26): hex
        os.symlink(f"../{lid}/diff", os.path.join(self.home, "l", link))
        self.atomic_write(os.path.join(layer_dir, "link"), link.encode(), LINK_FILE_MODE)
        self.mkdir_p(os.path.join(layer_dir, "work"), PRIVATE_DIR_MODE)
        self.mkdir_p(os.path.join(layer_dir, "merged"), PRIVATE_DIR_MODE)
        if parent is None:
            self.mkdir_p(os.path.join(layer_dir, "empty"), PRIVATE_DIR_MODE)
        else:
            parent_link = self.read_text(os.path.join(self.layer_dir(parent), "link"))
            assert parent_link, f"parent layer {parent} has no link file"
            parent_lower = self.read_text(os.path.join(self.layer_dir(parent), "lower"))
            lower = f"l/{parent_link}" + (f":{parent_lower}" if parent_lower else "")
            assert lower.count(":") < 128, "iSulad's maximum depth"
            self.atomic_write(os.path.join(layer_dir, "lower"), lower.encode(), LOWER_FILE_MODE)
        return link

    def apply_diff(self, lid: str, tar: bytes) -> None:
        """overlay2_apply_diff -> archive_unpack: stat(2) of diff, a temporary directory in
        ISULAD_TMPDIR given diff's mode, diff bind-mounted there (noexec, private), a child
        that chroots into it and untars, then umount(2) and rmdir(2)."""
        diff = os.path.join(self.layer_dir(lid), "diff")
        st = os.stat(diff)
        base = os.path.join(self.tmp_dir, "isulad_tmpdir")
        self.mkdir_p(base, PRIVATE_DIR_MODE)
        safe = tempfile.mkdtemp(prefix="tar-chroot-", dir=base)
        self.mkdir_p(safe, stat.S_IMODE(st.st_mode))
        _mount(diff, safe, "none", MS_BIND)
        self._note_mount(safe)
        try:
            _mount(safe, safe, "none", MS_BIND | MS_REMOUNT | MS_NOEXEC)
            _mount("", safe, "", MS_PRIVATE, "")
            res = subprocess.run([sys.executable, "-c", UNPACK_CHILD, safe], input=tar, capture_output=True,
                                 timeout=60)
            assert res.returncode == 0, res.stderr.decode(errors="replace")
        finally:
            umount(safe)
            self.mounts.remove(safe)
            self.path_remove(safe)

    def _tar_split(self, lid: str, tar: bytes) -> None:
        """make_tar_split_file: ``<id>.tar-split`` created (0600) and written, gzipped into
        ``<id>.tar-split.gz``, removed."""
        plain = os.path.join(self.layer_records, lid, f"{lid}.tar-split")
        os.close(os.open(plain, os.O_WRONLY | os.O_CREAT, RECORD_MODE))
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            entries = [json.dumps({"type": 1, "name": m.name, "size": m.size}) for m in t.getmembers()]
        content = ("\n".join(entries) + "\n").encode()
        Path(plain).write_bytes(content)
        with open(plain, "rb") as src, gzip.open(plain + ".gz", "wb") as dst:
            dst.write(src.read())
        self.small_bytes += 2 * len(content) + os.path.getsize(plain + ".gz")
        self.path_remove(plain)

    def metadata(self, lid: str) -> dict[str, str]:
        """overlay2_get_layer_metadata: the layer's paths, and each lower checked with stat(2)."""
        layer_dir = self.layer_dir(lid)
        out = {"WorkDir": f"{layer_dir}/work", "MergedDir": f"{layer_dir}/merged", "UpperDir": f"{layer_dir}/diff"}
        lowers = self._lowers(layer_dir)
        for lower in lowers:
            path = os.path.join(self.home, lower)
            assert os.path.isdir(path), f"can't stat absolute layer {path}"  # get_lower_dirs
        if lowers:
            out["LowerDir"] = ":".join(os.path.join(self.home, lower) for lower in lowers)
        return out

    def _lowers(self, layer_dir: str) -> list[str]:
        """read_layer_lower_file: the lower file, if stat(2) finds it, split at ':'."""
        path = os.path.join(layer_dir, "lower")
        if not os.path.exists(path):
            return []
        return [p for p in (self.read_text(path) or "").split(":") if p]

    # -- mounting -----------------------------------------------------------------------------

    def mount_data(self, lid: str) -> tuple[str, str]:
        """generate_mount_opt_data: the absolute and the relative option strings."""
        layer_dir = self.layer_dir(lid)
        lowers = self._lowers(layer_dir)
        absolute, relative = [], []
        for lower in lowers:
            path = os.path.join(self.home, lower)
            assert os.path.isdir(path), f"can't stat absolute layer {path}"  # append_abs_lower_path
            absolute.append(path)
            relative.append(lower)
        if not absolute:
            empty = os.path.join(layer_dir, "empty")
            assert os.path.isdir(empty)
            absolute, relative = [empty], [f"{lid}/empty"]
        abs_data = f"lowerdir={':'.join(absolute)},upperdir={layer_dir}/diff,workdir={layer_dir}/work"
        rel_data = f"lowerdir={':'.join(relative)},upperdir={lid}/diff,workdir={lid}/work"
        return abs_data, rel_data

    def mount(self, lid: str) -> tuple[str, bool]:
        """overlay2_mount_layer: stat(2) that the layer is a directory, the option strings, and
        mount(2) of ``merged`` with the absolute one, or, when that exceeds a page, with the
        relative one from a child that did chdir(2) into ``overlay/`` (util_mount_from).
        Returns the merged directory and whether the relative form was used."""
        layer_dir = self.layer_dir(lid)
        assert os.path.isdir(layer_dir), f"layer dir {layer_dir} does not exist"
        abs_data, rel_data = self.mount_data(lid)
        merged = os.path.join(layer_dir, "merged")
        relative = len(abs_data) > PAGE_SIZE
        if relative:
            assert len(rel_data) <= PAGE_SIZE, "iSulad: cannot mount layer, mount label too large"
            target, data, cwd = f"{lid}/merged", rel_data, self.home
        elif find_mount(merged) is not None:  # util_mount: util_detect_mounted
            return merged, False
        else:
            target, data, cwd = merged, abs_data, None
        self._note_mount(merged)
        res = subprocess.run([sys.executable, "-c", MOUNT_CHILD, target, data], cwd=cwd, capture_output=True,
                             text=True, timeout=30)
        if res.returncode != 0:
            self.mounts.remove(merged)
            dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout.splitlines()[-5:]
            raise AssertionError(f"overlay mount of {lid} failed: {res.stderr.strip()}; dmesg: {dmesg}")
        return merged, relative

    def umount(self, lid: str) -> None:
        """overlay2_umount_layer: stat(2) that the layer is a directory, umount2(2) of merged with
        MNT_DETACH; EINVAL (not mounted) is ignored, other errors logged."""
        layer_dir = self.layer_dir(lid)
        if not os.path.isdir(layer_dir):
            return
        merged = os.path.join(layer_dir, "merged")
        try:
            umount(merged, MNT_DETACH)
        except OSError as e:
            if e.errno != errno.EINVAL:
                self.warnings.append(f"umount {merged}: {e.strerror}")
        if merged in self.mounts:
            self.mounts.remove(merged)

    # -- removing, checking, measuring ----------------------------------------------------------

    def delete_layer(self, lid: str) -> None:
        """do_delete_layer: umount (forced), the mount point record (run dir) and the tar-split
        removed, overlay2_rm_layer (the ``l/`` link named by the link file unlink(2)ed, the
        layer's directory removed recursively), then the record directory removed recursively."""
        self.umount(lid)
        self.path_remove(os.path.join(self.run_dir, f"{lid}.json"))
        self.path_remove(os.path.join(self.layer_records, lid, f"{lid}.tar-split.gz"))
        self.rm_layer(lid)

    def rm_layer(self, lid: str) -> None:
        """overlay2_rm_layer, then layer_store_remove_layer (also what layer_store_create does
        when a step failed)."""
        layer_dir = self.layer_dir(lid)
        link = self.read_text(os.path.join(layer_dir, "link"))
        if link:
            self.path_remove(os.path.join(self.home, "l", link))
        self.recursive_rmdir(layer_dir)
        self.recursive_rmdir(os.path.join(self.layer_records, lid))

    def layer_exists(self, lid: str) -> bool:
        """overlay2_layer_exists: the layer a directory, its link file read, ``l/`` a directory,
        stat(2) of its link (made again with symlink(2) when it leads nowhere)."""
        layer_dir = self.layer_dir(lid)
        if not os.path.isdir(layer_dir):
            return False
        link = self.read_text(os.path.join(layer_dir, "link"))
        if not link or not os.path.isdir(os.path.join(self.home, "l")):
            return False
        path = os.path.join(self.home, "l", link)
        try:
            os.stat(path)
        except OSError:
            self.warnings.append(f"link {link} of {lid} made again")
            self.path_remove(path)
            os.symlink(f"../{lid}/diff", path)
        return True

    def fs_info(self, lid: str) -> tuple[int, int]:
        """overlay2_get_layer_fs_info: util_calculate_dir_size of the layer's diff."""
        assert os.path.isdir(self.layer_dir(lid))
        return self.dir_size(os.path.join(self.layer_dir(lid), "diff"))

    def teardown(self) -> None:
        """Every mount this driver made, newest first, lazily where busy."""
        while self.mounts:
            force_unmount(self.mounts.pop())


@dataclass
class Node:
    """A graftfs isulad mount with direct on, and iSulad's driver on it."""

    g: GraftMount
    sample: Sample
    driver: IsuladDriver

    def fuse_bytes(self) -> tuple[int, int]:
        st = self.g.status()
        return int(st["bytes_read"]), int(st["bytes_written"])  # type: ignore[call-overload]

    def rw(self, *parts: str) -> Path:
        return Path(self.sample.rw, *parts)


@pytest.fixture
def isulad_node(sample: Sample, mount_factory: MountFactory, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Mount the sample (after the test changed the share, if it does) with ``-o direct=1`` (or
    ``direct=0``); every mount iSulad's driver made is removed at teardown, before the graftfs
    mount is stopped."""
    drivers: list[IsuladDriver] = []

    def start(direct: str = "1") -> Node:
        g = mount_factory(sample.rw, [sample.share_ro], "--layout", "isulad", "-o", f"direct={direct}")
        driver = IsuladDriver(g.mnt, str(tmp_path / "isulad-run"), str(tmp_path / "isulad-tmp"))
        os.makedirs(driver.run_dir, exist_ok=True)
        drivers.append(driver)
        return Node(g, sample, driver)

    try:
        yield start
    finally:
        for driver in drivers:
            driver.teardown()


def layer_tar(files: dict[str, bytes], opaque: tuple[str, ...] = (), whiteouts: tuple[str, ...] = ()) -> bytes:
    """An image layer's tar: files, ``.wh..wh..opq`` in opaque directories, ``.wh.<name>`` whiteouts."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        names = {**files, **{f"{d}/.wh..wh..opq": b"" for d in opaque}}
        names.update({f"{os.path.dirname(w)}/.wh.{os.path.basename(w)}".lstrip("/"): b"" for w in whiteouts})
        dirs = sorted({os.path.dirname(n) for n in names} - {""})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in names.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def in_container(merged: str, big: str, size: int) -> None:
    """What a container does in its rootfs: read a big image file, write and fsync one, change,
    delete and rename image files."""
    with open(os.path.join(merged, big), "rb") as f:
        while f.read(MIB):
            pass
    block = os.urandom(MIB)
    with open(os.path.join(merged, "written.bin"), "wb") as f:
        for _ in range(size // MIB):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    Path(merged, "app", "data.txt").write_text("changed in the container\n")  # copy-up of a shared file
    os.unlink(os.path.join(merged, "bin", "hello"))  # a whiteout
    os.rename(os.path.join(merged, "etc", "os-release"), os.path.join(merged, "etc", "os-release.bak"))
    os.sync()


def test_driver_init_on_the_graph(isulad_node: Callable[..., Node]) -> None:
    """overlay2_init's calls: ``l/`` made, its links all lead somewhere (none removed), d_type
    known, ``overlay/`` bind-mounted private and unmounted at clean-up. The graph's f_type is
    FUSE's, which iSulad's util_get_fs_name cannot name: stock iSulad stops there on any FUSE
    graph (direct or not), see the module docstring."""
    node = isulad_node()
    d = node.driver
    links_before = sorted(os.listdir(os.path.join(d.home, "l")))
    assert fs_type(node.g.mnt) == FUSE_SUPER_MAGIC
    assert d.init() == FUSE_SUPER_MAGIC
    assert d.warnings == []
    assert sorted(os.listdir(os.path.join(d.home, "l"))) == links_before
    assert stat.S_IMODE(os.stat(os.path.join(d.home, "l")).st_mode) == PRIVATE_DIR_MODE
    assert find_mount(d.home) is not None
    # through the private bind, a shared layer's diff is a link to the share
    ids = node.sample.ids
    assert os.readlink(os.path.join(d.home, ids.app, "diff")) == os.path.join(node.sample.share_ro, "overlay",
                                                                             ids.app, "diff")
    assert d.layer_exists(ids.app) and d.layer_exists(ids.local) and d.warnings == []
    d.clean_up()
    assert find_mount(d.home) is None


def test_container_mounted_with_absolute_paths(isulad_node: Callable[..., Node], sample: Sample) -> None:
    """A container on a shared image: created, mounted with absolute paths (``l/<link>`` lowers,
    ``<id>/diff`` upper), read from and written to with nothing through FUSE, unmounted and
    removed as iSulad does: the node's own layer directory is deleted from RW."""
    ids = sample.ids
    big = os.urandom(16 * MIB)
    Path(sample.share, "overlay", ids.app, "diff", "big.bin").write_bytes(big)
    node = isulad_node()
    d = node.driver
    d.init()
    cid = digest("container:abs")
    link = d.create_layer(cid, ids.app, writable=True)
    # what the node holds: RW directories behind the links the view shows
    for sub in ("diff", "work"):
        assert os.readlink(os.path.join(d.layer_dir(cid), sub)) == str(node.rw("overlay", cid, sub))
        assert node.rw("overlay", cid, sub).is_dir()
    assert stat.S_IMODE(node.rw("overlay", cid, "diff").stat().st_mode) == DIFF_MODE
    assert stat.S_IMODE(node.rw("overlay", cid, "work").stat().st_mode) == PRIVATE_DIR_MODE
    assert node.rw("overlay", cid, "merged").is_dir()
    assert node.rw("overlay", cid, "lower").read_text() == f"l/{short_name(ids.app)}:l/{short_name(ids.base)}"
    assert os.readlink(node.rw("overlay", "l", link)) == f"../{cid}/diff"
    abs_data, _ = d.mount_data(cid)
    assert abs_data == (f"lowerdir={d.home}/l/{short_name(ids.app)}:{d.home}/l/{short_name(ids.base)},"
                        f"upperdir={d.home}/{cid}/diff,workdir={d.home}/{cid}/work")
    before = node.fuse_bytes()
    merged, relative = d.mount(cid)
    assert not relative
    assert Path(merged, "etc", "os-release").read_text() == "NAME=demo\n"
    in_container(merged, "big.bin", 16 * MIB)
    assert Path(merged, "big.bin").read_bytes() == big
    after = node.fuse_bytes()
    assert (after[0] - before[0], after[1] - before[1]) == (DATA_THROUGH_FUSE, DATA_THROUGH_FUSE)
    # the container's writes are in the node's RW tree, the share is as it was
    upper = node.rw("overlay", cid, "diff")
    assert (upper / "written.bin").stat().st_size == 16 * MIB
    assert (upper / "app" / "data.txt").read_text() == "changed in the container\n"
    wh = os.lstat(upper / "bin" / "hello")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert Path(sample.share, "overlay", ids.app, "diff", "app", "data.txt").read_text() == "application data\n"
    # the layer's size as iSulad reports it: its diff's own lstat is the link's (its target's
    # length, not the directory's), the rest is the backing tree's
    size, inodes = d.fs_info(cid)
    backing_size, backing_inodes = d.dir_size(str(upper))
    assert inodes == backing_inodes and size >= 16 * MIB
    assert size == backing_size - upper.stat().st_size + len(str(upper))
    d.umount(cid)
    assert find_mount(merged) is None
    d.delete_layer(cid)
    assert d.warnings == []
    assert not node.rw("overlay", cid).exists() and not node.rw("overlay-layers", cid).exists()
    assert not os.path.lexists(node.rw("overlay", "l", link))
    assert cid not in os.listdir(d.home) and cid not in os.listdir(d.layer_records)
    assert node.g.status()["hidden_count"] == 0  # nothing of the share was hidden
    trash = node.rw(".graftfs", "tmp")
    wait_for(lambda: not trash.exists() or not any(trash.iterdir()), 30, "the deleted layer to be gone")
    d.clean_up()


def test_container_mounted_relative_after_chdir(isulad_node: Callable[..., Node], sample: Sample) -> None:
    """An image deep enough that the absolute option string exceeds a page: iSulad mounts with
    ``l/<link>`` lowers and ``<id>/diff`` upper relative to ``overlay/``, from a child that did
    chdir(2) there. The kernel resolves them through the view's links to the backing trees."""
    node_home_len = len(str(sample.root / "mnt" / "overlay"))
    count = PAGE_SIZE // (node_home_len + len("/l/") + 27) + 2
    layers = chain("deep", count, parent=sample.ids.base)
    lowers: list[str] = [f"l/{short_name(sample.ids.base)}"]
    for layer in layers:
        write_layer(sample.share, layer)
        Path(sample.share, "overlay", layer.id, "lower").write_text(":".join(lowers))
        lowers.insert(0, f"l/{short_name(layer.id)}")
    Path(sample.share, "overlay", layers[-1].id, "diff", "big.bin").write_bytes(os.urandom(8 * MIB))
    Path(sample.share, "overlay", layers[0].id, "diff", "app").mkdir()
    Path(sample.share, "overlay", layers[0].id, "diff", "app", "data.txt").write_text("deep\n")
    write_image(sample.share, digest("image:deep"), layers[-1].id, ["deep:1"])
    node = isulad_node()
    d = node.driver
    d.init()
    cid = digest("container:deep")
    d.create_layer(cid, layers[-1].id, writable=True)
    abs_data, rel_data = d.mount_data(cid)
    assert len(abs_data) > PAGE_SIZE >= len(rel_data)
    assert rel_data.endswith(f",upperdir={cid}/diff,workdir={cid}/work")
    assert rel_data.startswith(f"lowerdir=l/{short_name(layers[-1].id)}:")
    before = node.fuse_bytes()
    merged, relative = d.mount(cid)
    assert relative
    assert Path(merged, "deep", "0.txt").read_text() == "deep 0\n" * 16  # the lowest of the chain
    assert Path(merged, "deep", f"{count - 1}.txt").exists()
    in_container(merged, "big.bin", 8 * MIB)
    after = node.fuse_bytes()
    assert (after[0] - before[0], after[1] - before[1]) == (DATA_THROUGH_FUSE, DATA_THROUGH_FUSE)
    assert node.rw("overlay", cid, "diff", "written.bin").stat().st_size == 8 * MIB
    assert node.rw("overlay", cid, "diff", "app", "data.txt").read_text() == "changed in the container\n"
    d.umount(cid)
    d.delete_layer(cid)
    assert d.warnings == []
    assert not node.rw("overlay", cid).exists()
    d.clean_up()


def test_image_layer_pulled_and_populated(isulad_node: Callable[..., Node], sample: Sample) -> None:
    """A new image layer as iSulad pulls it: created read-only on a shared parent, its tar
    unpacked through a bind mount of its ``diff`` (the view's link: the bind is of the RW
    directory), whiteouts and opaque directories in overlay's form; nothing through FUSE. A
    container on it sees the layer over the shared one."""
    ids = sample.ids
    payload = os.urandom(8 * MIB)
    tar = layer_tar({"opt/pulled.bin": payload, "etc/motd": b"pulled\n", "app/new.txt": b"new\n"},
                    opaque=("app",), whiteouts=("bin/hello",))
    node = isulad_node()
    d = node.driver
    d.init()
    lid = digest("layer:pulled")
    before, d.small_bytes = node.fuse_bytes(), 0
    link = d.create_layer(lid, ids.base, writable=False, diff=tar)
    after = node.fuse_bytes()
    # through FUSE: the layer's link, lower and records, not one byte of its files
    assert after[0] - before[0] + after[1] - before[1] <= d.small_bytes < 64 * 1024
    diff = node.rw("overlay", lid, "diff")
    assert (diff / "opt" / "pulled.bin").read_bytes() == payload
    wh = os.lstat(diff / "bin" / "hello")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(diff / "app", "trusted.overlay.opaque") == b"y"
    assert node.rw("overlay-layers", lid, f"{lid}.tar-split.gz").exists()
    assert not node.rw("overlay-layers", lid, f"{lid}.tar-split").exists()
    assert node.rw("overlay", lid, "lower").read_text() == f"l/{short_name(ids.base)}"
    assert d.layer_exists(lid) and d.warnings == []
    assert os.readlink(os.path.join(d.home, "l", link)) == f"../{lid}/diff"
    size, inodes = d.fs_info(lid)
    assert size >= 8 * MIB and inodes >= 8
    # a container on the new layer
    cid = digest("container:on-pulled")
    d.create_layer(cid, lid, writable=True)
    before = node.fuse_bytes()
    merged, _ = d.mount(cid)
    assert Path(merged, "opt", "pulled.bin").read_bytes() == payload
    assert Path(merged, "etc", "os-release").read_text() == "NAME=demo\n"  # from the shared base
    assert not Path(merged, "bin", "hello").exists()
    assert sorted(os.listdir(Path(merged, "app"))) == ["new.txt"]
    after = node.fuse_bytes()
    assert (after[0] - before[0], after[1] - before[1]) == (DATA_THROUGH_FUSE, DATA_THROUGH_FUSE)
    d.umount(cid)
    d.delete_layer(cid)
    d.delete_layer(lid)  # the image removed again: the node's own layer is deleted
    assert d.warnings == []
    assert not node.rw("overlay", lid).exists() and not node.rw("overlay-layers", lid).exists()
    d.clean_up()


@pytest.mark.parametrize("direct", ["0", "1"])
def test_share_out_of_reach_when_isulad_starts(isulad_node: Callable[..., Node], sample: Sample, direct: str) -> None:
    """iSulad started while the share's mount is gone (an empty directory in its place): its
    overlay2_init stat()s every ``l/`` link and unlinks those that answer ENOENT
    (rm_invalid_symlink). With ``direct=0`` a shared layer's link answers EIO (graftfs serves the
    unreachable share's last known view) and is kept. With ``direct=1`` the stat follows the
    layer's ``diff`` link into the empty directory, answers ENOENT, and the unlink hides the link
    on this node: after the share is back, a container on that image does not mount until
    iSulad starts again and overlay2_layer_exists makes the link anew. This is the call that
    keeps ``direct`` off by default in the isulad layout."""
    ids = sample.ids
    node = isulad_node(direct)
    d = node.driver
    d.init()
    first = digest("container:before")
    d.create_layer(first, ids.app, writable=True)
    merged, _ = d.mount(first)
    assert Path(merged, "app", "data.txt").read_text() == "application data\n"
    d.umount(first)
    d.clean_up()  # iSulad stops
    shared_links = {short_name(lid) for lid in (ids.base, ids.app, ids.web)}
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "empty", sample.share_ro], check=True, timeout=30)
    try:
        wait_for(lambda: not node.g.status()["ro"][0]["available"], 5,  # type: ignore[index]
                 "the share to be reported unavailable")
        d.init()  # iSulad starts again
        d.clean_up()
    finally:
        umount(sample.share_ro)  # only the tmpfs: the read-only bind of the share is under it
    wait_for(lambda: node.g.status()["ro"][0]["available"], 5, "the share to be back")  # type: ignore[index]
    hidden = {f"overlay/l/{link}" for link in shared_links}
    if direct == "0":
        # each stat answered EIO, or from what the kernel still knew: nothing removed
        assert not [w for w in d.warnings if w.startswith("removed")], d.warnings
        assert node.g.status()["hidden_count"] == 0
    else:
        assert sorted(d.warnings) == sorted(f"removed invalid link {link}" for link in shared_links)
        assert set(node.g.status()["hidden"]) == hidden  # type: ignore[call-overload]
        d.warnings.clear()
        d.init()
        second = digest("container:after")
        with pytest.raises(AssertionError, match="can't stat absolute layer"):
            d.create_layer(second, ids.app, writable=True)  # the driver's metadata: a lower is gone
        d.rm_layer(second)  # layer_store_create cleans up
        # iSulad's next start checks its image layers: the link is made again, as the node's own
        assert d.layer_exists(ids.app) and d.layer_exists(ids.base)
        assert d.warnings == [f"link {short_name(lid)} of {lid} made again" for lid in (ids.app, ids.base)]
        assert os.readlink(node.rw("overlay", "l", short_name(ids.app))) == f"../{ids.app}/diff"
        d.clean_up()
    d.warnings.clear()
    d.init()
    assert d.warnings == []
    third = digest("container:after-restart")
    d.create_layer(third, ids.app, writable=True)
    before = node.fuse_bytes()
    merged, _ = d.mount(third)
    assert Path(merged, "app", "data.txt").read_text() == "application data\n"
    after = node.fuse_bytes()
    if direct == "1":
        assert (after[0] - before[0], after[1] - before[1]) == (DATA_THROUGH_FUSE, DATA_THROUGH_FUSE)
    d.umount(third)
    for cid in (first, third):
        d.delete_layer(cid)
    assert d.warnings == []
    d.clean_up()


def test_shared_layer_removed_is_hidden(isulad_node: Callable[..., Node], sample: Sample) -> None:
    """Removing shared image layers as iSulad does (rmi): the recursive removal unlinks the
    ``diff`` and ``work`` links, which hides them, and the layer disappears from this node only;
    the share keeps everything, and the hides hold across a remount. The node's own container
    layer in the sample, and the node's own directory in a shared layer, are deleted from RW."""
    ids = sample.ids
    node = isulad_node()
    d = node.driver
    d.init()
    web_link = short_name(ids.web)
    d.delete_layer(ids.local)  # the node's own (a container layer of the sample)
    assert not node.rw("overlay", ids.local).exists() and not node.rw("overlay-layers", ids.local).exists()
    d.delete_layer(ids.web)
    # neither layer has a merged directory: iSulad logs the failed umount2 and goes on
    assert d.warnings == [f"umount {d.layer_dir(lid)}/merged: No such file or directory"
                          for lid in (ids.local, ids.web)]
    for gone in (("overlay", ids.web), ("overlay-layers", ids.web), ("overlay", "l", web_link)):
        assert not os.path.lexists(os.path.join(node.g.mnt, *gone)), gone
    assert ids.web not in os.listdir(d.home) and ids.web not in os.listdir(d.layer_records)
    for kept in ("diff/srv/index.html", "link", "work"):
        assert Path(sample.share, "overlay", ids.web, kept).exists(), kept
    assert Path(sample.share, "overlay-layers", ids.web, "layer.json").exists()
    # a shared layer the node has a directory of its own in (the sample's app/merged): that
    # directory is removed from RW, the shared parts are hidden
    assert node.rw("overlay", ids.app, "merged").is_dir()
    d.delete_layer(ids.app)
    assert d.warnings[2:] == []  # its merged directory was not a mount: EINVAL, ignored
    assert not node.rw("overlay", ids.app).exists()
    assert ids.app not in os.listdir(d.home) and ids.app not in os.listdir(d.layer_records)
    assert Path(sample.share, "overlay", ids.app, "diff", "app", "data.txt").exists()
    assert ids.base in os.listdir(d.home) and d.layer_exists(ids.base)
    d.clean_up()
    node.g.remount()
    for lid in (ids.web, ids.app):
        assert lid not in os.listdir(d.home) and not os.path.lexists(os.path.join(d.home, "l", short_name(lid)))
    assert ids.base in os.listdir(d.home)
