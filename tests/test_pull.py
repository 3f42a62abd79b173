"""Real `podman pull` from a real registry onto graftfs nodes.

The images come from tests/registry.py: built on a native podman graph and pushed to a registry
on 127.0.0.1, so what a node pulls never went through graftfs before. What a pull fetched is read
from the registry's access log (one line per blob served), never from podman's output, which
says "Copying blob" for reused blobs too.

Shown here: single- and multi-layer images pull and run on a graftfs node, a 200 MiB layer is
written and read beside FUSE, a layer published on the share is not downloaded again by another
node (but is, once that node removed the image), and pulls racing with each other, with `rmi`
and `run`, and on two nodes at once all succeed and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest

from conftest import graftfs_cmd, needs_mount, wait_for
from graftfs.node.mounts import mount_table
from registry import BIG_BYTES, REGISTRY_BIN, Image, Images, Registry, pushed_images, registry  # noqa: F401
from residue import live_processes_naming, temp_files
from test_podman import Node, make_node, share  # noqa: F401  (fixtures)

pytestmark = [
    needs_mount,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
    pytest.mark.skipif(shutil.which(REGISTRY_BIN) is None, reason="docker-registry (distribution) is not installed"),
]

MakeNode = Callable[..., Node]


def _pull(node: Node, image: Image, check: bool = True) -> CompletedProcess[str]:
    res = node.podman("pull", "-q", "--tls-verify=false", image.ref, check=False)
    if check:
        _assert_ok([res])
    return res


def _contents(node: Node, image: Image) -> dict[str, str]:
    """What a container of ``image`` on ``node`` shows for the image's recorded files."""
    if not image.files:
        return {}
    # the big file by its digest, the others by their text
    script = "; ".join(f"echo {path} $(sha256sum {path} | cut -c1-64)" if path == "/big" else
                       f"echo {path} $(cat {path})" for path in image.files)
    out = node.podman("run", "--rm", image.ref, "sh", "-c", script).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def _upper_dir(node: Node, image: Image) -> str:
    """The top layer's diff directory of ``image``, as podman names it (below the mountpoint)."""
    return node.podman("image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", image.ref).stdout.strip()


def _layer_records(graph: str) -> list[dict[str, Any]]:
    """The layer records containers/storage reads from ``graph`` (a node's view or its RW tree)."""
    try:
        with open(os.path.join(graph, "overlay-layers", "layers.json")) as f:
            return json.loads(f.read() or "[]")
    except FileNotFoundError:
        return []


def _short_dir(node: Node) -> str:
    """The node's runroot/TMPDIR parent: conmon and podman name it on their command lines."""
    return os.path.dirname(node.env["TMPDIR"])


def _errors_in_log(node: Node) -> list[str]:
    return [line for line in node.mount.log_text().splitlines() if " ERROR " in line or "Traceback" in line]


def _settles(left: Callable[[], list[str]], what: str) -> None:
    """Wait (bounded) until ``left()`` is empty: processes exit and temp files go a moment after
    the command that made them has returned."""
    try:
        wait_for(lambda: not left(), 10, what)
    except AssertionError:
        raise AssertionError(f"{what} left behind: {left()}") from None


def _assert_clean(node: Node, share: str) -> None:
    """Nothing of the node's pulls, runs and removals is left over: no container, no container
    mount, no process, no temp file of podman or graftfs, no half-made layer, no error logged."""
    assert node.podman("ps", "-a", "-q").stdout.strip() == ""
    mnt = node.mount.mnt
    assert not [m.mountpoint for m in mount_table() if m.fstype == "overlay" and m.mountpoint.startswith(mnt + "/")]
    tmp = node.env["TMPDIR"]
    _settles(lambda: os.listdir(tmp), f"podman's temp files in {tmp}")
    _settles(lambda: live_processes_naming([_short_dir(node)]), "processes of the node's podman")
    _settles(lambda: temp_files([node.mount.rw], [share]), "graftfs temp files")
    layers = _layer_records(mnt)
    assert not [la["id"] for la in layers if (la.get("flags") or {}).get("incomplete")], layers
    assert not _errors_in_log(node), _errors_in_log(node)


def _in_parallel(*jobs: Callable[[], CompletedProcess[str]]) -> list[CompletedProcess[str]]:
    """Run the jobs at the same moment (each in its thread, released together)."""
    start = threading.Barrier(len(jobs))

    def run(job: Callable[[], CompletedProcess[str]]) -> CompletedProcess[str]:
        start.wait(timeout=30)
        return job()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(run, jobs))


def _assert_ok(results: list[CompletedProcess[str]]) -> None:
    """Every command succeeded, and none logged an error on the way (podman goes on after some)."""
    failed = [f"podman {' '.join(r.args)}: exit {r.returncode}\n{r.stderr[-2000:]}" for r in results
              if r.returncode or "level=error" in r.stderr or "ERRO[" in r.stderr]
    assert not failed, "\n".join(failed)


def _publish(node: Node, share: str, image: Image) -> list[str]:
    """Publish ``image`` from ``node`` to the share; returns its layer ids, bottom first."""
    res = graftfs_cmd("publish", "--graph", node.mount.mnt, "--share", share, "--json", image.ref, timeout=120)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)["images"][0]
    assert summary["status"] == "published", summary
    return [la["id"] for la in summary["layers"]]


def test_pull_and_run_single_and_multi_layer_images(make_node: MakeNode, share: str, registry: Registry,
                                                    pushed_images: Images) -> None:
    node = make_node("node", share)
    mark = registry.mark()
    images = (pushed_images.base, pushed_images.app, pushed_images.multi)
    for image in images:
        _pull(node, image)
    assert node.images() == {image.ref for image in images}
    # a fresh node downloads every layer, each once: the base's blob only for the first image,
    # the later pulls reuse the node's own copy
    got = registry.blob_gets(since=mark)
    wanted = {d for image in images for d in [*image.layers, image.config]}
    assert set(got) == wanted and set(got.values()) == {1}, got
    for image in images:
        assert _contents(node, image) == image.files, image.ref
    # the pulled layers are the node's own: records and data in its RW tree
    upper = _upper_dir(node, pushed_images.multi)
    assert upper.startswith(node.mount.mnt + "/"), upper
    assert os.path.realpath(upper) == os.path.join(node.mount.rw, upper[len(node.mount.mnt) + 1:]), upper
    assert len(_layer_records(node.mount.rw)) == 5  # base, app's top, multi's three
    _assert_clean(node, share)


def test_big_layer_pull_bypasses_fuse(make_node: MakeNode, share: str, registry: Registry,
                                      pushed_images: Images) -> None:
    """A pulled layer is unpacked into the layer's diff directory, which the view shows as a link
    to the RW tree: 200 MiB are written, then read back by a container, beside FUSE."""
    node = make_node("node", share)
    big = pushed_images.big
    mark = registry.mark()
    before = node.mount.status()
    _pull(node, big)
    assert _contents(node, big) == big.files  # sha256 of the 200 MiB file, read in the container
    after = node.mount.status()
    written = int(after["bytes_written"]) - int(before["bytes_written"])  # type: ignore[call-overload]
    read = int(after["bytes_read"]) - int(before["bytes_read"])  # type: ignore[call-overload]
    assert written < 4 << 20 and read < 4 << 20, (written, read)  # records and tar-split only
    assert registry.blob_gets(since=mark)[big.layers[1]] == 1
    data = os.path.realpath(os.path.join(_upper_dir(node, big), "big"))
    assert data.startswith(os.path.join(node.mount.rw, "overlay") + "/"), data
    assert os.path.getsize(data) == BIG_BYTES
    _assert_clean(node, share)


def test_pull_reuses_a_layer_published_on_the_share(make_node: MakeNode, share: str, registry: Registry,
                                                    pushed_images: Images) -> None:
    """containers/image looks a blob up in the storage's layers by compressed and uncompressed
    digest: the records graftfs shows from the share carry both, so node B downloads only what
    it lacks."""
    a, b = make_node("a", share), make_node("b", share)
    app, multi = pushed_images.app, pushed_images.multi
    _pull(a, app)
    base_id = _publish(a, share, app)[0]
    wait_for(lambda: app.ref in b.images(), 10, "node B to list the published image")
    mark = registry.mark()
    _pull(b, multi)
    got = registry.blob_gets(since=mark)
    base_blob = multi.layers[0]
    assert got[base_blob] == 0, f"node B downloaded the base layer it sees on the share: {got}"
    assert set(got) == {*multi.layers[1:], multi.config} and set(got.values()) == {1}, got
    assert b.images() == {app.ref, multi.ref}
    assert _contents(b, multi) == multi.files
    # B's multi stands on the share's base layer: no copy of it in B's RW tree
    assert not os.path.exists(os.path.join(b.mount.rw, "overlay", base_id, "diff"))
    parents = b.podman("image", "inspect", "--format", "{{.RootFS.Layers}}", multi.ref).stdout
    assert parents.count("sha256:") == 4, parents
    # pulling the published image itself fetches none of its layers (the config only, to check it)
    mark = registry.mark()
    _pull(b, app)
    got = registry.blob_gets(since=mark)
    assert set(got) <= {app.config}, got
    assert _contents(b, app) == app.files
    for node in (a, b):
        _assert_clean(node, share)


def test_parallel_pulls_on_one_node(make_node: MakeNode, share: str, registry: Registry,
                                    pushed_images: Images) -> None:
    """Four images sharing a base layer pulled at once (the big one keeps the store busy while the
    others commit): each pull may create that layer; all must succeed and agree on one copy."""
    node = make_node("node", share)
    images = (pushed_images.app, pushed_images.multi, pushed_images.tool, pushed_images.big)
    mark = registry.mark()
    _assert_ok(_in_parallel(*(lambda image=image: _pull(node, image, check=False) for image in images)))
    got = registry.blob_gets(since=mark)
    assert all(got[d] == 1 for image in images for d in image.layers[1:]), got
    assert node.images() == {image.ref for image in images}
    # one record per layer: the base layer the pulls raced to create exists once
    records = _layer_records(node.mount.mnt)
    base_diff = node.podman("image", "inspect", "--format", "{{index .RootFS.Layers 0}}", images[0].ref).stdout.strip()
    assert [r["diff-digest"] for r in records].count(base_diff) == 1, records
    assert len(records) == 1 + sum(len(image.layers) - 1 for image in images), records
    for image in images:
        assert _contents(node, image) == image.files, image.ref
    _assert_clean(node, share)


def test_pull_while_rmi_and_run_on_one_node(make_node: MakeNode, share: str, pushed_images: Images) -> None:
    """A pull, an `rmi` of another image and a `run` of a third, at once, twice over: the pull
    creates layers on the base the removed image also used, while a container runs on it."""
    node = make_node("node", share)
    app, multi, tool = pushed_images.app, pushed_images.multi, pushed_images.tool
    _pull(node, app)
    _pull(node, tool)
    run_tool = "cat /tool.txt; sleep 0.5; cat /tool.txt"  # a container alive through the pull and rmi
    for pulled, removed in ((multi, app), (app, multi)):
        results = _in_parallel(lambda: _pull(node, pulled, check=False),  # noqa: B023  (joined in the loop)
                               lambda: node.podman("rmi", removed.ref, check=False),  # noqa: B023
                               lambda: node.podman("run", "--rm", tool.ref, "sh", "-c", run_tool, check=False))
        _assert_ok(results)
        token = tool.files["/tool.txt"]
        assert results[2].stdout == f"{token}\n{token}\n", results[2].stdout
        assert node.images() == {pulled.ref, tool.ref}
        assert _contents(node, pulled) == pulled.files
    _assert_clean(node, share)


def test_two_nodes_pull_at_once_over_a_published_base(make_node: MakeNode, share: str, registry: Registry,
                                                       pushed_images: Images) -> None:
    """Two readers of the share pull, at the same moment, different images on the base layer a
    third node published: both use the share's copy, neither downloads it."""
    a, b, c = make_node("a", share), make_node("b", share), make_node("c", share)
    base, app, multi = pushed_images.base, pushed_images.app, pushed_images.multi
    _pull(a, base)
    base_id = _publish(a, share, base)[0]
    wait_for(lambda: base.ref in b.images() and base.ref in c.images(), 10, "nodes B and C to list the base")
    mark = registry.mark()
    _assert_ok(_in_parallel(lambda: _pull(b, app, check=False), lambda: _pull(c, multi, check=False)))
    got = registry.blob_gets(since=mark)
    assert got[base.layers[0]] == 0, f"a node downloaded the base layer it sees on the share: {got}"
    assert set(got) == {app.layers[1], *multi.layers[1:], app.config, multi.config}, got
    assert b.images() == {base.ref, app.ref} and c.images() == {base.ref, multi.ref}
    assert _contents(b, app) == app.files and _contents(c, multi) == multi.files
    for node in (b, c):  # each stands on the share's base layer, no copy of it in RW
        assert not os.path.exists(os.path.join(node.mount.rw, "overlay", base_id, "diff"))
        assert base_id not in {r["id"] for r in _layer_records(node.mount.rw)}
        assert [r["id"] for r in _layer_records(node.mount.mnt)].count(base_id) == 1
    for node in (a, b, c):
        _assert_clean(node, share)
    assert Path(share, "overlay", base_id, "diff").is_dir()


def test_pull_again_after_rmi_of_a_shared_image(make_node: MakeNode, share: str, registry: Registry,
                                                pushed_images: Images) -> None:
    """`rmi` of a published image hides it (and its layers) for this node only; pulling it again
    downloads the layers and recreates them, with the same ids, in the node's RW tree."""
    a, b = make_node("a", share), make_node("b", share)
    app = pushed_images.app
    _pull(a, app)
    layer_ids = _publish(a, share, app)
    wait_for(lambda: app.ref in b.images(), 10, "node B to list the published image")
    b.podman("rmi", app.ref)
    assert app.ref not in b.images()
    mark = registry.mark()
    _pull(b, app)
    got = registry.blob_gets(since=mark)
    assert set(got) == {*app.layers, app.config} and set(got.values()) == {1}, got
    assert sorted(r["id"] for r in _layer_records(b.mount.rw)) == sorted(layer_ids)
    assert sorted(r["id"] for r in _layer_records(b.mount.mnt)) == sorted(layer_ids)  # hidden shared ones stay out
    for lid in layer_ids:
        diff = os.path.realpath(os.path.join(b.mount.mnt, "overlay", lid, "diff"))
        assert diff == os.path.join(b.mount.rw, "overlay", lid, "diff"), diff
    assert _contents(b, app) == app.files
    assert _contents(a, app) == app.files  # A, and the share, are untouched
    for node in (a, b):
        _assert_clean(node, share)
