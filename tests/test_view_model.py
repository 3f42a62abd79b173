"""Union semantics and the containers-storage index rules, checked on the namespace model itself.

graftfs keeps what the view shows and what a change does (graftfs.view.namespace.Namespace and
its layouts) apart from the FUSE adapter that serves it. These tests drive that model directly,
on plain directories, with no mount, daemon or runtime: resolution order, directory merges,
which shared entries are complete enough to show, copy-up, hides and their persistence, renames,
an unavailable share, and for containers/storage the merge of ``layers.json``/``images.json``
and the split-back of a runtime's rewrite. The mount tests show the same rules through the
kernel; these pin them down quickly and with edge cases a mount makes awkward to reach.

Every test that changes the view also checks that the shared trees were never written: each
share is snapshotted (paths, modes, owners, sizes, mtimes, contents) when the test starts and
compared when it ends; a test that publishes into a share on purpose takes a new snapshot after.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from graftfs.catalog.live import LiveCatalog
from graftfs.catalog.scan import entry_sig
from graftfs.catalog.scan_cache import scan_from_json, scan_to_json
from graftfs.format.names import IMAGES_JSON, LAYERS_JSON, MARKER_NAME, STATE_DIR
from graftfs.format.records import Record, go_json, record_names
from graftfs.linux import RENAME_EXCHANGE, RENAME_NOREPLACE
from graftfs.share.pins import ensure_pin_tree
from graftfs.share.sample import (
    DemoIds,
    SampleLayer,
    build_demo,
    chain,
    digest,
    publish_sample_image,
    short_name,
    write_image,
    write_layer,
)
from graftfs.view.containers_storage import ContainersStorageLayout, containers_storage_catalog
from graftfs.view.hides import HideStore
from graftfs.view.isulad import IsuladLayout, isulad_catalog
from graftfs.view.layout import VPath
from graftfs.view.namespace import Busy, Namespace, NeedsCopyUp
from graftfs.view.plain import PlainLayout

#: The owner the tests give what they create through the view.
UID, GID = os.getuid(), os.getgid()
#: Owners that copy-up must keep: foreign ones where the tests may chown (root), else the tests' own.
ETC_OWNER, RELEASE_OWNER, NEW_OWNER = (
    ((1234, 5678), (4321, 8765), (1000, 1001)) if os.geteuid() == 0 else ((UID, GID), (UID, GID), (UID, GID)))

# -- the shares are never written -----------------------------------------------------------

Snapshot = dict[str, tuple[int, int, int, int, int, str]]


def snapshot(root: str) -> Snapshot:
    """Every entry under ``root`` (itself included): mode, owner, size, mtime and content
    (a hash for files, the target for symlinks)."""
    snap: Snapshot = {}
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths.extend(os.path.join(dirpath, n) for n in [*dirnames, *filenames])
    for path in paths:
        st = os.lstat(path)
        content = ""
        if stat.S_ISREG(st.st_mode):
            content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        snap[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, content)
    return snap


class ShareGuard:
    """Snapshots of the shared trees, compared when the test ends."""

    def __init__(self) -> None:
        self.before: dict[str, Snapshot] = {}

    def watch(self, *roots: str) -> None:
        """(Re)take the reference snapshot of ``roots`` (after a deliberate change to a share)."""
        for root in roots:
            self.before[root] = snapshot(root)

    def changes(self) -> dict[str, list[str]]:
        """Per watched root, the paths that differ from its reference snapshot."""
        out: dict[str, list[str]] = {}
        for root, before in self.before.items():
            after = snapshot(root)
            differ = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
            if differ:
                out[root] = differ
        return out


@pytest.fixture
def guard() -> Iterator[ShareGuard]:
    g = ShareGuard()
    yield g
    assert g.changes() == {}, "a shared tree was written"


# -- helpers --------------------------------------------------------------------------------


def poll(live: LiveCatalog) -> None:
    """One poll of every tree, committed and acknowledged, as the watcher does."""
    for tree in range(len(live.trees)):
        live.poll_tree(tree)
    seq, _ = live.commit()
    live.ack(seq)


def read_view(ns: Namespace, vpath: VPath, pid: int = 0) -> bytes:
    """A file's content as the view serves it (``pid``: the reading process); read at offsets,
    as the FUSE adapter does (a merged file's descriptor is not at offset 0)."""
    fd, _ = ns.open(vpath, os.O_RDONLY, pid)
    try:
        data = b""
        while chunk := os.pread(fd, 1 << 16, len(data)):
            data += chunk
        return data
    finally:
        os.close(fd)


def write_new(ns: Namespace, vpath: VPath, data: bytes, mode: int = 0o644, uid: int = -1, gid: int = -1) -> None:
    fd, _ = ns.create(vpath, mode, os.O_WRONLY, UID if uid < 0 else uid, GID if gid < 0 else gid)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def names(ns: Namespace, vpath: VPath) -> list[str]:
    return [n for n, _ in ns.listdir(vpath)]


def errno_of(call: Callable[..., object], *args: object) -> int:
    """The errno ``call(*args)`` fails with (the test fails when it does not fail)."""
    try:
        call(*args)
    except OSError as e:
        assert e.errno is not None
        return e.errno
    raise AssertionError(f"{call} did not fail")


_opened: list[HideStore] = []


def hide_store(state_dir: str) -> HideStore:
    """A node's hides, closed when the test ends."""
    store = HideStore(state_dir)
    _opened.append(store)
    return store


@pytest.fixture(autouse=True)
def close_hide_stores() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


def reopened(ns: Namespace) -> Namespace:
    """The same RW tree seen by a new mount: the hides read back from the state dir."""
    return Namespace(ns.rw_root, ns.layout, hide_store(ns.state_dir))


# -- a plain layout over two trees ----------------------------------------------------------


@dataclass
class PlainNode:
    ns: Namespace
    rw: Path
    t0: Path
    t1: Path


@pytest.fixture
def plain(tmp_path: Path, guard: ShareGuard) -> PlainNode:
    """RW over two plain trees: ``common/`` in all three, ``d`` a directory in RW and tree 1 but
    a file in tree 0, ``x`` a file in tree 0 and a directory in tree 1."""
    rw, t0, t1 = tmp_path / "rw", tmp_path / "t0", tmp_path / "t1"
    files = {
        t0 / "common" / "both.txt": "t0\n", t0 / "common" / "shadowed.txt": "t0\n", t0 / "d": "t0 file\n",
        t0 / "x": "t0 file\n", t0 / MARKER_NAME: "graftfs share v1\n",
        t1 / "common" / "both.txt": "t1\n", t1 / "common" / "only-t1.txt": "t1\n", t1 / "d" / "below": "t1\n",
        t1 / "x" / "inner": "t1\n",
        rw / "common" / "shadowed.txt": "rw\n", rw / "common" / "only-rw.txt": "rw\n", rw / "d" / "mine": "rw\n",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (t1 / "empty.d").mkdir()
    (rw / STATE_DIR).mkdir()
    guard.watch(str(t0), str(t1))
    ns = Namespace(str(rw), PlainLayout([str(t0), str(t1)]), hide_store(str(rw / STATE_DIR)))
    return PlainNode(ns, rw, t0, t1)


def test_rw_file_wins_and_trees_resolve_in_order(plain: PlainNode) -> None:
    ns = plain.ns
    shadowed = ns.resolve(("common", "shadowed.txt"))
    assert shadowed.origin == "rw" and [s.origin for s in shadowed.sources] == ["rw"]
    assert read_view(ns, ("common", "shadowed.txt")) == b"rw\n"
    both = ns.resolve(("common", "both.txt"))
    assert both.origin == f"ro:{plain.t0}" and len(both.sources) == 1 and both.ro_visible
    assert read_view(ns, ("common", "both.txt")) == b"t0\n"
    assert ns.resolve(("common", "only-t1.txt")).origin == f"ro:{plain.t1}"
    assert ns.resolve(("common", "only-rw.txt")).ro_visible is False


def test_directories_of_one_name_merge_without_duplicates(plain: PlainNode) -> None:
    ns = plain.ns
    common = ns.resolve(("common",))
    assert [s.origin for s in common.sources] == ["rw", f"ro:{plain.t0}", f"ro:{plain.t1}"]
    listed = names(ns, ("common",))
    assert len(listed) == len(set(listed))
    assert sorted(listed) == ["both.txt", "only-rw.txt", "only-t1.txt", "shadowed.txt"]
    origins = {n: r.origin for n, r in ns.listdir(("common",))}
    assert origins == {"both.txt": f"ro:{plain.t0}", "only-rw.txt": "rw", "only-t1.txt": f"ro:{plain.t1}",
                       "shadowed.txt": "rw"}
    root = names(ns, ())
    assert sorted(root) == ["common", "d", "empty.d", "x"]  # no state dir, no share marker


def test_non_directory_in_a_higher_tree_breaks_the_merge(plain: PlainNode) -> None:
    ns = plain.ns
    d = ns.resolve(("d",))
    assert d.is_dir and [s.origin for s in d.sources] == ["rw"]  # tree 1's d/ is cut off by tree 0's file
    assert names(ns, ("d",)) == ["mine"]
    x = ns.resolve(("x",))
    assert not x.is_dir and x.origin == f"ro:{plain.t0}" and len(x.sources) == 1
    assert read_view(ns, ("x",)) == b"t0 file\n"
    assert errno_of(ns.listdir, ("x",)) == errno.ENOTDIR


def test_unlinking_an_rw_file_that_shadows_a_shared_one_does_not_uncover_it(plain: PlainNode) -> None:
    ns = plain.ns
    ns.unlink(("common", "shadowed.txt"))
    assert not (plain.rw / "common" / "shadowed.txt").exists()
    with pytest.raises(FileNotFoundError):
        ns.resolve(("common", "shadowed.txt"))  # tree 0's copy does not come back
    assert "shadowed.txt" not in names(ns, ("common",))
    assert ns.hides.covers(("common", "shadowed.txt"))
    ns.unlink(("common", "only-rw.txt"))  # nothing shared below: no hide needed
    assert not ns.hides.covers(("common", "only-rw.txt")) and len(ns.hides) == 1


def test_rw_directory_renamed_over_a_shared_one_does_not_merge_with_it(plain: PlainNode, guard: ShareGuard) -> None:
    ns = plain.ns
    ns.mkdir(("new.d",), 0o755, UID, GID)
    write_new(ns, ("new.d", "a"), b"a\n")
    ns.rename(("new.d",), ("empty.d",))
    res = ns.resolve(("empty.d",))
    assert [s.origin for s in res.sources] == ["rw"] and ns.hides.covers(("empty.d",))
    assert names(ns, ("empty.d",)) == ["a"]
    # content the share adds to its directory later stays out: the RW directory replaced it
    (plain.t1 / "empty.d" / "late").write_text("late\n")
    guard.watch(str(plain.t1))
    assert names(ns, ("empty.d",)) == ["a"]
    with pytest.raises(FileNotFoundError):
        ns.resolve(("empty.d", "late"))
    # a shared directory that is not empty cannot be replaced
    ns.mkdir(("other.d",), 0o755, UID, GID)
    assert errno_of(ns.rename, ("other.d",), ("common",)) == errno.ENOTEMPTY


# -- the iSulad layout over the demo share ---------------------------------------------------

#: Extra entries of the iSulad fixture's share that are not complete.
NO_RECORD = digest("layer:no-record")  # layer.json missing
ORPHAN = digest("layer:orphan")  # complete itself, on the demo's layer without a link file
ORPHAN_IMAGE = digest("image:orphan")
DANGLING_IMAGE = digest("image:dangling")  # its top layer exists nowhere


@dataclass
class IsuladNode:
    ns: Namespace
    layout: IsuladLayout
    ids: DemoIds
    share: Path
    rw: Path

    def diff(self, layer: str, *rest: str) -> VPath:
        return ("overlay", layer, "diff", *rest)

    def share_diff(self, layer: str, *rest: str) -> Path:
        return self.share.joinpath("overlay", layer, "diff", *rest)


@pytest.fixture
def isulad(tmp_path: Path, guard: ShareGuard) -> IsuladNode:
    """The demo share (two images, one layer without its link file) seen through the iSulad
    layout, with a few more details: owners and modes to keep, a symlink, an empty directory,
    and more incomplete entries."""
    share, rw = tmp_path / "share", tmp_path / "rw"
    ids = build_demo(str(share), str(rw))
    base_diff = share / "overlay" / ids.base / "diff"
    os.chown(base_diff / "etc", *ETC_OWNER)
    os.chmod(base_diff / "etc", 0o751)
    os.chown(base_diff / "etc" / "os-release", *RELEASE_OWNER)
    os.chmod(base_diff / "etc" / "os-release", 0o640)
    os.utime(base_diff / "etc" / "os-release", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    os.symlink("hello", base_diff / "bin" / "sh")
    (base_diff / "empty.d").mkdir()
    write_layer(str(share), SampleLayer(NO_RECORD, ids.base, {"f": b"x"}))
    os.unlink(share / "overlay-layers" / NO_RECORD / "layer.json")
    write_layer(str(share), SampleLayer(ORPHAN, ids.broken, {"f": b"x"}))
    write_image(str(share), ORPHAN_IMAGE, ORPHAN, ["demo/orphan:1"])
    write_image(str(share), DANGLING_IMAGE, digest("layer:nowhere"), ["demo/dangling:1"])
    os.makedirs(rw / STATE_DIR)
    guard.watch(str(share))
    layout = IsuladLayout(isulad_catalog([str(share)], str(rw)))
    layout.live.refresh()
    ns = Namespace(str(rw), layout, hide_store(str(rw / STATE_DIR)))
    return IsuladNode(ns, layout, ids, share, rw)


def test_incomplete_shared_entries_are_not_visible(isulad: IsuladNode, guard: ShareGuard) -> None:
    ns, ids = isulad.ns, isulad.ids
    hidden_layers = (ids.broken, NO_RECORD, ORPHAN)
    hidden_images = (ids.image_broken, ORPHAN_IMAGE, DANGLING_IMAGE)
    assert set(names(ns, ("overlay",))) == {ids.base, ids.app, ids.web, ids.local, "l"}
    assert set(names(ns, ("overlay-layers",))) == {ids.base, ids.app, ids.web, ids.local}
    assert set(names(ns, ("overlay-images",))) == {ids.image_app, ids.image_web}
    for lid in hidden_layers:
        for vpath in (("overlay", lid), isulad.diff(lid), isulad.diff(lid, "f"), ("overlay-layers", lid)):
            with pytest.raises(FileNotFoundError):
                ns.resolve(vpath)
        assert short_name(lid) not in names(ns, ("overlay", "l"))
    for iid in hidden_images:
        with pytest.raises(FileNotFoundError):
            ns.resolve(("overlay-images", iid, "images.json"))
    assert ns.readlink(("overlay", "l", short_name(ids.app))) == f"../{ids.app}/diff"
    skipped = {s["id"]: s["reason"] for s in ns.status().layout.skipped}
    assert skipped.keys() >= {*hidden_layers, *hidden_images}
    assert skipped[ids.broken] == "overlay link file missing"
    assert skipped[NO_RECORD] == "layer.json missing"
    # the publisher finishes the layer: it shows, and so do the layer and image waiting on it
    (isulad.share / "overlay" / ids.broken / "link").write_text(short_name(ids.broken))
    guard.watch(str(isulad.share))
    poll(isulad.layout.live)
    assert {ids.broken, ORPHAN} <= set(names(ns, ("overlay",)))
    assert {ids.image_broken, ORPHAN_IMAGE} <= set(names(ns, ("overlay-images",)))
    assert DANGLING_IMAGE not in names(ns, ("overlay-images",)) and NO_RECORD not in names(ns, ("overlay",))
    assert read_view(ns, isulad.diff(ORPHAN, "f")) == b"x"


def test_private_state_dir_is_never_visible_or_creatable(isulad: IsuladNode) -> None:
    ns = isulad.ns
    assert (isulad.rw / STATE_DIR / "hides.log").exists()
    assert STATE_DIR not in names(ns, ()) and MARKER_NAME not in names(ns, ())
    for vpath in ((STATE_DIR,), (STATE_DIR, "hides.log")):
        with pytest.raises(FileNotFoundError):
            ns.resolve(vpath)
    write_new(ns, isulad.diff(isulad.ids.local, "tmp", "f"), b"f")
    state_before = sorted(os.listdir(isulad.rw / STATE_DIR))
    attempts: list[tuple[Callable[..., object], tuple[object, ...]]] = [
        (ns.mkdir, ((STATE_DIR,), 0o755, UID, GID)),
        (ns.mkdir, ((STATE_DIR, "x"), 0o755, UID, GID)),
        (ns.create, ((STATE_DIR, "x"), 0o644, os.O_WRONLY, UID, GID)),
        (ns.symlink, ((STATE_DIR, "x"), "y", UID, GID)),
        (ns.mknod, ((STATE_DIR, "x"), stat.S_IFIFO | 0o644, 0, UID, GID)),
        (ns.link, (isulad.diff(isulad.ids.local, "tmp", "f"), (STATE_DIR, "x"))),
        (ns.rename, (isulad.diff(isulad.ids.local, "tmp", "f"), (STATE_DIR, "x"))),
        (ns.rename, ((STATE_DIR, "hides.log"), ("stolen",))),
    ]
    for call, args in attempts:
        assert errno_of(call, *args) == errno.EPERM, (call, args)
    assert sorted(os.listdir(isulad.rw / STATE_DIR)) == state_before
    assert not (isulad.rw / "stolen").exists()
    # only the top-level name is reserved: deeper down it is an ordinary name
    ns.mkdir(isulad.diff(isulad.ids.local, STATE_DIR), 0o755, UID, GID)
    assert STATE_DIR in names(ns, isulad.diff(isulad.ids.local))


def test_creating_below_a_shared_directory_copies_up_its_parents(isulad: IsuladNode) -> None:
    ns, base = isulad.ns, isulad.ids.base
    write_new(ns, isulad.diff(base, "etc", "new.conf"), b"new\n", 0o640, *NEW_OWNER)
    rw_etc = isulad.rw / "overlay" / base / "diff" / "etc"
    st = os.stat(rw_etc)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o751 and (st.st_uid, st.st_gid) == ETC_OWNER
    shared_diff = os.stat(isulad.share_diff(base))
    rw_diff = os.stat(isulad.rw / "overlay" / base / "diff")
    assert (rw_diff.st_mode, rw_diff.st_uid, rw_diff.st_gid) == (shared_diff.st_mode, shared_diff.st_uid,
                                                                  shared_diff.st_gid)
    assert os.listdir(rw_etc) == ["new.conf"]  # the directory is copied up, not its content
    new = os.stat(rw_etc / "new.conf")
    assert stat.S_IMODE(new.st_mode) == 0o640 and (new.st_uid, new.st_gid) == NEW_OWNER
    assert sorted(names(ns, isulad.diff(base, "etc"))) == ["new.conf", "os-release"]
    assert [s.origin for s in ns.resolve(isulad.diff(base, "etc")).sources] == ["rw", f"ro:{isulad.share}"]
    assert ns.resolve(isulad.diff(base, "etc", "os-release")).origin == f"ro:{isulad.share}"
    # mkdir deeper down: same rule, the new directory gets the mode asked for
    ns.mkdir(isulad.diff(isulad.ids.web, "srv", "sub"), 0o750, UID, GID)
    rw_srv = isulad.rw / "overlay" / isulad.ids.web / "diff" / "srv"
    shared_srv = os.stat(isulad.share_diff(isulad.ids.web, "srv"))
    assert stat.S_IMODE(os.stat(rw_srv).st_mode) == stat.S_IMODE(shared_srv.st_mode)
    assert stat.S_IMODE(os.stat(rw_srv / "sub").st_mode) == 0o750
    # a name the share already shows is taken
    assert errno_of(ns.mkdir, isulad.diff(base, "etc"), 0o755, UID, GID) == errno.EEXIST
    assert errno_of(ns.create, isulad.diff(base, "bin", "hello"), 0o644, os.O_WRONLY, UID, GID) == errno.EEXIST


def test_opening_a_shared_file_for_writing_copies_it_up(isulad: IsuladNode) -> None:
    ns, base = isulad.ns, isulad.ids.base
    release = isulad.diff(base, "etc", "os-release")
    rw_release = isulad.rw / "overlay" / base / "diff" / "etc" / "os-release"
    fd, in_rw = ns.open(release, os.O_RDONLY)
    os.close(fd)
    assert not in_rw and not rw_release.exists()  # reading copies nothing
    with pytest.raises(NeedsCopyUp):
        ns.open(release, os.O_RDWR, copy_up=False)
    assert not rw_release.exists()
    fd, in_rw = ns.open(release, os.O_RDWR)
    try:
        assert in_rw and os.read(fd, 100) == b"NAME=demo\n"
        st = os.fstat(fd)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, *RELEASE_OWNER)
        assert st.st_mtime_ns == 1_600_000_000_000_000_000
        os.write(fd, b"VERSION=2\n")
    finally:
        os.close(fd)
    assert ns.resolve(release).origin == "rw"
    assert read_view(ns, release) == b"NAME=demo\nVERSION=2\n"
    assert isulad.share_diff(base, "etc", "os-release").read_bytes() == b"NAME=demo\n"
    # a truncating open copies up without the data
    index = isulad.diff(isulad.ids.web, "srv", "index.html")
    fd, in_rw = ns.open(index, os.O_WRONLY | os.O_TRUNC)
    try:
        assert in_rw and os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert read_view(ns, index) == b"new"
    assert isulad.share_diff(isulad.ids.web, "srv", "index.html").read_bytes() == b"<h1>web</h1>\n"
    # an explicit copy-up (a metadata change) copies data and metadata; a quick one (the trio
    # thread's) copies nothing and says a worker must
    with pytest.raises(NeedsCopyUp):
        ns.copy_up(isulad.diff(base, "bin", "hello"), quick=True)
    assert ns.copy_up(index, quick=True) == str(isulad.rw / "overlay" / isulad.ids.web / "diff" / "srv" / "index.html")
    hello = ns.copy_up(isulad.diff(base, "bin", "hello"))
    assert Path(hello).read_bytes() == b"hi\n" and hello.startswith(str(isulad.rw))
    assert os.stat(hello).st_mtime_ns == os.stat(isulad.share_diff(base, "bin", "hello")).st_mtime_ns


def test_unlink_and_rmdir_of_shared_entries_record_persistent_hides(isulad: IsuladNode) -> None:
    ns, ids = isulad.ns, isulad.ids
    hello = isulad.diff(ids.base, "bin", "hello")
    ns.unlink(hello)
    with pytest.raises(FileNotFoundError):
        ns.resolve(hello)
    assert names(ns, isulad.diff(ids.base, "bin")) == ["sh"]
    assert isulad.share_diff(ids.base, "bin", "hello").read_bytes() == b"hi\n"
    assert not (isulad.rw / "overlay" / ids.base / "diff" / "bin" / "hello").exists()  # a hide, not a whiteout file
    # rm -rf of a shared directory, then mkdir: the new directory is opaque
    etc = isulad.diff(ids.base, "etc")
    assert errno_of(ns.rmdir, etc) == errno.ENOTEMPTY
    assert errno_of(ns.unlink, etc) == errno.EISDIR
    ns.unlink((*etc, "os-release"))
    ns.rmdir(etc)
    assert "etc" not in names(ns, isulad.diff(ids.base))
    ns.mkdir(etc, 0o755, UID, GID)
    assert names(ns, etc) == [] and len(ns.resolve(etc).sources) == 1
    # removing a whole shared image: the node no longer lists it
    image = ("overlay-images", ids.image_web)
    for name in names(ns, image):
        ns.unlink((*image, name))
    ns.rmdir(image)
    assert names(ns, ("overlay-images",)) == [ids.image_app]
    assert (isulad.share / "overlay-images" / ids.image_web / "images.json").is_file()
    assert f"overlay-images/{ids.image_web}" in ns.status().hidden
    # a new mount of the same RW tree reads the hides back
    again = reopened(ns)
    for gone in (hello, (*etc, "os-release"), image):
        with pytest.raises(FileNotFoundError):
            again.resolve(gone)
    assert names(again, etc) == [] and names(again, ("overlay-images",)) == [ids.image_app]
    # a hidden name can be created again: it is the node's own from then on
    write_new(again, hello, b"mine\n")
    assert again.resolve(hello).origin == "rw" and read_view(again, hello) == b"mine\n"
    assert sorted(names(again, isulad.diff(ids.base, "bin"))) == ["hello", "sh"]


def test_a_quick_change_never_waits_for_another_threads_change(isulad: IsuladNode) -> None:
    """The trio thread runs unlink and rmdir itself (Namespace.unless_busy) but must not wait
    for a worker that holds the mutation lock (through an fsync, a copy-up's rename): Busy, and
    the change is left to a worker."""
    ns, ids = isulad.ns, isulad.ids
    hello = isulad.diff(ids.base, "bin", "hello")
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with ns._mutating:  # as a worker in the middle of a change
            holding.set()
            done.wait(10)

    worker = threading.Thread(target=hold)
    worker.start()
    try:
        assert holding.wait(10)
        with pytest.raises(Busy):
            ns.unless_busy(ns.unlink_entry, hello)
        assert ns.resolve(hello).origin != "rw"  # nothing changed
    finally:
        done.set()
        worker.join(10)
    assert ns.unless_busy(ns.unlink_entry, hello) is None  # a shared file: hidden, nothing to discard
    with pytest.raises(FileNotFoundError):
        ns.resolve(hello)


def test_renaming_a_shared_entry_away_hides_its_old_name(isulad: IsuladNode) -> None:
    ns, ids = isulad.ns, isulad.ids
    html, moved = isulad.diff(ids.web, "srv", "index.html"), isulad.diff(ids.local, "moved.html")
    ns.rename(html, moved)
    with pytest.raises(FileNotFoundError):
        ns.resolve(html)
    assert names(ns, isulad.diff(ids.web, "srv")) == []
    assert ns.resolve(moved).origin == "rw" and read_view(ns, moved) == b"<h1>web</h1>\n"
    assert ns.hides.covers(html) and reopened(ns).hides.covers(html)
    # a shared symlink moves as a symlink
    sh = isulad.diff(ids.base, "bin", "sh")
    ns.rename(sh, isulad.diff(ids.local, "sh"))
    assert ns.readlink(isulad.diff(ids.local, "sh")) == "hello"
    assert stat.S_ISLNK(os.lstat(isulad.rw / "overlay" / ids.local / "diff" / "sh").st_mode)
    assert "sh" not in names(ns, isulad.diff(ids.base, "bin"))
    # a directory with shared content is not moved in place (EXDEV: mv copies and deletes)
    assert errno_of(ns.rename, isulad.diff(ids.base, "etc"), isulad.diff(ids.local, "etc")) == errno.EXDEV
    assert "etc" in names(ns, isulad.diff(ids.base))
    # no replace: a shared name counts as taken
    write_new(ns, isulad.diff(ids.local, "tmp", "f"), b"f")
    hello = isulad.diff(ids.base, "bin", "hello")
    assert errno_of(ns.rename, isulad.diff(ids.local, "tmp", "f"), hello, RENAME_NOREPLACE) == errno.EEXIST
    # exchange with a shared file: both copied up, swapped; the share keeps its version
    data = isulad.diff(ids.app, "app", "data.txt")
    ns.rename(isulad.diff(ids.local, "tmp", "f"), data, RENAME_EXCHANGE)
    assert read_view(ns, data) == b"f" and read_view(ns, isulad.diff(ids.local, "tmp", "f")) == b"application data\n"
    assert ns.resolve(data).origin == "rw"


def test_rw_entry_renamed_over_a_shared_one_replaces_it(isulad: IsuladNode, guard: ShareGuard) -> None:
    ns, base = isulad.ns, isulad.ids.base
    release = isulad.diff(base, "etc", "os-release")
    write_new(ns, isulad.diff(isulad.ids.local, "tmp", "release"), b"NAME=mine\n")
    ns.rename(isulad.diff(isulad.ids.local, "tmp", "release"), release)
    res = ns.resolve(release)
    assert [s.origin for s in res.sources] == ["rw"] and ns.hides.covers(release)
    assert read_view(ns, release) == b"NAME=mine\n"
    # a directory over a shared (empty) directory: one directory, not a merge
    new_dir = isulad.diff(isulad.ids.local, "new.d")
    ns.mkdir(new_dir, 0o755, UID, GID)
    write_new(ns, (*new_dir, "a"), b"a")
    ns.rename(new_dir, isulad.diff(base, "empty.d"))
    assert [s.origin for s in ns.resolve(isulad.diff(base, "empty.d")).sources] == ["rw"]
    (isulad.share_diff(base, "empty.d") / "late").write_text("late\n")
    guard.watch(str(isulad.share))
    assert names(ns, isulad.diff(base, "empty.d")) == ["a"]
    assert names(reopened(ns), isulad.diff(base, "empty.d")) == ["a"]


def test_links_symlinks_and_device_nodes_land_in_rw(isulad: IsuladNode) -> None:
    ns, ids = isulad.ns, isulad.ids
    rw_diff = isulad.rw / "overlay" / ids.local / "diff"
    ns.link(isulad.diff(ids.base, "bin", "hello"), isulad.diff(ids.local, "hardlink"))
    copied = isulad.rw / "overlay" / ids.base / "diff" / "bin" / "hello"
    assert copied.is_file() and os.stat(copied).st_ino == os.stat(rw_diff / "hardlink").st_ino
    assert ns.resolve(isulad.diff(ids.local, "hardlink")).attr.nlink == 2
    assert os.stat(isulad.share_diff(ids.base, "bin", "hello")).st_nlink == 1
    assert read_view(ns, isulad.diff(ids.local, "hardlink")) == b"hi\n"
    ns.symlink(isulad.diff(ids.base, "bin", "link"), "../etc/os-release", UID, GID)
    assert os.readlink(isulad.rw / "overlay" / ids.base / "diff" / "bin" / "link") == "../etc/os-release"
    assert ns.readlink(isulad.diff(ids.base, "bin", "link")) == "../etc/os-release"
    wh = ns.mknod(isulad.diff(ids.base, "wh"), stat.S_IFCHR | 0o600, os.makedev(0, 0), UID, GID)
    assert wh.origin == "rw" and stat.S_ISCHR(wh.attr.mode) and wh.attr.rdev == 0
    assert stat.S_ISCHR(os.lstat(isulad.rw / "overlay" / ids.base / "diff" / "wh").st_mode)
    ns.mknod(isulad.diff(ids.local, "fifo"), stat.S_IFIFO | 0o644, 0, UID, GID)
    assert stat.S_ISFIFO(os.lstat(rw_diff / "fifo").st_mode)
    assert errno_of(ns.symlink, isulad.diff(ids.base, "bin", "hello"), "x", UID, GID) == errno.EEXIST
    assert errno_of(ns.link, isulad.diff(ids.base, "etc"), isulad.diff(ids.local, "etc")) == errno.EPERM


def test_entry_directories_are_answered_from_the_scan(isulad: IsuladNode, guard: ShareGuard) -> None:
    """What the view knows of a shared entry's directories never waits on the share (a hung one
    would not answer): a layer's overlay and record directories and an image's, as scanned."""
    ns, ids = isulad.ns, isulad.ids
    entries = [("overlay", ids.web), ("overlay-layers", ids.web), ("overlay-images", ids.image_web)]
    before = {vpath: ns.resolve(vpath).attr for vpath in entries}
    for vpath in entries:
        assert before[vpath].mtime_ns == os.lstat(isulad.share.joinpath(*vpath)).st_mtime_ns
        os.utime(isulad.share.joinpath(*vpath), ns=(10**9, 10**9))  # behind graftfs' back
    guard.watch(str(isulad.share))
    assert {vpath: ns.resolve(vpath).attr for vpath in entries} == before


def test_unavailable_share_keeps_its_last_view_and_rw_stays_reachable(isulad: IsuladNode, tmp_path: Path) -> None:
    ns, ids, live = isulad.ns, isulad.ids, isulad.layout.live
    data = isulad.diff(ids.app, "app", "data.txt")
    own_log = isulad.diff(ids.local, "tmp", "container-output.log")
    away = tmp_path / "share-away"
    os.rename(isulad.share, away)  # the share's mount is gone
    try:
        poll(live)
        assert not live.available(0)
        assert {"overlay", "overlay-layers", "overlay-images"} <= set(names(ns, ()))
        assert set(names(ns, ("overlay-images",))) == {ids.image_app, ids.image_web}
        assert {ids.base, ids.app, ids.web, ids.local} <= set(names(ns, ("overlay",)))
        assert ns.resolve(("overlay-images", ids.image_app)).is_dir  # still listed entries ...
        assert ns.resolve(("overlay-layers", ids.app)).is_dir  # (`ls -l overlay-layers` answers)
        assert errno_of(ns.resolve, data) == errno.EIO  # ... whose content is out of reach, not deleted
        assert errno_of(ns.open, data, os.O_RDONLY) == errno.EIO
        assert errno_of(ns.resolve, ("overlay-images", ids.image_app, "manifest")) == errno.EIO
        assert read_view(ns, own_log) == b"written by a container\n"
        write_new(ns, isulad.diff(ids.local, "tmp", "new"), b"new\n")
        assert read_view(ns, isulad.diff(ids.local, "tmp", "new")) == b"new\n"
    finally:
        os.rename(away, isulad.share)
    poll(live)
    assert live.available(0) and read_view(ns, data) == b"application data\n"


# -- the containers-storage layout ----------------------------------------------------------


@dataclass
class CsNode:
    ns: Namespace
    layout: ContainersStorageLayout
    live: LiveCatalog
    share: Path
    rw: Path
    ids: dict[str, str]
    guard: ShareGuard

    def merged(self, vpath: VPath, pid: int = 0) -> list[Record]:
        """The merged index file as process ``pid`` reads it."""
        out = json.loads(read_view(self.ns, vpath, pid))
        assert isinstance(out, list)
        return out

    def ids_in(self, vpath: VPath) -> list[str]:
        return [str(r["id"]) for r in self.merged(vpath, pid=1)]

    def own(self, vpath: VPath) -> list[Record]:
        """The node's part: its RW file."""
        out = json.loads(self.rw.joinpath(*vpath).read_text())
        assert isinstance(out, list)
        return out

    def shared(self, kind: str, eid: str) -> Record:
        record = "layer.json" if kind == "overlay-layers" else "images.json"
        out = json.loads((self.share / kind / eid / record).read_text())
        assert isinstance(out, dict)
        return out

    def rewrite(self, vpath: VPath, content: list[Record] | bytes, pid: int) -> None:
        """What containers/storage does: a temp file beside the index, renamed over it."""
        tmp = (vpath[0], f".tmp-{vpath[1]}-{pid}")
        write_new(self.ns, tmp, content if isinstance(content, bytes) else json.dumps(content).encode(), 0o600)
        self.ns.rename(tmp, vpath, 0, pid)
        assert not self.rw.joinpath(*tmp).exists()

    def published(self) -> None:
        """The share was changed on purpose: poll it, and take its new snapshot."""
        poll(self.live)
        self.guard.watch(str(self.share))


def make_cs_node(tmp_path: Path, guard: ShareGuard, direct: bool = False) -> CsNode:
    """A share with two images (image_b on image_a's layers, per-entry records and tar-splits of
    base0 and app), and a node whose own layers.json holds one layer on base1 and one image."""
    share, rw = tmp_path / "share", tmp_path / "rw"
    share.mkdir()
    (share / MARKER_NAME).write_text("graftfs share v1\n")
    base = chain("cs-base", 2)
    image_a = publish_sample_image(str(share), "cs/a:1", base)
    app = chain("cs-app", 1, parent=base[-1].id)
    image_b = publish_sample_image(str(share), "cs/b:1", app)
    for layer in (base[0], app[0]):
        tar_split = share / "overlay-layers" / layer.id / f"{layer.id}.tar-split.gz"
        tar_split.write_bytes(b"tar-split " + layer.id.encode())
    ids = {"base0": base[0].id, "base1": base[1].id, "app": app[0].id, "image_a": image_a, "image_b": image_b,
           "local_layer": digest("layer:cs-local"), "local_image": digest("image:cs-local")}
    for d in ("overlay-layers", "overlay-images", f"overlay/{ids['local_layer']}/diff", STATE_DIR):
        (rw / d).mkdir(parents=True)
    (rw / "overlay-layers" / "layers.json").write_text(json.dumps([{"id": ids["local_layer"], "parent": ids["base1"]}]))
    (rw / "overlay-layers" / f"{ids['local_layer']}.tar-split.gz").write_bytes(b"local tar-split")
    (rw / "overlay-images" / "images.json").write_text(json.dumps([{"id": ids["local_image"],
                                                                   "layer": ids["local_layer"]}]))
    guard.watch(str(share))
    live = containers_storage_catalog([str(share)], str(rw), ensure_pin_tree(str(rw)))
    layout = ContainersStorageLayout(live, str(rw), direct=direct)
    live.refresh()
    ns = Namespace(str(rw), layout, hide_store(str(rw / STATE_DIR)))
    return CsNode(ns, layout, live, share, rw, ids, guard)


@pytest.fixture
def cs(tmp_path: Path, guard: ShareGuard) -> CsNode:
    return make_cs_node(tmp_path, guard)


def test_merged_layers_json_is_visible_shared_records_then_own_ones(cs: CsNode) -> None:
    ids, ns = cs.ids, cs.ns
    own = cs.own(LAYERS_JSON)
    merged = cs.merged(LAYERS_JSON)
    assert merged[-len(own):] == own
    shared = {str(r["id"]): r for r in merged[: -len(own)]}
    assert len(shared) == len(merged) - len(own) == 3
    assert shared == {lid: cs.shared("overlay-layers", lid) for lid in (ids["base0"], ids["base1"], ids["app"])}
    res = ns.resolve(LAYERS_JSON)
    assert res.origin == "merged" and res.attr.size == len(read_view(ns, LAYERS_JSON))
    assert stat.S_ISREG(res.attr.mode)
    # the merged file is replaced by renaming a new one over it, never written in place
    assert errno_of(ns.open, LAYERS_JSON, os.O_RDWR) == errno.EPERM
    assert errno_of(ns.copy_up, LAYERS_JSON) == errno.EPERM
    # a layer the node holds itself is listed once: the node's record
    mine = {"id": ids["base0"], "parent": "", "names": ["the node's own copy"]}
    (cs.rw / "overlay-layers" / "layers.json").write_text(json.dumps([*own, mine]))
    merged = cs.merged(LAYERS_JSON)
    assert merged[-len(own) - 1:] == [*own, mine]
    assert [r["id"] for r in merged].count(ids["base0"]) == 1
    # a hidden shared layer is left out
    ns.hides.add(("overlay-layers", ids["app"]))
    assert ids["app"] not in cs.ids_in(LAYERS_JSON) and ids["base1"] in cs.ids_in(LAYERS_JSON)


def test_a_rewrite_of_what_was_read_with_records_appended_is_the_composed_file(cs: CsNode) -> None:
    """The runtime writes back the records it read, in their order and in Go's encoding, with
    its new ones appended: the file composed after the split-back is that file byte for byte (so
    the file renamed into place is what the view shows, and the kernel keeps its inode)."""
    for vpath, new in ((LAYERS_JSON, {"id": digest("layer:appended"), "parent": cs.ids["local_layer"],
                                      "names": ["<a> & b"]}),
                       (IMAGES_JSON, {"id": digest("image:appended"), "layer": cs.ids["local_layer"]})):
        read = read_view(cs.ns, vpath, 7)
        records = json.loads(read)
        assert read == go_json(records)  # the encoding a Go runtime reads and writes
        written = go_json([*records, new])
        cs.rewrite(vpath, written, 7)
        assert read_view(cs.ns, vpath, 7) == written
        assert cs.own(vpath)[-1] == new  # the split-back kept it as the node's own
        cs.rewrite(vpath, go_json(records), 7)  # and removed again
        assert read_view(cs.ns, vpath, 7) == read


def test_shared_layer_whose_parent_is_hidden_is_not_listed(cs: CsNode) -> None:
    ids = cs.ids
    cs.ns.hides.add(("overlay-layers", ids["base1"]))
    assert cs.ids_in(LAYERS_JSON) == [ids["base0"], ids["local_layer"]]  # app sits on base1
    # the images on those layers cannot be used here; the node's own image stays
    assert cs.ids_in(IMAGES_JSON) == [ids["local_image"]]


def test_images_json_leaves_out_images_whose_top_layer_is_not_usable(cs: CsNode) -> None:
    ids = cs.ids
    on_local, dangling = digest("image:cs-on-local"), digest("image:cs-dangling")
    write_image(str(cs.share), on_local, ids["local_layer"], ["cs/on-local:1"])  # on the node's own layer
    write_image(str(cs.share), dangling, digest("layer:cs-nowhere"), ["cs/dangling:1"])
    cs.published()
    images = cs.merged(IMAGES_JSON)
    assert images[-1] == cs.own(IMAGES_JSON)[0]
    assert {str(r["id"]) for r in images[:-1]} == {ids["image_a"], ids["image_b"], on_local}
    assert {str(r["id"]): r for r in images}[on_local] == cs.shared("overlay-images", on_local)
    cs.ns.hides.add(("overlay-layers", ids["app"]))
    assert set(cs.ids_in(IMAGES_JSON)) == {ids["local_image"], ids["image_a"], on_local}
    cs.ns.hides.add(("overlay-images", ids["image_a"]))
    assert set(cs.ids_in(IMAGES_JSON)) == {ids["local_image"], on_local}


def test_a_name_belongs_to_one_image_the_newest(cs: CsNode) -> None:
    ids = cs.ids
    old, new = digest("image:cs-dup-old"), digest("image:cs-dup-new")
    for iid, created in ((old, "2026-11-01T00:00:00Z"), (new, "2026-11-20T00:00:00Z")):
        record = {"id": iid, "layer": ids["app"], "names": ["localhost/dup:1", f"localhost/{iid[:8]}:1"],
                  "created": created}
        write_image(str(cs.share), iid, ids["app"], [], record=json.dumps(record).encode())
    # the node's own image and a shared one with the same name and time: the node's own keeps it
    tied = digest("image:cs-tied")
    created = "2026-11-10T00:00:00Z"
    tied_record = {"id": tied, "layer": ids["app"], "names": ["localhost/tie:1", "localhost/tied:1"],
                   "created": created}
    write_image(str(cs.share), tied, ids["app"], [], record=json.dumps(tied_record).encode())
    own_image = {"id": ids["local_image"], "layer": ids["local_layer"], "names": ["localhost/tie:1"],
                 "created": created}
    (cs.rw / "overlay-images" / "images.json").write_text(json.dumps([own_image]))
    cs.published()
    images = {str(r["id"]): r for r in cs.merged(IMAGES_JSON)}
    assert images[new]["names"] == ["localhost/dup:1", f"localhost/{new[:8]}:1"]
    assert images[old]["names"] == [f"localhost/{old[:8]}:1"]  # the tag moved to the newer image
    assert images[ids["local_image"]]["names"] == ["localhost/tie:1"]
    assert images[tied]["names"] == ["localhost/tied:1"]
    assert "localhost/dup:1" in record_names(cs.shared("overlay-images", old))  # nothing rewritten on disk
    all_names = [n for r in images.values() for n in record_names(r)]
    assert len(all_names) == len(set(all_names))


def test_a_record_caught_mid_rewrite_keeps_its_entry_for_one_more_poll(cs: CsNode) -> None:
    """A record rewritten in place is empty or partial for a moment: a poll that reads it then
    keeps showing the entry as it last checked good, and the next poll decides (the new record,
    or, still broken, the entry skipped and reported as any broken one)."""
    iid = cs.ids["image_b"]
    record = cs.share / "overlay-images" / iid / "images.json"
    good = json.loads(record.read_text())
    record.write_text('{"id": "')  # truncated and half written, as a poll may find it
    cs.published()
    assert iid in cs.ids_in(IMAGES_JSON)
    assert iid not in {s["id"] for s in cs.ns.status().layout.skipped}
    record.write_text(json.dumps({**good, "names": ["cs/b:2"]}))  # the write completes
    cs.published()
    assert {str(r["id"]): r for r in cs.merged(IMAGES_JSON)}[iid]["names"] == ["cs/b:2"]
    record.write_text("{")  # and a record that stays broken
    cs.published()
    assert iid in cs.ids_in(IMAGES_JSON)
    # a scan saved meanwhile (at unmount) makes the next mount check the entry again
    scan = next(t.scan for t in cs.live.shared if iid in t.scan.images)
    loaded = scan_from_json(scan.root, json.loads(json.dumps(scan_to_json(scan))))
    key = ("image", iid)
    assert key in scan.provisional and not loaded.provisional
    assert entry_sig(loaded.entry_paths(key)) != loaded.sigs[key]  # what the first sweep compares
    cs.published()
    assert iid not in cs.ids_in(IMAGES_JSON)
    assert iid in {s["id"] for s in cs.ns.status().layout.skipped}


def test_rewrite_keeping_shared_records_keeps_them_out_of_rw(cs: CsNode) -> None:
    ids, pid = cs.ids, 101
    own = cs.own(LAYERS_JSON)
    current = cs.merged(LAYERS_JSON, pid)
    new_layer: Record = {"id": digest("layer:cs-new"), "parent": ids["local_layer"]}
    cs.rewrite(LAYERS_JSON, [*current, new_layer], pid)
    assert cs.own(LAYERS_JSON) == [*own, new_layer]  # shared records stay shared
    assert cs.merged(LAYERS_JSON) == [*current, new_layer]
    new_image: Record = {"id": digest("image:cs-new"), "layer": new_layer["id"], "names": ["cs/new:1"]}
    images = cs.merged(IMAGES_JSON, pid)
    cs.rewrite(IMAGES_JSON, [*images, new_image], pid)
    assert cs.own(IMAGES_JSON) == [images[-1], new_image]
    assert {str(r["id"]) for r in cs.merged(IMAGES_JSON)} == {ids["local_image"], new_image["id"], ids["image_a"],
                                                               ids["image_b"]}
    assert len(cs.ns.hides) == 0


def test_rewrite_dropping_a_shared_record_the_writer_read_hides_it(cs: CsNode) -> None:
    ids = cs.ids
    reader, stranger, other_file = 202, 303, 404
    current = cs.merged(LAYERS_JSON, reader)
    without = {lid: [r for r in current if r["id"] != lid] for lid in (ids["base0"], ids["app"])}
    # a process that never read layers.json cannot have meant to delete what it did not write
    cs.merged(IMAGES_JSON, other_file)
    for pid in (stranger, other_file):
        cs.rewrite(LAYERS_JSON, without[ids["base0"]], pid)
        assert len(cs.ns.hides) == 0 and ids["base0"] in cs.ids_in(LAYERS_JSON)
        assert cs.own(LAYERS_JSON) == [{"id": ids["local_layer"], "parent": ids["base1"]}]
    # the process that read it drops the app layer: hidden on this node only
    cs.rewrite(LAYERS_JSON, without[ids["app"]], reader)
    assert cs.ns.hides.covers(("overlay-layers", ids["app"]))
    assert ids["app"] not in cs.ids_in(LAYERS_JSON)
    assert ids["image_b"] not in cs.ids_in(IMAGES_JSON)  # its top layer is gone here
    assert cs.own(LAYERS_JSON) == [{"id": ids["local_layer"], "parent": ids["base1"]}]
    assert cs.shared("overlay-layers", ids["app"])["id"] == ids["app"]
    # an image dropped from images.json: hidden, its record directory too
    images = cs.merged(IMAGES_JSON, reader)
    cs.rewrite(IMAGES_JSON, [r for r in images if r["id"] != ids["image_a"]], reader)
    assert cs.ids_in(IMAGES_JSON) == [ids["local_image"]]
    with pytest.raises(FileNotFoundError):
        cs.ns.resolve(("overlay-images", ids["image_a"], "images.json"))
    again = reopened(cs.ns)
    assert again.hides.covers(("overlay-layers", ids["app"])) and again.hides.covers(("overlay-images", ids["image_a"]))
    assert [str(r["id"]) for r in json.loads(read_view(again, LAYERS_JSON))] == cs.ids_in(LAYERS_JSON)


def test_record_published_after_the_writers_read_is_not_hidden(cs: CsNode) -> None:
    ids, pid = cs.ids, 505
    layers, images = cs.merged(LAYERS_JSON, pid), cs.merged(IMAGES_JSON, pid)
    late_layer = SampleLayer(digest("layer:cs-late"), ids["base1"], {"late": b"1"})
    late_image = publish_sample_image(str(cs.share), "cs/late:1", [late_layer])
    cs.published()
    assert late_layer.id in cs.ids_in(LAYERS_JSON) and late_image in cs.ids_in(IMAGES_JSON)
    # the writer saves what it read (without the late entries), minus the app layer, plus its own
    new_layer: Record = {"id": digest("layer:cs-new2"), "parent": ids["local_layer"]}
    cs.rewrite(LAYERS_JSON, [*[r for r in layers if r["id"] != ids["app"]], new_layer], pid)
    cs.rewrite(IMAGES_JSON, images, pid)
    assert not cs.ns.hides.covers(("overlay-layers", late_layer.id))
    assert not cs.ns.hides.covers(("overlay-images", late_image))
    assert cs.ns.hides.covers(("overlay-layers", ids["app"]))  # read, then dropped: deleted
    after = cs.ids_in(LAYERS_JSON)
    assert late_layer.id in after and new_layer["id"] in after and ids["app"] not in after
    assert late_image in cs.ids_in(IMAGES_JSON)


def test_rewrite_with_a_changed_shared_record_keeps_it_in_rw(cs: CsNode) -> None:
    ids, pid = cs.ids, 606
    current = cs.merged(LAYERS_JSON, pid)
    changed = {**cs.shared("overlay-layers", ids["app"]), "names": ["renamed by the runtime"]}
    cs.rewrite(LAYERS_JSON, [changed if r["id"] == ids["app"] else r for r in current], pid)
    own = cs.own(LAYERS_JSON)
    assert own == [changed, {"id": ids["local_layer"], "parent": ids["base1"]}]  # in the order written
    merged = cs.merged(LAYERS_JSON)
    assert merged[-2:] == own and [r["id"] for r in merged].count(ids["app"]) == 1
    assert not cs.ns.hides.covers(("overlay-layers", ids["app"]))
    assert cs.shared("overlay-layers", ids["app"])["names"] == []  # the share keeps its record


def test_rewrite_that_does_not_parse_is_kept_as_written(cs: CsNode) -> None:
    pid = 707
    cs.merged(LAYERS_JSON, pid)
    cs.rewrite(LAYERS_JSON, b'[{"id": "truncated', pid)
    assert (cs.rw / "overlay-layers" / "layers.json").read_bytes() == b'[{"id": "truncated'
    assert len(cs.ns.hides) == 0  # nothing read into it: nothing dropped
    # the node's own records cannot be read: EIO, rather than the shared records alone (a
    # runtime saving those would drop the node's layers)
    assert errno_of(cs.ns.resolve, LAYERS_JSON) == errno.EIO
    assert errno_of(read_view, cs.ns, LAYERS_JSON) == errno.EIO
    (cs.rw / "overlay-layers" / "layers.json").write_text(json.dumps([{"id": cs.ids["local_layer"]}]))  # repaired
    assert cs.ids_in(LAYERS_JSON)[-1] == cs.ids["local_layer"] and len(cs.ids_in(LAYERS_JSON)) == 4


def test_tar_split_of_a_shared_layer_resolves_to_the_share(cs: CsNode) -> None:
    ids, ns = cs.ids, cs.ns
    listed = set(names(ns, ("overlay-layers",)))
    assert listed == {"layers.json", f"{ids['local_layer']}.tar-split.gz", f"{ids['base0']}.tar-split.gz",
                      f"{ids['app']}.tar-split.gz"}  # base1 has none; no per-entry record dirs
    name = f"{ids['app']}.tar-split.gz"
    res = ns.resolve(("overlay-layers", name))
    assert res.origin == f"ro:{cs.share}" and res.top.path == str(cs.share / "overlay-layers" / ids["app"] / name)
    assert read_view(ns, ("overlay-layers", name)) == b"tar-split " + ids["app"].encode()
    assert read_view(ns, ("overlay-layers", f"{ids['local_layer']}.tar-split.gz")) == b"local tar-split"
    for absent in ((ids["app"],), (ids["app"], "layer.json"), (f"{ids['base1']}.tar-split.gz",),
                   (f"{digest('layer:unknown')}.tar-split.gz",)):
        with pytest.raises(FileNotFoundError):
            ns.resolve(("overlay-layers", *absent))
    # the image record directories do show (the runtime reads big-data files from them)
    assert "manifest" in names(ns, ("overlay-images", ids["image_a"]))
    assert set(names(ns, ("overlay-images",))) == {"images.json", ids["image_a"], ids["image_b"]}


def test_direct_layer_dirs_are_links_to_their_backing_dir(tmp_path: Path, guard: ShareGuard) -> None:
    cs = make_cs_node(tmp_path, guard, direct=True)
    ns, ids = cs.ns, cs.ids
    for name in ("diff", "work"):
        res = ns.resolve(("overlay", ids["app"], name))
        target = str(cs.share / "overlay" / ids["app"] / name)
        assert res.top.direct and stat.S_ISLNK(res.attr.mode) and res.top.link_target == target
        assert ns.readlink(("overlay", ids["app"], name)) == target
    assert ns.readlink(("overlay", ids["local_layer"], "diff")) == str(cs.rw / "overlay" / ids["local_layer"] / "diff")
    assert not ns.resolve(("overlay", ids["app"], "link")).top.direct  # only diff/ and work/
    assert ns.resolve(("overlay", ids["app"], "diff"), direct=False).is_dir  # what mkdir answers
    assert errno_of(ns.copy_up, ("overlay", ids["app"], "diff")) == errno.EPERM
    # RW holds part of the layer (a copy-up into it): a merged directory, no link
    (cs.rw / "overlay" / ids["app"] / "diff" / "extra").mkdir(parents=True)
    merged = ns.resolve(("overlay", ids["app"], "diff"))
    assert merged.is_dir and not merged.top.direct and [s.origin for s in merged.sources] == ["rw", f"ro:{cs.share}"]
    assert sorted(names(ns, ("overlay", ids["app"], "diff"))) == ["cs-app", "extra"]
    # without direct the same directory is never a link
    plain_layout = ContainersStorageLayout(cs.live, str(cs.rw), direct=False)
    indirect = Namespace(str(cs.rw), plain_layout, cs.ns.hides)
    assert indirect.resolve(("overlay", ids["base0"], "diff")).is_dir
    assert not indirect.resolve(("overlay", ids["base0"], "diff")).top.direct


def test_share_snapshot_notices_a_change(tmp_path: Path) -> None:
    """The guard every test above relies on does see a write to a share."""
    share = tmp_path / "share"
    publish_sample_image(str(share), "g:1", chain("g", 1))
    guard = ShareGuard()
    guard.watch(str(share))
    assert guard.changes() == {}
    record = next((share / "overlay-layers").iterdir()) / "layer.json"
    st = os.stat(record)
    record.write_bytes(record.read_bytes().replace(b"2026", b"2027"))  # same size
    os.utime(record, ns=(st.st_atime_ns, st.st_mtime_ns))  # same times
    assert guard.changes() == {str(share): [os.path.relpath(record, share)]}
