"""The share's lifecycle without mounting: retire, leases, gc's rules and its race with publishers,
fsck, statistics, and what a node's runtime state says it uses. Real `graftfs publish` and `gc`
processes race each other in the concurrency test; the podman tests (tests/test_lifecycle_podman.py)
show the same with real nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import graftfs_cmd
from graftfs.format.names import INTENTS_DIR, MARKER_NAME, RETIRED_DIR, STAGING_DIR
from graftfs.share import gc as share_gc
from graftfs.share.fsck import check
from graftfs.share.gc import Ref
from graftfs.share.leases import in_use, read_claims, write_lease
from graftfs.share.sample import SampleLayer, chain, digest, publish_sample_image, write_image, write_layer
from graftfs.share.state import ShareError, ShareState
from graftfs.share.stats import share_stats
from graftfs.view.isulad import isulad_catalog


def make_share(path: Path) -> str:
    path.mkdir()
    (path / MARKER_NAME).write_text("graftfs share v1\n")
    return str(path)


@pytest.fixture
def share(tmp_path: Path) -> str:
    return make_share(tmp_path / "share")


def publish(share: str, tag: str, layers: list[SampleLayer]) -> str:
    return publish_sample_image(share, tag, layers)


def visible_images(share: str) -> set[str]:
    """What a reader (the same catalog code a mount uses) shows of a share."""
    return set(isulad_catalog([share], os.path.dirname(share) + "/rw-unused").refresh().images)


def age(share: str, *parts: str, seconds: float = 7200) -> None:
    """Make an entry look placed ``seconds`` ago (mtime; ctime cannot be set, see entry_age)."""
    path = os.path.join(share, *parts)
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_unpublish_hides_the_image_from_readers_and_deletes_nothing(share: str) -> None:
    base = chain("base", 2)
    app = publish(share, "app:1", base)
    assert visible_images(share) == {app}
    [r] = share_gc.unpublish(share, ["app:1"])
    assert (r.id, r.status) == (app, "retired")
    assert share_gc.unpublish(share, [app[:12]])[0].status == "already retired"
    assert visible_images(share) == set()
    assert os.path.isdir(os.path.join(share, "overlay", base[0].id, "diff"))
    with pytest.raises(ShareError, match="no image"):
        share_gc.unpublish(share, ["nope:1"])


def test_gc_keeps_leased_layers_and_deletes_them_once_the_lease_is_gone(share: str) -> None:
    base = chain("base", 2)
    top = chain("app", 2, parent=base[-1].id)
    app = publish(share, "app:1", base + top)
    web = publish(share, "web:1", base + chain("web", 1, parent=base[-1].id))
    share_gc.unpublish(share, ["app:1"])
    write_lease(share, "node-b", 60.0, [top[-1].id], [app])
    p = share_gc.collect(share, grace=3600)
    assert p.images == [] and p.layers == []
    assert p.kept[Ref("image", app)] == "leased by node node-b"
    assert p.kept[Ref("layer", top[0].id)] == "leased by node node-b"
    assert os.path.isdir(os.path.join(share, "overlay", top[0].id))
    # the node renews its lease without the layers (its container is gone)
    write_lease(share, "node-b", 60.0, [], [])
    p = share_gc.collect(share, grace=3600)
    # retired just now, and node-b's lease lives 60 s: nodes may not have noticed the retirement yet
    assert p.images == [] and "retired 0 s ago" in p.kept[Ref("image", app)]
    write_lease(share, "node-b", 0.5, [], [])
    time.sleep(1.0)
    p = share_gc.collect(share, grace=3600)
    assert p.images == [app]
    assert set(p.layers) == {t.id for t in top} and p.layers == [top[1].id, top[0].id]  # children first
    for lid in (top[0].id, top[1].id):
        assert not os.path.exists(os.path.join(share, "overlay", lid))
        assert not os.path.exists(os.path.join(share, "overlay-layers", lid))
    assert not os.path.exists(os.path.join(share, "overlay-images", app))
    assert not os.path.exists(os.path.join(share, RETIRED_DIR, app))
    # the base layers stay: web:1 uses them
    assert all(os.path.isdir(os.path.join(share, "overlay", b.id)) for b in base)
    assert visible_images(share) == {web}
    assert check(share).problems == []
    assert os.listdir(os.path.join(share, ".graftfs-trash")) == []


def test_a_lapsed_lease_does_not_protect(share: str) -> None:
    layers = chain("app", 1)
    app = publish(share, "app:1", layers)
    share_gc.unpublish(share, [app])
    write_lease(share, "dead-node", 0.3, [layers[0].id], [app])  # a node that stopped renewing
    time.sleep(0.6)
    p = share_gc.collect(share, grace=3600)
    assert p.images == [app] and p.layers == [layers[0].id]
    stats = share_stats(share)
    assert stats["nodes"][0]["live"] is False and stats["live_nodes"] == 0


def test_claims_made_while_gc_moves_entries_are_honoured(share: str) -> None:
    """The race gc must win: a publisher writes its intent, finds the layer "already published",
    and gc (which read the claims before the intent existed) has moved it to the trash."""
    layers = chain("app", 2)
    app = publish(share, "app:1", layers)
    share_gc.unpublish(share, [app])
    state = ShareState.read(share, writable=True)
    plan = share_gc.plan(state, grace=3600)
    assert plan.layers == [layers[1].id, layers[0].id]
    os.makedirs(os.path.join(share, INTENTS_DIR))
    with open(os.path.join(share, INTENTS_DIR, "pub.json"), "w") as f:
        json.dump({"ttl": 60, "layers": [layers[0].id], "images": [], "staging": "x"}, f)
    said: list[str] = []
    share_gc.Collector(state, said.append).run(plan)
    assert plan.restored == [Ref("layer", layers[0].id)], said
    assert os.path.isfile(os.path.join(share, "overlay", layers[0].id, "link"))
    assert os.path.isfile(os.path.join(share, "overlay-layers", layers[0].id, "layer.json"))
    assert not os.path.exists(os.path.join(share, "overlay", layers[1].id))


def test_unreadable_lease_stops_gc(share: str) -> None:
    publish(share, "app:1", chain("app", 1))
    os.makedirs(os.path.join(share, ".graftfs-nodes", "node-x"))
    Path(share, ".graftfs-nodes", "node-x", "lease.json").write_bytes(b"{not json")
    with pytest.raises(ShareError, match="node-x"):
        share_gc.collect(share)
    assert any("node-x" in p for p in check(share).problems)
    res = graftfs_cmd("gc", "--share", share)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "node-x" in res.stderr


def test_debris_of_killed_publishers_is_collected_after_the_grace_period(share: str) -> None:
    orphan = chain("orphan", 1)[0]
    write_layer(share, orphan)  # placed, then the publisher died before its image
    half = SampleLayer(digest("half"), None, {"a": b"a"})
    write_layer(share, half, with_link=False)  # incomplete
    stage = os.path.join(share, STAGING_DIR, "dead-publisher")
    os.makedirs(stage)
    p = share_gc.collect(share, dry_run=True, grace=3600)
    assert p.layers == [] and p.staging == [] and p.debris == []
    report = check(share)
    assert len(report.problems) == 2 and len(report.in_progress) == 1, report  # staging: recent
    for managed in ("overlay", "overlay-layers"):
        for lid in (orphan.id, half.id):
            age(share, managed, lid)
    age(share, STAGING_DIR, "dead-publisher")
    # ctime moves with every change and cannot be set back: grace 0 stands in for "much later"
    # (entries placed in the very clock tick gc reads the share's time in are never debris)
    time.sleep(0.1)
    p = share_gc.collect(share, grace=0)
    assert p.layers == [orphan.id] and set(p.debris) == {Ref("layer", orphan.id), Ref("layer", half.id)}
    assert p.staging == ["dead-publisher"]
    assert not os.path.exists(stage) and not os.path.exists(os.path.join(share, "overlay", half.id))
    assert check(share).problems == []


def test_fsck_finds_each_kind_of_problem(share: str) -> None:
    good = publish(share, "good:1", chain("good", 2))
    assert check(share).problems == []
    assert graftfs_cmd("fsck", "--share", share).returncode == 0
    bad_top = digest("image:bad")
    write_image(share, bad_top, digest("missing-layer"), ["bad:1"])
    Path(share, RETIRED_DIR).mkdir()
    Path(share, RETIRED_DIR, digest("gone")).write_text("{}")
    Path(share, "overlay-images", digest("torn")).mkdir()
    Path(share, "overlay-images", digest("torn"), "images.json").write_bytes(b'{"id": "trunc')
    problems = check(share).problems
    assert any(bad_top in p and "top layer" in p for p in problems)
    assert any(digest("gone") in p and "stale" in p for p in problems)
    assert any(digest("torn") in p and "incomplete" in p for p in problems)
    assert len(problems) == 3, problems
    res = graftfs_cmd("fsck", "--share", share)
    assert res.returncode == 1 and "3 problems" in res.stdout
    assert good in ShareState.read(share).published()


def test_node_use_comes_from_the_runtime_state(tmp_path: Path) -> None:
    rw = tmp_path / "rw"
    for d in ("overlay-layers", "overlay-images", "overlay-containers"):
        (rw / d).mkdir(parents=True)
    shared = {"s1": None, "s2": "s1", "s3": "s2", "t1": None}
    ids = {k: digest(k) for k in [*shared, "img", "img2", "local", "ctr"]}
    parents = {ids[k]: (ids[v] if v else None) for k, v in shared.items()}
    tops = {ids["img"]: ids["s3"], ids["img2"]: ids["t1"]}
    # a container of img (its layer sits on s2, say), and a local image built on s1
    (rw / "overlay-layers" / "layers.json").write_text(json.dumps([
        {"id": ids["ctr"], "parent": ids["s2"]}, {"id": ids["local"], "parent": ids["s1"]}]))
    (rw / "overlay-containers" / "containers.json").write_text(json.dumps([
        {"id": "c", "image": ids["img"], "layer": ids["ctr"]}]))
    layers, images = in_use(str(rw), parents, tops)
    assert images == {ids["img"]} and layers == {ids["s1"], ids["s2"], ids["s3"]}
    layers, images = in_use(str(rw), parents, tops, pinned=[ids["img2"]])
    assert images == {ids["img"], ids["img2"]} and ids["t1"] in layers
    (rw / "overlay-containers" / "containers.json").write_text("[{")
    with pytest.raises(ValueError):
        in_use(str(rw), parents, tops)


def test_share_stats_count_storage_saved(share: str) -> None:
    base = chain("base", 2, size=1000)
    publish(share, "a:1", base)
    b = chain("b", 1, parent=base[-1].id, size=1000)
    publish(share, "b:1", base + b)
    stored = sum(len(data) for layer in base + b for data in layer.files.values())
    for node in ("n1", "n2", "n3"):
        write_lease(share, node, 60.0, [base[0].id], [])
    st = share_stats(share)
    assert (st["images"], st["layers"], st["live_nodes"]) == (2, 3, 3)
    assert st["bytes_stored"] == stored and st["bytes_without_sharing"] == 3 * stored
    assert st["bytes_saved"] == 2 * stored
    res = graftfs_cmd("status", "--share", share)
    assert res.returncode == 0 and "saved:" in res.stdout and "n2" in res.stdout


def _graph(root: Path, images: dict[str, list[SampleLayer]]) -> None:
    """A containers/storage graph (the source `graftfs publish` reads) holding these images."""
    records: dict[str, dict[str, object]] = {}
    image_records = []
    for tag, layers in images.items():
        for layer in layers:
            write_layer(str(root), layer)
            records[layer.id] = {"id": layer.id, "parent": layer.parent or "", "diff-size": 10}
        iid = digest(f"image:{tag}")
        write_image(str(root), iid, layers[-1].id, [tag])
        image_records.append({"id": iid, "names": [tag], "layer": layers[-1].id})
    (root / "overlay-layers" / "layers.json").write_text(json.dumps(list(records.values())))
    (root / "overlay-images" / "images.json").write_text(json.dumps(image_records))


@pytest.mark.timeout(240)
def test_concurrent_publishers_and_gc_leave_a_clean_share(tmp_path: Path) -> None:
    """Three publishers of overlapping multi-layer images (and a fourth racing the first with the
    same image), and gc in a loop collecting a retired image that shares their layers, all at
    once: every image ends up complete, once, and fsck is clean."""
    share = make_share(tmp_path / "share")
    base = chain("base", 3)
    old = base + chain("old", 1, parent=base[-1].id)
    images = {f"img{i}:1": base + chain(f"img{i}", 2, parent=base[-1].id) for i in range(3)}
    graph = tmp_path / "graph"
    _graph(graph, {"old:1": old, **images})
    for round_ in range(3):
        stop = tmp_path / f"stop-{round_}"
        assert graftfs_cmd("publish", "--graph", str(graph), "--share", share, "old:1").returncode == 0
        assert graftfs_cmd("unpublish", "--share", share, "old:1").returncode == 0
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        gc_loop = subprocess.Popen(
            [sys.executable, "-c", "import os, sys, time\nfrom graftfs.share.gc import collect\nn = 0\n"
             "end = time.time() + 60\nwhile time.time() < end and not os.path.exists(sys.argv[2]):\n"
             "    n += len(collect(sys.argv[1], grace=0).layers)\nprint(n)\n", share, str(stop)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        pubs = [subprocess.Popen([sys.executable, "-m", "graftfs", "publish", "--graph", str(graph), "--share", share,
                                  "--json", tag], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env, stdin=subprocess.DEVNULL)
                for tag in [*images, "img0:1"]]  # and a second node publishing img0 at the same time
        try:
            outs = [p.communicate(timeout=60) for p in pubs]
            stop.touch()
            collected = int(gc_loop.communicate(timeout=60)[0])
            assert gc_loop.returncode == 0 and collected > 0  # it did race the publishers
        finally:
            for p in [*pubs, gc_loop]:
                p.kill()
        for p, (out, err) in zip(pubs, outs, strict=True):
            assert p.returncode == 0, err
            result = json.loads(out)["images"][0]
            assert result["status"] in ("published", "already published")
            assert {la["status"] for la in result["layers"]} <= {"published", "already published"}
        share_gc.collect(share, grace=0)  # the old image's own layer goes once nothing races
        report = check(share)
        assert report.problems == [] and report.in_progress == [], (round_, report)
        assert visible_images(share) == {digest(f"image:{t}") for t in images}
        for managed in ("overlay", "overlay-layers", "overlay-images"):  # one plain entry per id
            for entry in os.scandir(os.path.join(share, managed)):
                assert len(os.listdir(entry.path)) <= 5 and entry.name not in os.listdir(entry.path)
        claims, problems = read_claims(share)
        assert problems == [] and [c for c in claims if c.kind == "intent"] == []
        # next round: the images go, and are published again while gc collects them
        for tag in images:
            assert graftfs_cmd("unpublish", "--share", share, tag).returncode == 0
        share_gc.collect(share, grace=0)
        assert visible_images(share) == set()


def test_publisher_copes_with_a_parent_moved_out_by_gc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gc may hold a layer out of view for a moment (it puts back what the publisher's intent
    names): a child copied then must not get a truncated ``lower`` or fail; the parent is
    published again."""
    from graftfs.share import publish as publish_mod

    share = make_share(tmp_path / "share")
    base = chain("base", 2)
    top = chain("top", 1, parent=base[-1].id)
    graph = tmp_path / "graph"
    _graph(graph, {"base:1": base, "app:1": base + top})
    assert graftfs_cmd("publish", "--graph", str(graph), "--share", share, "base:1").returncode == 0
    real_copy = publish_mod._copy_overlay_dir
    moved = tmp_path / "gc-trash"

    def copy_while_gc_moves_the_parent(src: str, dst: str, *args: object) -> int:
        if os.path.basename(src) == top[0].id and not moved.exists():
            os.rename(os.path.join(share, "overlay", base[-1].id), moved)
        return real_copy(src, dst, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(publish_mod, "_copy_overlay_dir", copy_while_gc_moves_the_parent)
    graph_obj = publish_mod.Graph.load(str(graph))
    result = publish_mod.Publisher(graph_obj, share).publish("app:1")
    assert [la.status for la in result.layers] == ["already published", "already published", "published"]
    assert moved.exists() and os.path.isfile(os.path.join(share, "overlay", base[-1].id, "link"))  # copied again
    with open(os.path.join(share, "overlay", top[0].id, "lower")) as f:
        lower = f.read()
    with open(os.path.join(graph, "overlay", base[0].id, "link")) as f:
        base0 = f.read().strip()
    assert lower.count("l/") == 2 and lower.endswith(f"l/{base0}"), lower
    assert check(share).problems == []
