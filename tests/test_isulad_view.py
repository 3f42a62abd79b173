"""The iSulad layout on a real mount: only complete shared entries show, remote-RO shares are
presented in the legacy layout, and corrupt records are skipped and reported, never fatal."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from conftest import GraftMount, Sample, bind_ro, force_unmount, needs_mount
from graftfs.share.sample import SampleLayer, digest, short_name, write_image, write_layer

pytestmark = needs_mount

MountFactory = Callable[..., GraftMount]


def skipped(g: GraftMount) -> dict[str, str]:
    return {s["id"]: s["reason"] for s in g.status()["skipped"]}  # type: ignore[attr-defined]


def test_incomplete_entries_invisible_until_complete(graft: GraftMount, sample: Sample) -> None:
    ids = sample.ids
    assert ids.broken not in os.listdir(graft.path("overlay"))
    assert ids.broken not in os.listdir(graft.path("overlay-layers"))
    assert ids.image_broken not in os.listdir(graft.path("overlay-images"))
    assert not os.path.exists(graft.path("overlay-images", ids.image_broken))
    assert not os.path.exists(graft.path("overlay", "l", short_name(ids.broken)))
    reasons = skipped(graft)
    assert reasons[ids.broken] == "overlay link file missing"
    assert "is not visible" in reasons[ids.image_broken]
    # the publisher finishes the layer: after a remount the layer, its link and its image show
    Path(sample.share, "overlay", ids.broken, "link").write_text(short_name(ids.broken))
    graft.remount()
    assert ids.broken in os.listdir(graft.path("overlay"))
    assert ids.image_broken in os.listdir(graft.path("overlay-images"))
    assert os.readlink(graft.path("overlay", "l", short_name(ids.broken))) == f"../{ids.broken}/diff"
    assert Path(graft.path("overlay", "l", short_name(ids.broken), "half", "written")).read_bytes() == b"x"
    assert skipped(graft) == {}


def test_parent_chain_must_be_visible(sample: Sample, mount_factory: MountFactory) -> None:
    orphan, child = digest("layer:orphan"), digest("layer:orphan-child")
    looped_a, looped_b = digest("layer:loop-a"), digest("layer:loop-b")
    write_layer(sample.share, SampleLayer(orphan, digest("layer:never-published"), {"f": b"1"}))
    write_layer(sample.share, SampleLayer(child, orphan, {"g": b"2"}))
    write_layer(sample.share, SampleLayer(looped_a, looped_b, {}))
    write_layer(sample.share, SampleLayer(looped_b, looped_a, {}))
    write_image(sample.share, digest("image:looped"), looped_a, ["loop:1"])
    g = mount_factory(sample.rw, [sample.share_ro])
    shown = set(os.listdir(g.path("overlay-layers")))
    assert not {orphan, child, looped_a, looped_b} & shown
    assert sample.ids.app in shown
    reasons = skipped(g)
    assert "is not visible" in reasons[orphan] and "is not visible" in reasons[child]
    assert reasons[looped_a] == "parent chain loops"
    assert digest("image:looped") in reasons


def test_corrupt_records_are_skipped_and_logged(sample: Sample, mount_factory: MountFactory) -> None:
    bad_layer, bad_image = digest("layer:corrupt"), digest("image:corrupt")
    write_layer(sample.share, SampleLayer(bad_layer, None, {"f": b"1"}), record=b'{"id": "trunc')
    write_image(sample.share, bad_image, sample.ids.base, ["bad:1"], record=b"\xff\xfe not json")
    not_object = digest("image:list")
    write_image(sample.share, not_object, sample.ids.base, ["bad:2"], record=b"[1, 2]")
    g = mount_factory(sample.rw, [sample.share_ro])
    assert bad_layer not in os.listdir(g.path("overlay-layers"))
    images = os.listdir(g.path("overlay-images"))
    assert bad_image not in images and not_object not in images
    assert {sample.ids.image_app, sample.ids.image_web} <= set(images)
    reasons = skipped(g)
    assert "layer.json does not parse" in reasons[bad_layer]
    assert "images.json does not parse" in reasons[bad_image]
    assert "not a JSON object" in reasons[not_object]
    assert f"skipping layer {bad_layer}" in g.log_text()
    # the rest is served normally
    assert Path(g.path("overlay", sample.ids.app, "diff", "app", "data.txt")).read_text() == "application data\n"
    out = Path(g.path("overlay-images", sample.ids.image_app, "images.json")).read_bytes()
    assert sample.ids.app.encode() in out


def test_isulad_remote_ro_share_in_legacy_layout(sample: Sample, tmp_path: Path, mount_factory: MountFactory) -> None:
    remote = str(tmp_path / "remote")
    base, top = digest("remote:base"), digest("remote:top")
    write_layer(remote, SampleLayer(base, None, {"usr/lib/os": b"remote\n"}), remote_ro=True)
    write_layer(remote, SampleLayer(top, base, {"opt/app": b"top\n"}), remote_ro=True)
    write_image(remote, digest("remote:image"), top, ["remote/app:1"])
    remote_ro = str(tmp_path / "remote-ro")
    bind_ro(remote, remote_ro)
    try:
        g = mount_factory(sample.rw, [sample.share_ro, remote_ro])
        for managed in ("overlay", "overlay-layers"):
            names = os.listdir(g.path(managed))
            assert "RO" not in names
            assert {base, top} <= set(names)
            for lid in (base, top):
                st = os.lstat(g.path(managed, lid))
                assert stat.S_ISDIR(st.st_mode), f"{managed}/{lid} should be a directory, not a symlink"
        assert digest("remote:image") in os.listdir(g.path("overlay-images"))
        assert Path(g.path("overlay", top, "diff", "opt", "app")).read_text() == "top\n"
        assert os.readlink(g.path("overlay", "l", short_name(top))) == f"../{top}/diff"
        assert Path(g.path("overlay", "l", short_name(base), "usr", "lib", "os")).read_text() == "remote\n"
        assert os.getxattr(g.path("overlay", top), "user.graftfs.origin") == f"ro:{remote_ro}".encode()
        remote_status = [t for t in g.status()["ro"] if t["tree"] == remote_ro]  # type: ignore[attr-defined]
        assert remote_status[0]["remote_ro"] is True
        assert remote_status[0]["layers"] == 2 and remote_status[0]["images"] == 1
        g.stop()
    finally:
        force_unmount(remote_ro)
