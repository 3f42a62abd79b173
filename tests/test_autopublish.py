"""Images reach the share by themselves (``-o publish=auto``), and the node that published an
image keeps its own copy: its containers stay on its RW tree, unpublish and gc of the share's
copy never take the image from it, and nothing of it is left orphaned.

Real podman on graftfs nodes; images made without a registry, and pulled from a real one for the
first wave (three nodes pulling one new image at once). Nodes renew leases every 0.5 s (TTL 2 s)
to keep gc quick."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import graftfs_cmd, layer_diff, wait_for
from registry import Images, Registry, pushed_images, registry  # noqa: F401  (fixtures)
from test_podman import Node, busybox_tar, make_node, needs_mount, share  # noqa: F401  (fixtures)

pytestmark = [needs_mount, pytest.mark.timeout(300)]

AUTO = ("-o", "publish=auto,lease=0.5")
LEASE = ("-o", "lease=0.5")
MakeNode = Callable[..., Node]


def _share_images(share: str) -> set[str]:
    try:
        return {n for n in os.listdir(os.path.join(share, "overlay-images")) if len(n) == 64}
    except FileNotFoundError:
        return set()


def _image_id(node: Node, image: str) -> str:
    return node.podman("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()


def _own_records(node: Node, index: str = "overlay-layers/layers.json") -> set[str]:
    """Ids in the node's own (RW) index file: what its runtime holds itself."""
    with open(os.path.join(node.mount.rw, index)) as f:
        return {r["id"] for r in json.load(f)}


def _diff_links(node: Node, lids: set[str]) -> dict[str, str]:
    return {lid: layer_diff(node.mount.mnt, lid) for lid in lids}


def _autopublish(node: Node) -> dict[str, object]:
    return node.mount.status()["autopublish"]  # type: ignore[return-value]


def _read_all(node: Node, container: str) -> int:
    """Read every file of a container's filesystem (its layers); returns how many were read."""
    res = node.podman("exec", container, "sh", "-c",
                      "find / -xdev -type f -not -path '/proc/*' -not -path '/sys/*' -exec cat {} + | wc -c")
    return int(res.stdout.strip())


def test_imported_image_reaches_the_share_by_itself(make_node: MakeNode, share: str, busybox_tar: str) -> None:
    a = make_node("a", share, *AUTO)
    b = make_node("b", share, *LEASE)
    a.podman("import", busybox_tar, "localhost/auto:1")
    iid = _image_id(a, "localhost/auto:1")
    started = time.monotonic()
    wait_for(lambda: "localhost/auto:1" in b.images(), 30, "B to see the image A imported")
    took = time.monotonic() - started
    assert b.podman("run", "--rm", "localhost/auto:1", "echo", "from-b").stdout == "from-b\n"
    assert _share_images(share) == {iid}
    status = _autopublish(a)
    assert status["published"] == 1 and status["failures"] == 0, status
    assert [r["result"] for r in status["recent"]] == ["published"], status  # type: ignore[attr-defined]
    fsck = graftfs_cmd("fsck", "--share", share, "--json")
    assert fsck.returncode == 0 and json.loads(fsck.stdout)["problems"] == [], fsck.stdout
    # the node's own layer stays a link to its own copy: its containers stay off FUSE
    own = _own_records(a)
    assert all(t.startswith(a.mount.rw) for t in _diff_links(a, own).values())
    # remembered: a remount does not publish it again, and nothing is pending
    a.mount.stop()
    a.mount.start()
    time.sleep(3)
    assert _autopublish(a)["published"] == 0 and _autopublish(a)["pending"] == []
    print(f"import on A to listed on B: {took:.1f} s")


def test_publish_match_selects_what_leaves_the_node(make_node: MakeNode, share: str, busybox_tar: str) -> None:
    a = make_node("a", share, "-o", "publish=auto,publish_match=localhost/public/*,"
                  "publish_match=!localhost/public/secret*")
    for name in ("localhost/private/app:1", "localhost/public/secret:1", "localhost/public/app:1"):
        a.podman("import", "--message", name, busybox_tar, name)  # its own config: its own image
    public = _image_id(a, "localhost/public/app:1")
    wait_for(lambda: public in _share_images(share), 30, "the public image on the share")
    time.sleep(4)  # longer than an image takes to settle: the others would be published by now
    assert _share_images(share) == {public}
    assert _autopublish(a)["match"] == ["localhost/public/*", "!localhost/public/secret*"]


def test_publishing_node_keeps_its_own_copy(make_node: MakeNode, share: str, busybox_tar: str) -> None:
    """One rule for the writer's copy: its own, kept. Containers started before, during and
    after the publish read their whole filesystem afterwards; unpublish and gc of the share's copy
    leave the image on the writer, with no directory its runtime does not know."""
    a = make_node("a", share, *AUTO)
    b = make_node("b", share, *LEASE)
    a.podman("import", busybox_tar, "localhost/base:1")
    a.podman("run", "--name", "c", "localhost/base:1", "sh", "-c", "head -c 3000000 /dev/urandom > /blob")
    a.podman("commit", "-q", "c", "localhost/app:1")
    a.podman("rm", "c")
    iid = _image_id(a, "localhost/app:1")
    a.podman("run", "-d", "--name", "before", "localhost/app:1", "sleep", "600")
    wait_for(lambda: iid in _share_images(share), 30, "A's image on the share")
    a.podman("run", "-d", "--name", "after", "localhost/app:1", "sleep", "600")
    own = _own_records(a)
    assert own and all(t.startswith(a.mount.rw) for t in _diff_links(a, own).values())
    # a later rewrite of A's index files (another image) keeps the published records A's own
    a.podman("import", busybox_tar, "localhost/other:1")
    assert own <= _own_records(a) and iid in _own_records(a, "overlay-images/images.json")
    for name in ("before", "after"):
        assert _read_all(a, name) > 3_000_000
    wait_for(lambda: "localhost/app:1" in b.images(), 30, "B to see the image")
    stats = json.loads(graftfs_cmd("status", "--share", share, "--json").stdout)
    assert stats["bytes_held_by_nodes"] > 3_000_000, stats  # A keeps its copy: not counted as saved
    kept = stats["bytes_stored"] + stats["bytes_held_by_nodes"]
    assert stats["bytes_saved"] == max(0, stats["bytes_without_sharing"] - kept), stats
    # the share's copy goes: A keeps the image, B loses it
    assert graftfs_cmd("unpublish", "--share", share, "localhost/app:1").returncode == 0
    wait_for(lambda: "localhost/app:1" not in b.images(), 10, "B to stop offering the retired image")
    assert "localhost/app:1" in a.images()
    time.sleep(2.5)  # every lease's TTL: gc may collect what no node claims
    plan = json.loads(graftfs_cmd("gc", "--share", share, "--grace", "0", "--json").stdout)
    assert iid in plan["images"], plan
    assert a.podman("run", "--rm", "localhost/app:1", "sh", "-c", "wc -c < /blob").stdout.strip() == "3000000"
    assert _read_all(a, "before") > 3_000_000
    # nothing orphaned: every layer and image directory in A's RW tree is one its runtime lists
    layers = {n for n in os.listdir(os.path.join(a.mount.rw, "overlay")) if len(n) == 64}
    images = {n for n in os.listdir(os.path.join(a.mount.rw, "overlay-images")) if len(n) == 64}
    assert layers <= _own_records(a)
    assert images <= _own_records(a, "overlay-images/images.json")
    # and republishing it is not automatic: the operator retired it
    assert iid not in _share_images(share)


def test_bad_publish_options_are_one_line_errors(tmp_path: str) -> None:
    for opts, words in [("publish=maybe", "publish= must be auto"),
                        ("publish_match=a b", "not an image-name pattern"),
                        ("publish_match=", "not an image-name pattern")]:
        res = graftfs_cmd("mount", "--rw", "/tmp", "--ro", "/srv", "-o", opts, "/mnt")
        assert res.returncode != 0 and words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = graftfs_cmd("mount", "--rw", "/tmp", "--ro", "/srv", "--layout", "isulad", "-o", "publish=auto", "/mnt")
    assert res.returncode != 0 and "containers-storage" in res.stderr, res.stderr


@pytest.mark.skipif(not os.path.exists("/usr/bin/docker-registry"), reason="docker-registry is not installed")
def test_first_wave_pulls_end_with_one_copy_on_the_share(make_node: MakeNode, share: str, registry: Registry,
                                                         pushed_images: Images) -> None:
    """Three publishing nodes pull the same new image at the same moment: every pull succeeds,
    the share ends up with one copy, and a node pulling after that fetches no layer blob."""
    nodes = [make_node(name, share, *AUTO) for name in ("a", "b", "c")]
    image = pushed_images.multi
    mark = registry.mark()
    with ThreadPoolExecutor(len(nodes)) as pool:
        results = list(pool.map(lambda n: n.podman("pull", "-q", "--tls-verify=false", image.ref, check=False),
                                nodes))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    wave = registry.blob_gets(since=mark)
    iid = _image_id(nodes[0], image.ref)
    wait_for(lambda: iid in _share_images(share), 30, "the pulled image on the share")
    wait_for(lambda: all(_autopublish(n)["pending"] == [] and _autopublish(n)["running"] is None for n in nodes),
             60, "every node's auto-publish to settle")
    for n in nodes:
        st = _autopublish(n)
        assert st["failures"] == 0, st
        assert [r["result"] for r in st["recent"]] in (["published"], ["already on the share"]), st  # type: ignore[attr-defined]
    layer_dirs = [d for d in os.listdir(os.path.join(share, "overlay")) if len(d) == 64]
    assert len(layer_dirs) == len(image.layers) and _share_images(share) == {iid}
    fsck = graftfs_cmd("fsck", "--share", share, "--json")
    assert fsck.returncode == 0 and json.loads(fsck.stdout)["problems"] == [], fsck.stdout
    late = make_node("d", share, *LEASE)
    wait_for(lambda: image.ref in late.images(), 30, "the late node to list the image")
    mark = registry.mark()
    assert late.podman("pull", "-q", "--tls-verify=false", image.ref).returncode == 0
    fetched = registry.blob_gets(since=mark)
    assert not set(fetched) & set(image.layers), fetched  # no layer blob for the late node
    assert late.podman("run", "--rm", image.ref, "cat", *image.files).returncode == 0
    print(f"first wave: {sum(wave.values())} blob fetches for 3 nodes; late node: {dict(fetched)}")
