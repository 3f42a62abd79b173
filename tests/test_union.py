"""Union semantics on a real mount: resolution order, creation, copy-up, hides, renames, xattrs.

The shared tree is bind-mounted read-only (see conftest), so a write that reached it would fail
the operation; the tests also compare the writable source of the share before and after.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import GraftMount, Sample, needs_mount
from graftfs.linux import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, renameat2

pytestmark = needs_mount

MountFactory = Callable[..., GraftMount]


def tree_snapshot(root: str) -> dict[str, tuple[int, int, bytes | str | None]]:
    """Every entry under ``root`` with its mode, mtime and content (or link target)."""
    snap: dict[str, tuple[int, int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data: bytes | str | None = None
            if stat.S_ISREG(st.st_mode):
                data = Path(p).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(p)
            snap[os.path.relpath(p, root)] = (st.st_mode, st.st_mtime_ns, data)
    return snap


def origin(path: str) -> str:
    return os.getxattr(path, "trusted.graftfs.origin", follow_symlinks=False).decode()


def test_resolution_order_rw_then_ro_in_order(sample: Sample, tmp_path: Path, mount_factory: MountFactory) -> None:
    second = tmp_path / "second"
    (second / "common").mkdir(parents=True)
    (second / "common" / "both.txt").write_text("second tree\n")
    (second / "common" / "only-second.txt").write_text("only in second\n")
    share = Path(sample.share)
    (share / "common").mkdir()
    (share / "common" / "both.txt").write_text("first tree\n")
    (share / "common" / "shadowed.txt").write_text("ro version\n")
    rw = Path(sample.rw)
    (rw / "common").mkdir()
    (rw / "common" / "shadowed.txt").write_text("rw version\n")

    g = mount_factory(sample.rw, [sample.share_ro, str(second)])
    common = g.path("common")
    assert sorted(os.listdir(common)) == ["both.txt", "only-second.txt", "shadowed.txt"]
    assert Path(common, "both.txt").read_text() == "first tree\n"
    assert origin(os.path.join(common, "both.txt")) == f"ro:{sample.share_ro}"
    assert Path(common, "shadowed.txt").read_text() == "rw version\n"
    assert origin(os.path.join(common, "shadowed.txt")) == "rw"
    assert Path(common, "only-second.txt").read_text() == "only in second\n"
    assert origin(os.path.join(common, "only-second.txt")) == f"ro:{second}"
    # the merged directory keeps one inode number across lookups
    assert os.stat(common).st_ino == os.stat(common).st_ino


def test_shared_layer_dir_merges_with_node_dirs(graft: GraftMount, sample: Sample) -> None:
    layer = graft.path("overlay", sample.ids.app)
    assert sorted(os.listdir(layer)) == ["diff", "link", "lower", "merged", "work"]
    assert origin(os.path.join(layer, "merged")) == "rw"
    assert origin(os.path.join(layer, "diff")) == f"ro:{sample.share_ro}"
    assert Path(layer, "diff", "app", "data.txt").read_text() == "application data\n"


def test_creation_goes_to_rw_with_parents(graft: GraftMount, sample: Sample) -> None:
    before = tree_snapshot(sample.share)
    new_dir = graft.path("overlay", sample.ids.base, "diff", "etc", "new.d")
    os.mkdir(new_dir, 0o751)
    Path(new_dir, "conf").write_text("created on the node\n")
    rw_copy = Path(sample.rw, "overlay", sample.ids.base, "diff", "etc", "new.d", "conf")
    assert rw_copy.read_text() == "created on the node\n"
    # the copied-up parent keeps the shared directory's mode
    shared_etc = os.stat(os.path.join(sample.share, "overlay", sample.ids.base, "diff", "etc"))
    assert os.stat(rw_copy.parent.parent).st_mode == shared_etc.st_mode
    assert stat.S_IMODE(os.stat(new_dir).st_mode) == 0o751
    assert origin(new_dir) == "rw"
    assert sorted(os.listdir(graft.path("overlay", sample.ids.base, "diff", "etc"))) == ["new.d", "os-release"]
    assert tree_snapshot(sample.share) == before


def test_copy_up_on_write_keeps_ro_untouched(graft: GraftMount, sample: Sample) -> None:
    before = tree_snapshot(sample.share)
    target = graft.path("overlay", sample.ids.base, "diff", "etc", "os-release")
    src_st = os.stat(os.path.join(sample.share, "overlay", sample.ids.base, "diff", "etc", "os-release"))
    assert origin(target) == f"ro:{sample.share_ro}"
    with open(target, "a") as f:
        f.write("VERSION=2\n")
    assert Path(target).read_text() == "NAME=demo\nVERSION=2\n"
    assert origin(target) == "rw"
    st = os.stat(target)
    assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(src_st.st_mode)
    assert (st.st_uid, st.st_gid) == (src_st.st_uid, src_st.st_gid)
    # metadata-only change of another RO file copies it up with its data
    hello = graft.path("overlay", sample.ids.base, "diff", "bin", "hello")
    os.chmod(hello, 0o755)
    assert Path(hello).read_text() == "hi\n"
    assert stat.S_IMODE(os.stat(Path(sample.rw, "overlay", sample.ids.base, "diff", "bin", "hello")).st_mode) == 0o755
    # truncating open copies up without data
    with open(graft.path("overlay", sample.ids.web, "diff", "srv", "index.html"), "w") as f:
        f.write("new")
    assert Path(graft.path("overlay", sample.ids.web, "diff", "srv", "index.html")).read_text() == "new"
    assert tree_snapshot(sample.share) == before


def test_open_files_outlive_their_names(graft: GraftMount, sample: Sample) -> None:
    """A file open in a process keeps its content when its name goes, through unlink or a rename
    over it, as on a local filesystem; so does a shared file (hidden on this node)."""
    d = graft.path("overlay", sample.ids.local, "diff")
    scratch = os.path.join(d, "scratch")
    Path(scratch).write_bytes(b"first")
    with open(scratch, "r+b") as f:
        assert f.read() == b"first"  # (the kernel has it: no descriptor opened by a write yet)
        os.unlink(scratch)
        f.seek(0)
        f.write(b"FIRST, again")
        f.flush()
        f.seek(0)
        assert f.read() == b"FIRST, again" and os.fstat(f.fileno()).st_size == 12
    assert not os.path.exists(scratch)
    Path(scratch).write_bytes(b"old")
    with open(scratch, "rb") as old:
        Path(scratch + ".new").write_bytes(b"new content")
        os.rename(scratch + ".new", scratch)
        assert old.read() == b"old"
    assert Path(scratch).read_bytes() == b"new content"
    shared = graft.path("overlay", sample.ids.base, "diff", "etc", "os-release")
    with open(shared, "rb") as f:
        os.unlink(shared)
        assert f.read() == b"NAME=demo\n"
    assert not os.path.exists(shared)
    assert Path(sample.share, "overlay", sample.ids.base, "diff", "etc", "os-release").read_text() == "NAME=demo\n"


def test_kernel_opens_cost_no_open_requests(graft: GraftMount, sample: Sample) -> None:
    """With the kernel opening files itself, reading and writing files sends no open and no
    release; the first write of a shared file makes its RW copy then."""
    kernel_opens = bool(graft.status()["kernel_opens"])
    if not kernel_opens and "kernel_opens=auto" in graft.extra:
        pytest.skip("this pyfuse3 cannot serve files the kernel opens itself (tools/build-pyfuse3)")
    target = graft.path("overlay", sample.ids.base, "diff", "etc", "os-release")
    Path(graft.path("overlay", sample.ids.base, "diff", "bin", "hello")).read_text()  # (the one open: ENOSYS)
    before = graft.status()["requests"]
    for _ in range(3):
        assert Path(target).read_text() == "NAME=demo\n"
    with open(target, "r+") as f:
        # the kernel's own open copies nothing yet; graftfs' open for writing copies the file up
        assert origin(target) == (f"ro:{sample.share_ro}" if kernel_opens else "rw")
        f.seek(0, os.SEEK_END)
        f.write("ID=demo\n")
    assert Path(target).read_text() == "NAME=demo\nID=demo\n" and origin(target) == "rw"
    after = graft.status()["requests"]
    opened = {op: after.get(op, {}).get("count", 0) - before.get(op, {}).get("count", 0)  # type: ignore[union-attr]
              for op in ("open", "release")}
    assert (opened == {"open": 0, "release": 0}) == kernel_opens, opened


def test_hide_of_ro_entries_is_local_and_persistent(graft: GraftMount, sample: Sample) -> None:
    before = tree_snapshot(sample.share)
    diff = graft.path("overlay", sample.ids.base, "diff")
    os.unlink(os.path.join(diff, "bin", "hello"))
    assert not os.path.exists(os.path.join(diff, "bin", "hello"))
    assert os.listdir(os.path.join(diff, "bin")) == []
    # rm -rf of a shared directory, then mkdir: the new directory is opaque (empty)
    os.unlink(os.path.join(diff, "etc", "os-release"))
    os.rmdir(os.path.join(diff, "etc"))
    assert sorted(os.listdir(diff)) == ["bin"]
    os.mkdir(os.path.join(diff, "etc"))
    assert os.listdir(os.path.join(diff, "etc")) == []
    # removing a whole shared image: the node no longer lists it, the share still has it
    image = graft.path("overlay-images", sample.ids.image_web)
    for name in os.listdir(image):
        os.unlink(os.path.join(image, name))
    os.rmdir(image)
    assert sample.ids.image_web not in os.listdir(graft.path("overlay-images"))
    assert tree_snapshot(sample.share) == before
    assert ".graftfs" not in os.listdir(graft.mnt)
    status = graft.status()
    assert f"overlay-images/{sample.ids.image_web}" in status["hidden"]  # type: ignore[operator]

    graft.remount()
    assert not os.path.exists(os.path.join(diff, "bin", "hello"))
    assert os.listdir(os.path.join(diff, "etc")) == []
    assert sample.ids.image_web not in os.listdir(graft.path("overlay-images"))
    assert sample.ids.image_app in os.listdir(graft.path("overlay-images"))


def test_rename_flags(graft: GraftMount, sample: Sample) -> None:
    before = tree_snapshot(sample.share)
    work = graft.path("overlay", sample.ids.local, "diff", "tmp")
    a, b = os.path.join(work, "a"), os.path.join(work, "b")
    Path(a).write_text("A")
    Path(b).write_text("B")
    with pytest.raises(OSError) as exc:
        renameat2(a, b, RENAME_NOREPLACE)
    assert exc.value.errno == errno.EEXIST
    renameat2(a, b, RENAME_EXCHANGE)
    assert (Path(a).read_text(), Path(b).read_text()) == ("B", "A")
    renameat2(a, os.path.join(work, "c"), RENAME_WHITEOUT)
    st = os.lstat(a)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert Path(work, "c").read_text() == "B"
    # exchange with a shared file copies it up; the share is untouched
    shared = graft.path("overlay", sample.ids.app, "diff", "app", "data.txt")
    local = graft.path("overlay", sample.ids.app, "diff", "app", "local.txt")
    Path(local).write_text("local\n")
    renameat2(shared, local, RENAME_EXCHANGE)
    assert Path(shared).read_text() == "local\n"
    assert Path(local).read_text() == "application data\n"
    # renaming a shared file away hides its old name
    moved = graft.path("overlay", sample.ids.app, "diff", "moved.txt")
    html = graft.path("overlay", sample.ids.web, "diff", "srv", "index.html")
    os.rename(html, moved)
    assert not os.path.exists(html)
    assert Path(moved).read_text() == "<h1>web</h1>\n"
    # a directory with shared content cannot be renamed in place (like overlayfs: EXDEV)
    with pytest.raises(OSError) as exc:
        os.rename(graft.path("overlay", sample.ids.base, "diff", "etc"), graft.path("overlay", sample.ids.base, "x"))
    assert exc.value.errno == errno.EXDEV
    assert tree_snapshot(sample.share) == before


def test_xattrs_on_rw_and_ro_entries(graft: GraftMount, sample: Sample) -> None:
    before = tree_snapshot(sample.share)
    rw_file = graft.path("overlay", sample.ids.local, "diff", "tmp", "container-output.log")
    for name in ("user.test", "trusted.overlay.opaque", "security.test"):
        os.setxattr(rw_file, name, b"y")
        assert os.getxattr(rw_file, name) == b"y"
    assert {"user.test", "trusted.overlay.opaque", "security.test"} <= set(os.listxattr(rw_file))
    os.removexattr(rw_file, "user.test")
    with pytest.raises(OSError) as exc:
        os.getxattr(rw_file, "user.test")
    assert exc.value.errno == errno.ENODATA
    # setting an xattr on a shared directory copies the directory (not its content) up
    shared_dir = graft.path("overlay", sample.ids.base, "diff", "etc")
    os.setxattr(shared_dir, "trusted.overlay.opaque", b"y")
    assert os.getxattr(shared_dir, "trusted.overlay.opaque") == b"y"
    assert origin(shared_dir) == "rw"
    assert os.listdir(shared_dir) == ["os-release"]
    with pytest.raises(OSError) as exc:
        os.setxattr(rw_file, "user.graftfs.origin", b"ro:/elsewhere")
    assert exc.value.errno == errno.EPERM
    assert "user.graftfs.origin" not in os.listxattr(rw_file)
    assert tree_snapshot(sample.share) == before


def test_labels_and_acls_absent_answer_not_supported(graft: GraftMount, sample: Sample) -> None:
    """ls -l asks every file for its SELinux label and ACLs: where an entry has none, graftfs
    answers EOPNOTSUPP (ls then stops asking the mount), while values that exist are served."""
    shared = graft.path("overlay", sample.ids.base, "diff", "etc", "os-release")
    rw_file = graft.path("overlay", sample.ids.local, "diff", "tmp", "container-output.log")
    names = ["system.posix_acl_access"] + ([] if os.path.exists("/sys/fs/selinux/enforce") else ["security.selinux"])
    for path in (shared, rw_file, graft.path("overlay-layers"), graft.mnt):
        for name in names:
            with pytest.raises(OSError) as exc:
                os.getxattr(path, name, follow_symlinks=False)
            assert exc.value.errno == errno.EOPNOTSUPP, (path, name)
        with pytest.raises(OSError) as exc:
            os.getxattr(path, "user.absent")
        assert exc.value.errno == errno.ENODATA  # any other name: the usual answer
    backing = os.path.join(sample.rw, "overlay", sample.ids.local, "diff", "tmp", "container-output.log")
    os.setxattr(backing, "security.selinux", b"system_u:object_r:container_file_t:s0\0")
    assert os.getxattr(rw_file, "security.selinux").startswith(b"system_u:")


def test_origin_xattr_answers_for_every_entry(graft: GraftMount, sample: Sample) -> None:
    ro = f"ro:{sample.share_ro}"
    assert os.getxattr(graft.path("overlay-layers", sample.ids.base), "user.graftfs.origin") == ro.encode()
    assert os.getxattr(graft.path("overlay-layers", sample.ids.local), "user.graftfs.origin") == b"rw"
    links = graft.path("overlay", "l")
    for name in os.listdir(links):
        target = os.readlink(os.path.join(links, name))
        layer_id = target.split("/")[1]
        want = "rw" if layer_id == sample.ids.local else ro
        assert origin(os.path.join(links, name)) == want, name
        assert os.path.isdir(os.path.join(links, name))  # the link resolves through the mount


def test_special_files_links_and_times(graft: GraftMount, sample: Sample) -> None:
    d = graft.path("overlay", sample.ids.local, "diff")
    os.mknod(os.path.join(d, "wh"), stat.S_IFCHR | 0o600, os.makedev(0, 0))
    assert stat.S_ISCHR(os.lstat(os.path.join(d, "wh")).st_mode)
    os.mkfifo(os.path.join(d, "fifo"))
    assert stat.S_ISFIFO(os.lstat(os.path.join(d, "fifo")).st_mode)
    os.symlink("../x", os.path.join(d, "sl"))
    assert os.readlink(os.path.join(d, "sl")) == "../x"
    shared = graft.path("overlay", sample.ids.base, "diff", "bin", "hello")
    os.link(shared, os.path.join(d, "hardlink"))
    assert Path(d, "hardlink").read_text() == "hi\n"
    assert os.stat(os.path.join(d, "hardlink")).st_nlink == 2
    os.utime(os.path.join(d, "hardlink"), ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(os.path.join(d, "hardlink")).st_mtime_ns == 2_000_000_000
    os.truncate(os.path.join(d, "hardlink"), 1)
    assert Path(d, "hardlink").read_text() == "h"
    fd = os.open(os.path.join(d, "tmp", "container-output.log"), os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert os.statvfs(graft.mnt).f_bsize > 0


def test_state_dir_is_private(graft: GraftMount, sample: Sample) -> None:
    assert ".graftfs" not in os.listdir(graft.mnt)
    assert not os.path.exists(graft.path(".graftfs"))
    with pytest.raises(OSError) as exc:
        os.mkdir(graft.path(".graftfs"))
    assert exc.value.errno == errno.EPERM
    assert ".graftfs-share" not in os.listdir(graft.mnt)  # the share's marker is not shown either
