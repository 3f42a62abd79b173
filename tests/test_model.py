"""The model without mounting: layout rules, the union namespace on plain directories, hides,
option parsing and the errno boundary. Fast, and runnable without root or /dev/fuse."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyfuse3
import pytest

from graftfs.catalog.catalog import build_catalog
from graftfs.catalog.scan import scan_tree
from graftfs.format.names import STATE_DIR
from graftfs.fuse.errors import BackingTimeout, fuse_boundary
from graftfs.fuse.workers import Workers
from graftfs.node.options import ConfigError, MountConfig
from graftfs.share.sample import SampleLayer, build_demo, digest, short_name, write_image, write_layer
from graftfs.view.hides import HideStore, compact
from graftfs.view.isulad import IsuladLayout, isulad_catalog
from graftfs.view.namespace import Namespace


@pytest.fixture
def demo(tmp_path: Path) -> tuple[Namespace, object, Path, Path]:
    share, rw = tmp_path / "share", tmp_path / "rw"
    ids = build_demo(str(share), str(rw))
    os.makedirs(rw / STATE_DIR)
    layout = IsuladLayout(isulad_catalog([str(share)], str(rw)))
    layout.live.refresh()
    return Namespace(str(rw), layout, HideStore(str(rw / STATE_DIR))), ids, share, rw


def test_scan_reports_each_incomplete_entry(tmp_path: Path) -> None:
    share = str(tmp_path)
    ok, no_diff, bad_id, marked = (digest(f"l:{n}") for n in ("ok", "nodiff", "badid", "marked"))
    write_layer(share, SampleLayer(ok, None, {"a": b"1"}))
    write_layer(share, SampleLayer(no_diff, None, {}))
    os.rmdir(os.path.join(share, "overlay", no_diff, "diff"))
    write_layer(share, SampleLayer(bad_id, None, {}), record=b'{"id": "' + ok.encode() + b'"}')
    write_layer(share, SampleLayer(marked, None, {}), record=b'{"id": "' + marked.encode() + b'", "incompleted": true}')
    os.makedirs(os.path.join(share, "overlay-layers", digest("l:recordless")))
    os.makedirs(os.path.join(share, "overlay", "not-an-id"))
    scan = scan_tree(share)
    assert set(scan.layers) == {ok}
    reasons = {p.id: p.reason for p in scan.problems}
    assert reasons[no_diff] == "overlay diff directory missing"
    assert "does not match its directory" in reasons[bad_id]
    assert reasons[marked] == "layer.json marks the layer incomplete"
    assert reasons[digest("l:recordless")] == "overlay directory missing"
    assert "not-an-id" not in reasons


def test_catalog_first_tree_wins_and_local_parents_count(tmp_path: Path) -> None:
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    shared = digest("l:shared")
    local_parent = digest("l:local")
    write_layer(first, SampleLayer(shared, None, {"x": b"first"}))
    write_layer(second, SampleLayer(shared, None, {"x": b"second"}))
    on_local = digest("l:on-local")
    write_layer(second, SampleLayer(on_local, local_parent, {}))
    write_image(second, digest("i:on-local"), on_local, ["x:1"])
    cat = build_catalog([scan_tree(first), scan_tree(second)], {local_parent})
    assert cat.layers[shared][0] == 0
    assert on_local in cat.layers and digest("i:on-local") in cat.images
    cat_without = build_catalog([scan_tree(first), scan_tree(second)], set())
    assert on_local not in cat_without.layers


def test_namespace_merge_hide_and_copy_up(demo: tuple[Namespace, object, Path, Path]) -> None:
    ns, ids, share, rw = demo
    base = ids.base  # type: ignore[attr-defined]
    res = ns.resolve(("overlay", base, "diff", "bin", "hello"))
    assert res.origin == f"ro:{share}" and res.ro_visible
    names = [n for n, _ in ns.listdir(("overlay", "l"))]
    assert short_name(base) in names and short_name(ids.broken) not in names  # type: ignore[attr-defined]
    ns.unlink(("overlay", base, "diff", "bin", "hello"))
    with pytest.raises(FileNotFoundError):
        ns.resolve(("overlay", base, "diff", "bin", "hello"))
    assert (share / "overlay" / base / "diff" / "bin" / "hello").exists()
    fd, in_rw = ns.open(("overlay", base, "diff", "etc", "os-release"), os.O_RDWR)
    os.close(fd)
    assert in_rw and (rw / "overlay" / base / "diff" / "etc" / "os-release").read_text() == "NAME=demo\n"
    with pytest.raises(OSError) as exc:
        ns.rmdir(("overlay", base, "diff", "etc"))
    assert exc.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileNotFoundError):
        ns.resolve((STATE_DIR,))
    with pytest.raises(PermissionError):
        ns.mkdir((STATE_DIR,), 0o755, 0, 0)


def test_hides_persist_compact_and_survive_a_torn_line(tmp_path: Path) -> None:
    store = HideStore(str(tmp_path))
    store.add(("a", "b", "c"))
    store.add(("a", "b"))
    store.add(("weird\nname", "\udcff"))
    store.close()
    with open(tmp_path / "hides.log", "a") as f:
        f.write('"x/y')  # a crash in the middle of an append
    again = HideStore(str(tmp_path))
    assert again.covers(("a", "b", "c", "d"))
    assert again.covers(("weird\nname", "\udcff"))
    assert not again.covers(("x", "y"))
    assert len(again) == 2
    assert compact({("a",), ("a", "b"), ("b",)}) == {("a",), ("b",)}


def test_options_parse_mount8_style() -> None:
    cfg = MountConfig("/mnt")
    cfg.add_options("rw=/r,ro=/a:/b,ro=/c,defaults,_netdev,x-systemd.requires=/x,nodev,timeout=3,layout=isulad")
    assert (cfg.rw, cfg.ro, cfg.timeout, cfg.layout) == ("/r", ["/a", "/b", "/c"], 3.0, "isulad")
    opts = cfg.fuse_option_set()
    assert "nodev" in opts and "dev" not in opts and "default_permissions" in opts
    for bad in ("frob", "timeout=-1", "mystery=1"):
        with pytest.raises(ConfigError):
            MountConfig("/mnt").add_options(bad)


async def test_errno_boundary_maps_everything_to_fuse_errors() -> None:
    @fuse_boundary
    async def raises(exc: BaseException) -> None:
        raise exc

    cases = [(FileNotFoundError(errno.ENOENT, "x"), errno.ENOENT), (ValueError("bug"), errno.EIO),
             (BackingTimeout("lstat", 1), errno.ETIMEDOUT), (pyfuse3.FUSEError(errno.EXDEV), errno.EXDEV),
             (OSError("no errno"), errno.EIO)]
    for exc, want in cases:
        with pytest.raises(pyfuse3.FUSEError) as got:
            await raises(exc)
        assert got.value.errno == want


async def test_workers_time_limit() -> None:
    import threading

    release = threading.Event()
    workers = Workers(timeout=0.2)
    with pytest.raises(BackingTimeout):
        await workers.run(release.wait, 5)
    release.set()
    assert await workers.run(sum, [1, 2]) == 3


def test_copy_up_publish_never_replaces_a_newer_rw_entry(tmp_path: Path) -> None:
    dst, tmp = tmp_path / "dst", tmp_path / "tmp"
    dst.write_text("written by the copy-up that won")
    tmp.write_text("stale copy of the shared file")
    Namespace._publish(str(tmp), str(dst))
    assert dst.read_text() == "written by the copy-up that won"
    Namespace._publish(str(tmp), str(tmp_path / "fresh"))
    assert (tmp_path / "fresh").read_text() == "stale copy of the shared file"


def test_inode_table_never_maps_below_a_removed_directory() -> None:
    from graftfs.fuse.inodes import InodeTable

    table = InodeTable()
    d = table.child(table.root, "d")
    x = table.child(d, "x")
    d.lookups = x.lookups = 1  # the kernel still holds both
    assert table.path(x.ino) == ("d", "x")
    table.move(table.root, "e", table.root, "d")  # "e" replaced "d": d and x left the view
    with pytest.raises(FileNotFoundError) as exc:
        table.path(x.ino)
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(FileNotFoundError):
        table.child(d, "late")
    moved = table.child(table.root, "m")
    kept = table.child(moved, "k")
    table.move(table.root, "m", table.root, "n")
    assert table.path(kept.ino) == ("n", "k") and kept.ino == table.child(table.root, "n").children["k"].ino


def test_overlapping_trees_are_refused(tmp_path: Path) -> None:
    for sub in ("mnt", "rw", "rw/share", "other"):
        (tmp_path / sub).mkdir()
    cfg = MountConfig(str(tmp_path / "mnt"), rw=str(tmp_path / "rw"), ro=[str(tmp_path / "rw" / "share")])
    with pytest.raises(ConfigError, match="overlap"):
        cfg.check()
    ok = MountConfig(str(tmp_path / "mnt"), rw=str(tmp_path / "rw"), ro=[str(tmp_path / "other")])
    ok.check()


def test_direct_layer_dirs_link_to_their_backing_directory(demo: tuple[Namespace, object, Path, Path]) -> None:
    ns, ids, share, rw = demo
    assert ns.layout.live is not None
    ns = Namespace(ns.rw_root, IsuladLayout(ns.layout.live, direct=True), ns.hides)
    base, local = ids.base, ids.local  # type: ignore[attr-defined]
    shared = ns.resolve(("overlay", base, "diff"))
    assert shared.top.direct and ns.readlink(("overlay", base, "diff")) == str(share / "overlay" / base / "diff")
    assert ns.readlink(("overlay", local, "diff")) == str(rw / "overlay" / local / "diff")
    assert ns.resolve(("overlay", base, "diff"), direct=False).is_dir  # what mkdir answers
    assert ns.resolve(("overlay", base, "link")).top.link_target is None  # only diff/ and work/
    # where RW holds part of a shared layer dir (a copy-up into it), the merge stays: a link
    # could show only one part
    os.makedirs(rw / "overlay" / base / "diff")
    merged = ns.resolve(("overlay", base, "diff"))
    assert merged.is_dir and len(merged.sources) == 2
    os.rmdir(rw / "overlay" / base / "diff")
    # a shared layer dir with something hidden below it is no longer the share's: merged, no link
    ns.hides.add(("overlay", ids.app, "diff", "app"))  # type: ignore[attr-defined]
    assert ns.resolve(("overlay", ids.app, "diff")).is_dir  # type: ignore[attr-defined]
    # unlinking the link: a shared layer is hidden, the node's own is deleted (moved aside first)
    ns.unlink(("overlay", base, "diff"))
    assert ns.hides.covers(("overlay", base, "diff")) and (share / "overlay" / base / "diff").is_dir()
    ns.unlink(("overlay", local, "diff"))
    assert not (rw / "overlay" / local / "diff").exists()
    with pytest.raises(FileNotFoundError):
        ns.resolve(("overlay", local, "diff"))
    # a shared layer dir is never changed through its link
    with pytest.raises(PermissionError):
        ns.copy_up(("overlay", ids.web, "diff"))  # type: ignore[attr-defined]
