"""The shared image lifecycle with real podman nodes: leases keep a retired image's layers while a
node's container uses them, a killed node's leases lapse, and a pinned image keeps a node going
while the share is out of reach. Nodes renew leases every 0.5 s here (TTL 2 s) to keep it quick."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import pytest

from conftest import graftfs_cmd, wait_for
from test_podman import Node, busybox_tar, make_node, needs_mount, share  # noqa: F401  (fixtures)

pytestmark = [needs_mount, pytest.mark.timeout(300)]

LEASE = ("-o", "lease=0.5")
MakeNode = Callable[..., Node]


def _layers_json(node: Node) -> set[str]:
    with open(os.path.join(node.mount.mnt, "overlay-layers", "layers.json")) as f:
        return {r["id"] for r in json.load(f)}


def _publish(node: Node, share: str, image: str) -> dict[str, object]:
    res = graftfs_cmd("publish", "--graph", node.mount.mnt, "--share", share, "--json", image, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["images"][0]  # type: ignore[no-any-return]


def _gc(share: str) -> dict[str, object]:
    res = graftfs_cmd("gc", "--share", share, "--grace", "0", "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def _lease_layers(share: str, node: Node) -> set[str]:
    """The layers a node's lease in the share names right now."""
    nodes = os.path.join(share, ".graftfs-nodes")
    if not os.path.isdir(nodes):
        return set()  # no node has written its lease yet (each renews within a second)
    for name in os.listdir(nodes):
        try:
            with open(os.path.join(nodes, name, "lease.json")) as f:
                lease = json.load(f)
        except FileNotFoundError:
            continue  # a node's directory is made before its first lease is renamed into it
        if lease["node"] == node.mount.status()["leases"]["node"]:  # type: ignore[index]
            return set(lease["layers"])
    return set()


def test_retired_image_stays_while_a_node_uses_it(make_node: MakeNode, share: str, busybox_tar: str) -> None:
    a = make_node("a", share, *LEASE)
    b = make_node("b", share, *LEASE)
    a.podman("import", busybox_tar, "localhost/app:1")
    a.podman("run", "--name", "build", "localhost/app:1", "sh", "-c", "echo v1 > /version")
    a.podman("commit", "-q", "build", "localhost/app:2")
    image = _publish(a, share, "localhost/app:2")
    layers = {la["id"] for la in image["layers"]}  # type: ignore[attr-defined]
    wait_for(lambda: "localhost/app:2" in b.images(), 10, "B to see the published image")
    b.podman("run", "-d", "--name", "svc", "localhost/app:2", "sleep", "600")
    wait_for(lambda: layers <= _lease_layers(share, b), 10, "B's lease to name the image's layers")

    res = graftfs_cmd("unpublish", "--share", share, "localhost/app:2")
    assert res.returncode == 0 and "retired" in res.stdout, res.stderr
    wait_for(lambda: "localhost/app:2" not in b.images(), 10, "B to stop offering the retired image")
    time.sleep(2.5)  # past every lease TTL: only the lease itself keeps the layers now
    plan = _gc(share)
    assert plan["images"] == [] and plan["layers"] == [], plan
    assert all(os.path.isdir(os.path.join(share, "overlay", lid, "diff")) for lid in layers)
    assert b.podman("exec", "svc", "cat", "/version").stdout == "v1\n"  # B's container keeps working

    b.podman("rm", "-f", "-t", "0", "svc")
    wait_for(lambda: not (layers & _lease_layers(share, b)), 10, "B's lease to drop the layers")
    # A still has its own copy of the image and a container on it: those are in its RW tree and
    # never in the share's way (A's lease names none of the share's layers)
    plan = _gc(share)
    assert plan["images"] == [image["id"]] and set(plan["layers"]) == layers, plan  # type: ignore[arg-type]
    assert not any(os.path.exists(os.path.join(share, "overlay", lid)) for lid in layers)
    wait_for(lambda: not (layers & _layers_json(b)), 10, "B's view to drop the deleted layers")
    assert "localhost/app:2" not in b.images()
    assert graftfs_cmd("fsck", "--share", share).returncode == 0
    assert b.podman("images", "-q").stdout.strip() == ""


def test_killed_node_leases_lapse(make_node: MakeNode, share: str, busybox_tar: str) -> None:
    a = make_node("a", share, *LEASE)
    b = make_node("b", share, *LEASE)
    a.podman("import", busybox_tar, "localhost/app:1")
    image = _publish(a, share, "localhost/app:1")
    layers = {la["id"] for la in image["layers"]}  # type: ignore[attr-defined]
    wait_for(lambda: "localhost/app:1" in b.images(), 10, "B to see the published image")
    b.podman("create", "--name", "later", "localhost/app:1", "true")
    wait_for(lambda: layers <= _lease_layers(share, b), 10, "B's lease to name the image's layers")
    assert b.mount.proc is not None
    b.mount.proc.kill()  # no cleanup at all: the lease file stays behind
    assert b.mount.stop() == -9
    assert graftfs_cmd("unpublish", "--share", share, image["id"]).returncode == 0  # type: ignore[arg-type]
    assert _gc(share)["layers"] == []  # B's lease still counts
    time.sleep(2.5)  # B's TTL (4 periods of 0.5 s)
    stats = json.loads(graftfs_cmd("status", "--share", share, "--json").stdout)
    assert [n["live"] for n in stats["nodes"] if n["layers"]] == [False]
    plan = _gc(share)
    assert set(plan["layers"]) == layers, plan  # type: ignore[arg-type]
    b.mount.start()  # the node comes back: its container's image is gone, podman still works
    assert "localhost/app:1" not in b.images()


def test_pinned_image_runs_while_the_share_is_away(make_node: MakeNode, share: str, busybox_tar: str) -> None:
    a = make_node("a", share)
    b = make_node("b", share)
    a.podman("import", busybox_tar, "localhost/pinned:1")
    a.podman("run", "--name", "c", "localhost/pinned:1", "sh", "-c", "echo other > /o")
    a.podman("commit", "-q", "c", "localhost/other:1")
    _publish(a, share, "localhost/pinned:1")
    _publish(a, share, "localhost/other:1")
    wait_for(lambda: {"localhost/pinned:1", "localhost/other:1"} <= b.images(), 10, "B to see both images")
    res = graftfs_cmd("pin", "--graph", b.mount.mnt, "localhost/pinned:1", timeout=120)
    assert res.returncode == 0 and "pinned (1 of 1 layers copied" in res.stdout, res.stdout + res.stderr
    # the pin is a change of a shared tree: the view shows it within the watcher's latency
    wait_for(lambda: bool(b.mount.status()["pins"]), 10, "B's status to list the pin")
    status = b.mount.status()
    assert [p["names"] for p in status["pins"]] == [["localhost/pinned:1"]]  # type: ignore[index]
    assert status["pins"][0]["bytes"] > 500_000  # type: ignore[index]  # busybox, as its record counts it
    diff = _diff_of(b, "localhost/pinned:1")
    wait_for(lambda: "/.graftfs/pins/" in os.readlink(diff), 10, "the view to use the pinned copy")
    assert b.images() >= {"localhost/pinned:1", "localhost/other:1"}  # each listed once
    assert len(b.podman("images", "-q").stdout.split()) == 2

    away = share + ".away"
    os.rename(share, away)  # the share is gone (an NFS server out of reach looks the same to readers)
    try:
        wait_for(lambda: any(t.get("unavailable_since") for t in b.mount.status()["ro"]),  # type: ignore[union-attr]
                 10, "B to notice the share is gone")
        assert b.podman("run", "--rm", "localhost/pinned:1", "echo", "from the pin").stdout == "from the pin\n"
        started = time.monotonic()
        res = b.podman("run", "--rm", "localhost/other:1", "cat", "/o", check=False, timeout=60)
        assert res.returncode != 0 and time.monotonic() - started < 30, res
        # its records and small files are on the node (listed, inspectable); its layers are not:
        # podman names the layer file it cannot reach, at once
        assert "input/output error" in res.stderr and "/overlay/" in res.stderr, res.stderr
    finally:
        os.rename(away, share)
    wait_for(lambda: not any(t.get("unavailable_since") for t in b.mount.status()["ro"]),  # type: ignore[union-attr]
             10, "B to see the share again")
    assert b.podman("run", "--rm", "localhost/other:1", "cat", "/o").stdout == "other\n"
    # unpinned while a container runs on the copy: the copy stays until the container is gone
    b.podman("run", "-d", "--name", "on-pin", "localhost/pinned:1", "sleep", "600")
    res = graftfs_cmd("unpin", "--graph", b.mount.mnt, "localhost/pinned:1", timeout=60)
    assert res.returncode == 0 and "kept layer" in res.stdout, res.stdout + res.stderr
    pinned_copy = os.path.join(b.mount.rw, ".graftfs", "pins", "overlay", os.path.basename(os.path.dirname(diff)))
    wait_for(lambda: b.mount.status()["pins"] == [], 10, "B's status to drop the unpinned image")
    assert os.path.isdir(pinned_copy)
    assert b.podman("exec", "on-pin", "echo", "still").stdout == "still\n"
    b.podman("rm", "-f", "-t", "0", "on-pin")
    started = time.monotonic()
    # the view moves to the share's copy before the pinned one goes: never a moment without one
    while os.path.exists(pinned_copy) and time.monotonic() - started < 60:
        assert os.readlink(diff).startswith((pinned_copy, share + "/")), os.readlink(diff)
    assert not os.path.exists(pinned_copy) and os.readlink(diff).startswith(share + "/")
    assert b.podman("run", "--rm", "localhost/pinned:1", "echo", "ok").stdout == "ok\n"


def _diff_of(node: Node, image: str) -> str:
    return node.podman("image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", image).stdout.strip()
