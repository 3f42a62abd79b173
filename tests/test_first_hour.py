"""What an operator meets in the first hour, with real podman: the layout a fresh node gets, a
warning when the runtime writes the other layout, an empty share that is not a failure, and a
shared image deleted on one node given back with `graftfs unhide` (no remount)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import GraftMount, Sample, force_unmount, graftfs_cmd, layer_diff, wait_for
from test_podman import Node, busybox_tar, make_node, needs_mount, share  # noqa: F401  (fixtures)

pytestmark = [needs_mount, pytest.mark.timeout(240)]


def _publish(node: Node, share: str, image: str) -> None:
    res = graftfs_cmd("publish", "--graph", node.mount.mnt, "--share", share, image, timeout=120)
    assert res.returncode == 0, res.stderr


def _status_text(node: Node) -> str:
    res = graftfs_cmd("status", node.mount.mnt)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_a_fresh_node_gets_the_containers_storage_layout(make_node: Callable[..., Node], share: str,
                                                          busybox_tar: str) -> None:
    a = make_node("a", share)
    a.podman("import", busybox_tar, "localhost/app:1")
    _publish(a, share, "localhost/app:1")
    # node B: an empty RW tree, no --layout given (what the quick start of an operator does)
    b = make_node("b", share, "--layout", "auto")
    st = b.mount.status()
    assert st["layout"] == "containers-storage", st
    assert "RW tree is empty" in str(st["layout_reason"])
    assert "localhost/app:1" in b.images()
    assert b.podman("run", "--rm", "localhost/app:1", "echo", "runs").stdout == "runs\n"
    assert "RW tree is empty" in _status_text(b)
    assert not st["layout_warning"]


def test_a_runtime_writing_the_other_layout_is_reported(make_node: Callable[..., Node], share: str,
                                                        busybox_tar: str) -> None:
    b = make_node("b", share, "--layout", "isulad")
    b.podman("import", busybox_tar, "localhost/app:1")  # containers/storage writes its index files
    wait_for(lambda: b.mount.status().get("layout_warning"), 10, "the layout warning")
    warning = str(b.mount.status()["layout_warning"])
    assert "containers/storage" in warning and "layout=containers-storage" in warning, warning
    assert "WARNING: " + warning in _status_text(b)
    assert warning in b.mount.log_text()
    # and a layout chosen by auto follows what the runtime wrote, at the next mount
    b.mount.extra[b.mount.extra.index("isulad")] = "auto"
    b.mount.remount()
    assert b.mount.status()["layout"] == "containers-storage"
    assert "localhost/app:1" in b.images()


def test_an_empty_share_is_empty_not_failing(make_node: Callable[..., Node], share: str, busybox_tar: str) -> None:
    a = make_node("a", share, "-o", "lease=0.5")
    wait_for(lambda: _lease(a)["empty"], 10, "the empty share in the status")
    text = _status_text(a)
    assert "empty share (nothing published yet)" in text and "FAILING" not in text, text
    assert "cannot renew" not in a.mount.log_text()
    a.podman("import", busybox_tar, "localhost/app:1")
    _publish(a, share, "localhost/app:1")
    wait_for(lambda: _lease(a)["renewed_ago"] is not None, 10, "the lease after the first publish")
    assert not _lease(a)["empty"] and not _lease(a)["failing"]
    assert os.path.exists(os.path.join(share, ".graftfs-nodes"))


def _lease(node: Node) -> dict[str, object]:
    return _lease_of(node.mount)


def test_unhide_gives_a_deleted_shared_image_back(make_node: Callable[..., Node], share: str, busybox_tar: str,
                                                 tmp_path: Path) -> None:
    a = make_node("a", share)
    a.podman("import", busybox_tar, "localhost/base:1")
    a.podman("run", "--name", "build", "localhost/base:1", "sh", "-c", "echo two > /two.txt")
    a.podman("commit", "-q", "build", "localhost/app:1")
    _publish(a, share, "localhost/app:1")
    b = make_node("b", share)
    wait_for(lambda: "localhost/app:1" in b.images(), 10, "node B to list the image")
    b.podman("rmi", "localhost/app:1")
    assert "localhost/app:1" not in b.images()
    st = b.mount.status()
    hidden = st["hidden_images"]
    assert isinstance(hidden, list) and [h["names"] for h in hidden] == [["localhost/app:1"]], hidden
    assert hidden[0]["layers"] == 2 and st["hidden_layers"] == 2
    text = _status_text(b)
    assert f"image {hidden[0]['id'][:12]} localhost/app:1: 2 of its layers hidden" in text, text
    # publishing the same image again does not bring it back on B: B deleted it
    _publish(a, share, "localhost/app:1")
    assert "localhost/app:1" not in b.images()
    # mistakes get one line and exit 1
    bad = graftfs_cmd("unhide", b.mount.mnt, "nosuch:9")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "nosuch:9" in bad.stderr, bad.stderr
    res = graftfs_cmd("unhide", b.mount.mnt, "app:1")
    assert res.returncode == 0 and "shown on this node again" in res.stdout, res.stdout + res.stderr
    assert "localhost/app:1" in b.images()  # no remount
    assert b.podman("run", "--rm", "localhost/app:1", "cat", "/two.txt").stdout == "two\n"
    st = b.mount.status()
    assert st["hidden_images"] == [] and st["hidden_images_count"] == 0 and st["hidden_layers"] == 0, st["hidden"]
    # nothing of it was copied to B: its layers still come from the share
    links = [layer_diff(b.mount.mnt, lid) for lid in os.listdir(os.path.join(share, "overlay")) if len(lid) == 64]
    assert links and all(t.startswith(share) for t in links), links
    assert "localhost/app:1" in a.images()


def test_a_read_only_share_with_its_nodes_dir_writable(sample: Sample, mount_factory: Callable[..., GraftMount],
                                                       tmp_path: Path) -> None:
    """README's strict set-up: the share read-only on the node, its .graftfs-nodes/ read-write
    over it; the lease is written there and nothing else can be."""
    nodes = os.path.join(sample.share, ".graftfs-nodes")
    os.makedirs(nodes, exist_ok=True)
    over = os.path.join(sample.share_ro, ".graftfs-nodes")
    subprocess.run(["mount", "--bind", nodes, over], check=True, timeout=30)
    try:
        rw = tmp_path / "rw-empty"
        rw.mkdir()
        node = mount_factory(str(rw), [sample.share_ro], "--layout", "containers-storage", "-o", "lease=0.5")
        wait_for(lambda: _lease_of(node)["renewed_ago"] is not None, 10, "the lease")
        assert not _lease_of(node)["failing"]
        assert [d for d in os.listdir(nodes) if os.path.exists(os.path.join(nodes, d, "lease.json"))]
        with pytest.raises(OSError):  # the rest of the share stays read-only
            os.mkdir(os.path.join(sample.share_ro, "overlay", "x"))
        node.stop()
    finally:
        force_unmount(over)


def _lease_of(node: GraftMount) -> dict[str, object]:
    leases = node.status()["leases"]
    assert isinstance(leases, dict)
    return dict(next(iter(leases["shares"].values())))


#: The top-level fields README's "graftfs status --json: a stable interface" promises.
STATUS_FIELDS = ("status_version", "version", "pid", "mountpoint", "started", "time", "timeout", "cache_timeout",
                 "fuse_options", "inline_io", "layout", "layout_reason", "layout_warning", "rw", "ro",
                 "hidden_images", "hidden_images_count", "hidden_layers", "hidden", "hidden_count", "skipped",
                 "skipped_count", "watcher",
                 "leases", "pins", "cache", "autopublish", "requests", "bytes_read", "bytes_written", "inodes",
                 "open_files")


def test_the_status_json_has_what_readme_promises(make_node: Callable[..., Node], share: str) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### graftfs status --json: a stable interface", 1)[1].split("\n### ", 1)[0]
    a = make_node("a", share, "-o", "publish=auto,lease=0.5")
    st = a.mount.status()
    assert st["status_version"] == 1
    for field in STATUS_FIELDS:
        assert f"`{field}`" in section, f"README does not list {field}"
        assert field in st, f"the status has no {field}"
    # the graph's statfs is the node's own RW filesystem (what kubelet's image GC measures)
    graph, rw = os.statvfs(a.mount.mnt), os.statvfs(a.mount.rw)
    assert (graph.f_bsize, graph.f_blocks, graph.f_files) == (rw.f_bsize, rw.f_blocks, rw.f_files)


def test_an_isulad_runtime_on_a_containers_storage_mount_is_reported(
        sample: Sample, mount_factory: Callable[..., GraftMount], tmp_path: Path) -> None:
    """The mount's own lock files (bound over the view) must not hide iSulad's per-layer records."""
    rw = tmp_path / "rw-cs"
    rw.mkdir()
    node = mount_factory(str(rw), [sample.share_ro], "--layout", "containers-storage")
    os.makedirs(node.path("overlay-layers", "a" * 64))  # what iSulad writes for a layer
    wait_for(lambda: node.status().get("layout_warning"), 10, "the layout warning")
    assert "iSulad" in str(node.status()["layout_warning"]) and "layout=isulad" in str(node.status()["layout_warning"])
