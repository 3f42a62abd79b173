"""Polling a shared tree without mounting: what a poll notices, what it costs, and when a tree
counts as unavailable rather than emptied. The mount tests (test_watcher.py) show the same
through the kernel; these pin the rules down fast and precisely."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from graftfs.catalog.tree import SharedTree
from graftfs.share.sample import build_demo, chain, digest, publish_sample_image, short_name, write_image
from graftfs.view.isulad import IsuladLayout, isulad_catalog, own_layers
from graftfs.view.layout import ViewChange


@pytest.fixture
def demo(tmp_path: Path) -> tuple[IsuladLayout, str, object]:
    share, rw = str(tmp_path / "share"), str(tmp_path / "rw")
    ids = build_demo(share, rw)
    layout = isulad_view([share], rw)
    layout.live.refresh()
    return layout, share, ids


def isulad_view(trees: list[str], rw: str) -> IsuladLayout:
    """The iSulad presenter over these trees, as a mount builds it (nothing loaded yet)."""
    return IsuladLayout(isulad_catalog(trees, rw))


def rw_of(layout: IsuladLayout) -> str:
    """The RW tree a test's layout was made for (its catalog keeps its state dir there)."""
    return os.path.dirname(layout.live.state_dir)


def poll(layout: IsuladLayout) -> list[ViewChange]:
    """One poll of every tree, committed and acknowledged as the watcher does."""
    live = layout.live
    if not any([live.poll_tree(t) for t in range(len(live.trees))]):
        return []
    seq, diff = live.commit()
    live.ack(seq)
    return layout.view_changes(diff)


def settle(layout: IsuladLayout) -> None:
    """Take the extra listing that follows a change, so later polls see only new changes."""
    poll(layout)


def test_quiet_share_gives_no_changes(demo: tuple[IsuladLayout, str, object]) -> None:
    layout, _, _ = demo
    settle(layout)
    assert layout.live.poll_tree(0) is False
    assert poll(layout) == []


def test_published_image_is_found_with_its_names(demo: tuple[IsuladLayout, str, object],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import graftfs.catalog.scan as st

    layout, share, ids = demo
    settle(layout)
    layers = chain("new", 2, parent=ids.base)  # type: ignore[attr-defined]
    image = publish_sample_image(share, "new:1", layers)
    checked: list[str] = []
    real = st.check_layer
    monkeypatch.setattr(st, "check_layer", lambda lid, *a: checked.append(lid) or real(lid, *a))
    changes = poll(layout)
    assert sorted(checked) == sorted(la.id for la in layers)  # only the new layers are read
    assert ViewChange(("overlay-images",), image, deep=True) in changes
    for la in layers:
        assert ViewChange(("overlay-layers",), la.id, deep=True) in changes
        assert ViewChange(("overlay",), la.id) in changes
        assert ViewChange(("overlay", "l"), short_name(la.id)) in changes
    assert image in layout.live.catalog.images
    assert ids.app in layout.live.catalog.layers  # type: ignore[attr-defined]


def test_rewritten_record_is_touched_by_the_sweep(demo: tuple[IsuladLayout, str, object]) -> None:
    layout, share, ids = demo
    settle(layout)
    path = Path(share, "overlay-images", ids.image_app, "images.json")  # type: ignore[attr-defined]
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "names": ["renamed:1"]}))
    changes = poll(layout)
    assert ViewChange(("overlay-images",), ids.image_app, deep=True) in changes  # type: ignore[attr-defined]
    assert layout.live.catalog.images[ids.image_app][1].names == ("renamed:1",)  # type: ignore[attr-defined]


def test_entry_moved_out_while_checked_is_judged_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import graftfs.catalog.scan as st

    share = str(tmp_path / "s")
    base = chain("b", 1)
    publish_sample_image(share, "b:1", base)
    tree = SharedTree(share)
    tree.poll(full=True)
    iid = digest("image:x:1")
    write_image(share, iid, base[0].id, ["x:1"])
    entry, parked = os.path.join(share, "overlay-images", iid), str(tmp_path / "parked")
    real_check = st.check_image

    def moved_away_meanwhile(image_id: str, record_dir: str) -> object:
        os.rename(entry, parked)  # a gc (or a publisher undoing) moves it out between listing and reading
        return real_check(image_id, record_dir)

    monkeypatch.setattr(st, "check_image", moved_away_meanwhile)
    tree.poll()
    monkeypatch.setattr(st, "check_image", real_check)
    assert iid not in tree.scan.images and not tree.scan.problems  # gone, not "broken"
    os.rename(parked, entry)
    tree.poll()
    assert iid in tree.scan.images and not tree.scan.problems
    # a half-written entry that stays is a problem, and shows once completed
    half = digest("image:half:1")
    write_image(share, half, base[0].id, ["half:1"])
    os.unlink(os.path.join(share, "overlay-images", half, "images.json"))
    tree.poll()
    assert [p.id for p in tree.scan.problems] == [half]
    write_image(share, half, base[0].id, ["half:1"])
    tree.poll()
    assert half in tree.scan.images and not tree.scan.problems


def test_missing_marker_means_unavailable_not_empty(demo: tuple[IsuladLayout, str, object]) -> None:
    layout, share, ids = demo
    before = dict(layout.live.catalog.images)
    os.rename(os.path.join(share, ".graftfs-share"), os.path.join(share, "marker.away"))
    shutil.rmtree(os.path.join(share, "overlay-images"))
    assert poll(layout) == []
    assert layout.live.catalog.images == before
    tree = layout.live.shared[0]
    assert not tree.available and "marker" in tree.unavailable_reason
    # unavailable: the top of the tree is answered from memory, anything deeper is EIO
    assert layout.missing(0, ("overlay-images",)) is not None
    with pytest.raises(OSError) as exc:
        layout.missing(0, ("overlay-images", ids.image_app, "manifest"))  # type: ignore[attr-defined]
    assert exc.value.errno == 5
    os.rename(os.path.join(share, "marker.away"), os.path.join(share, ".graftfs-share"))
    changes = poll(layout)
    assert tree.available
    assert layout.live.catalog.images == {}
    assert ViewChange(("overlay-images",), ids.image_app, deep=True) in changes  # type: ignore[attr-defined]


def test_isulad_share_without_marker(tmp_path: Path) -> None:
    share = str(tmp_path / "isulad")
    publish_sample_image(share, "i:1", chain("i", 1))
    layout = isulad_view([share], str(tmp_path / "rw"))
    layout.live.refresh()
    assert len(layout.live.catalog.images) == 1
    moved = str(tmp_path / "moved")
    os.rename(share, moved)
    os.mkdir(share)  # the mountpoint of an unmounted NFS export
    poll(layout)
    assert not layout.live.shared[0].available and len(layout.live.catalog.images) == 1
    os.rmdir(share)
    os.rename(moved, share)
    poll(layout)
    assert layout.live.shared[0].available and len(layout.live.catalog.images) == 1


def test_empty_share_is_a_share_with_no_images(tmp_path: Path) -> None:
    share = str(tmp_path / "empty")
    os.mkdir(share)
    layout = isulad_view([share], str(tmp_path / "rw"))
    layout.live.refresh()
    assert layout.live.shared[0].available and layout.live.catalog.images == {}
    image = publish_sample_image(share, "first:1", chain("first", 1))
    poll(layout)
    assert image in layout.live.catalog.images


def test_sweep_reaches_good_records_past_many_broken_entries(tmp_path: Path) -> None:
    from graftfs.share.sample import SampleLayer, write_layer

    share = str(tmp_path / "crashed")
    base = chain("ok", 1)
    good = publish_sample_image(share, "ok:1", base)
    for i in range(300):  # half-written layers left behind by crashed publishers
        write_layer(share, SampleLayer(digest(f"layer:crashed:{i}"), None, {}), with_link=False)
    layout = isulad_view([share], str(tmp_path / "rw"))
    layout.live.refresh()
    poll(layout)
    assert len(layout.live.catalog.problems) == 300
    record = Path(share, "overlay-images", good, "images.json")
    record.write_text(json.dumps({**json.loads(record.read_text()), "names": ["ok:2"]}))
    late = digest("layer:crashed:299")
    Path(share, "overlay", late, "link").write_text(short_name(late))
    for _ in range(10):
        poll(layout)
    assert layout.live.catalog.images[good][1].names == ("ok:2",)
    assert late in layout.live.catalog.layers


def test_sweep_is_bounded_per_poll(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import graftfs.catalog.tree as tr

    share = str(tmp_path / "big")
    publish_sample_image(share, "big:1", chain("big", 30))
    tree = SharedTree(share)
    tree.poll(full=True)
    monkeypatch.setattr(tr, "SWEEP_BUDGET", 10)
    checked: list[int] = []
    real = tr.entry_sig

    def counting(paths: list[str]) -> object:
        checked.append(1)
        return real(paths)

    monkeypatch.setattr(tr, "entry_sig", counting)
    tree.poll()
    assert len(checked) == 10  # 31 entries known, 10 re-checked per poll


def test_incremental_catalog_equals_a_full_build(demo: tuple[IsuladLayout, str, object]) -> None:
    from graftfs.share.sample import SampleLayer, write_layer

    layout, share, ids = demo
    parent, child = digest("layer:late-parent"), digest("layer:early-child")
    write_layer(share, SampleLayer(child, parent, {"c": b"1"}))  # published before its parent
    write_image(share, digest("image:early"), child, ["early:1"])
    poll(layout)
    assert child not in layout.live.catalog.layers and digest("image:early") not in layout.live.catalog.images
    write_layer(share, SampleLayer(parent, ids.base, {"p": b"1"}))  # type: ignore[attr-defined]
    changes = poll(layout)
    assert child in layout.live.catalog.layers and digest("image:early") in layout.live.catalog.images
    assert ViewChange(("overlay",), child) in changes
    assert_same_as_full_build(layout)


def assert_same_as_full_build(layout: IsuladLayout) -> None:
    from graftfs.catalog.catalog import build_catalog

    full = build_catalog([t.scan for t in layout.live.shared], own_layers(rw_of(layout)))
    inc = layout.live.catalog
    assert inc.layers == full.layers and inc.images == full.images and inc.shorts == full.shorts
    assert sorted(map(str, inc.problems)) == sorted(map(str, full.problems))
    assert [sorted(x) for x in inc.layers_by_tree] == [sorted(x) for x in full.layers_by_tree]


def test_incremental_catalog_over_two_trees_in_any_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    import graftfs.catalog.catalog as isulad
    from graftfs.share.sample import SampleLayer, write_layer

    trees = [str(tmp_path / "t0"), str(tmp_path / "t1")]
    for t in trees:
        os.makedirs(t)
    layout = isulad_view(trees, str(tmp_path / "rw"))
    layout.live.refresh()
    incremental: list[bool] = []
    real_add = isulad._add_layers
    monkeypatch.setattr(isulad, "_add_layers", lambda *a: incremental.append(real_add(*a)) or incremental[-1])
    # a layer waiting for its parent in tree 0 turns up in tree 1 too: tree 0's copy still wins
    waiting, missing = digest("layer:waiting"), digest("layer:missing-parent")
    write_layer(trees[0], SampleLayer(waiting, missing, {}))
    poll(layout)
    write_layer(trees[1], SampleLayer(waiting, missing, {}))
    poll(layout)
    assert_same_as_full_build(layout)
    write_layer(trees[1], SampleLayer(missing, None, {}))
    poll(layout)
    assert layout.live.catalog.layers[waiting][0] == 0
    assert_same_as_full_build(layout)
    ids = [digest(f"layer:r{i}") for i in range(12)]
    steps = [(t, i) for i in range(12) for t in (0, 1) if (i + t) % 3]  # some ids in both trees
    random.Random(7).shuffle(steps)
    for tree, i in steps:
        parent = ids[i - 1] if i else None  # one chain, published out of order across two trees
        write_layer(trees[tree], SampleLayer(ids[i], parent, {f"f{tree}": b"x"}))
        poll(layout)
        assert_same_as_full_build(layout)
    assert True in incremental and False in incremental  # both paths were exercised


def test_slow_tree_at_start_does_not_hold_up_the_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow, fast = str(tmp_path / "slow"), str(tmp_path / "fast")
    slow_image = publish_sample_image(slow, "slow:1", chain("slow", 1))
    fast_image = publish_sample_image(fast, "fast:1", chain("fast", 1))
    layout = isulad_view([slow, fast], str(tmp_path / "rw"))
    real_poll = SharedTree._poll

    def hanging(self: SharedTree, full: bool) -> object:
        if self.root == slow:
            time.sleep(1.0)  # a share that answers late
        return real_poll(self, full)

    monkeypatch.setattr(SharedTree, "_poll", hanging)
    started = time.monotonic()
    assert layout.live.load(timeout=0.2) == [slow]
    assert time.monotonic() - started < 0.9
    assert fast_image in layout.live.catalog.images and slow_image not in layout.live.catalog.images
    assert layout.live.poll_tree(0) is False  # the first scan still runs: polls skip
    time.sleep(1.0)
    assert layout.live.poll_tree(0) is True  # its late scan was never committed: the watcher is told
    changes = poll(layout)
    assert slow_image in layout.live.catalog.images
    assert ViewChange(("overlay-images",), slow_image, deep=True) in changes


def test_unavailable_share_keeps_rw_files_reachable(demo: tuple[IsuladLayout, str, object], tmp_path: Path) -> None:
    from graftfs.format.names import STATE_DIR
    from graftfs.view.hides import HideStore
    from graftfs.view.namespace import Namespace

    layout, share, ids = demo
    rw = rw_of(layout)
    os.makedirs(os.path.join(rw, STATE_DIR), exist_ok=True)
    ns = Namespace(rw, layout, HideStore(os.path.join(rw, STATE_DIR)))
    local = ("overlay", ids.app, "diff", "app", "local.txt")  # type: ignore[attr-defined]
    os.makedirs(os.path.join(rw, *local[:-1]))
    Path(rw, *local).write_text("mine\n")
    os.rename(share, str(tmp_path / "share-away"))  # the share's mountpoint is gone
    poll(layout)
    assert not layout.live.shared[0].available
    assert ns.resolve(local).origin == "rw"  # served from RW though the share cannot be asked
    with pytest.raises(OSError) as exc:
        ns.resolve(("overlay", ids.app, "diff", "app", "data.txt"))  # type: ignore[attr-defined]
    assert exc.value.errno == 5  # EIO: out of reach, not "deleted"
    assert {n for n, _ in ns.listdir(("overlay-images",))} >= {ids.image_app}  # type: ignore[attr-defined]


def test_saved_scan_starts_the_next_mount_with_only_what_changed(demo: tuple[IsuladLayout, str, object],
                                                                 tmp_path: Path) -> None:
    """A mount saves its scans; the next one starts from them and checks only new or moved
    entries, so it shows exactly what a full scan shows, also after changes made meanwhile."""
    import graftfs.catalog.scan as st

    layout, share, ids = demo
    rw = rw_of(layout)
    os.makedirs(os.path.join(rw, ".graftfs"), exist_ok=True)
    layout.live.save()
    # meanwhile: one image published, one removed
    new = chain("saved-scan", 2, parent=ids.base)  # type: ignore[attr-defined]
    new_image = publish_sample_image(share, "saved/scan:1", new)
    shutil.rmtree(os.path.join(share, "overlay-images", ids.image_web))  # type: ignore[attr-defined]
    checked: list[str] = []
    real_check = st.check_layer

    def counting(lid: str, overlay_dir: str, record_dir: str) -> st.LayerEntry:
        checked.append(lid)
        return real_check(lid, overlay_dir, record_dir)

    st.check_layer = counting  # type: ignore[assignment]
    try:
        resumed = isulad_view([share], rw)
        assert resumed.live.load(10) == []
    finally:
        st.check_layer = real_check  # type: ignore[assignment]
    assert sorted(checked) == sorted(layer.id for layer in new)  # the known layers were not read again
    full = isulad_view([share], rw)
    full.live.refresh()
    assert resumed.live.catalog.layers.keys() == full.live.catalog.layers.keys()
    assert resumed.live.catalog.images.keys() == full.live.catalog.images.keys()
    assert new_image in resumed.live.catalog.images and ids.image_web not in resumed.live.catalog.images  # type: ignore[attr-defined]
    assert resumed.live.catalog.shorts.keys() == full.live.catalog.shorts.keys()
    # a damaged snapshot is ignored: a full scan, same result
    Path(rw, ".graftfs", "scan-cache.json").write_text('{"version": 1, "trees": {"' + share + '": {"layers": 5}}}')
    again = isulad_view([share], rw)
    again.live.load(10)
    assert again.live.catalog.images.keys() == full.live.catalog.images.keys()
