"""Concurrent runtime load, bounded in time: real podman on two graftfs nodes over one share
(tools/graftfs_soak/load.py): parallel import/load/rmi/run/exec on node A and runs on node B of
the image A published — zero errors, then nothing left behind. tools/soak runs the same load
for minutes."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import REPO, GraftMount, needs_mount, wait_for
from graftfs.share.sample import BUSYBOX, busybox_image_tar
from residue import assert_no_residue

sys.path.insert(0, str(REPO / "tools"))
from graftfs_soak.load import Load, Node, graftfs_cli, rss_kib

pytestmark = [needs_mount, pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")]

MountFactory = Callable[..., GraftMount]
#: Seconds of load: with setup and teardown the test stays near a minute on a 2-vCPU VM.
LOAD_SECONDS = 25.0


@pytest.mark.timeout(300)
def test_concurrent_runtime_load_on_two_nodes(tmp_path: Path, mount_factory: MountFactory) -> None:
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed")
    share = str(tmp_path / "share")
    os.mkdir(share)
    tar = busybox_image_tar(str(tmp_path / "image"))
    graphs = {}
    nodes = []
    for name in ("a", "b"):
        rw = tmp_path / name / "rw"
        rw.mkdir(parents=True)
        graphs[name] = mount_factory(str(rw), [share], "--layout", "containers-storage", name=f"{name}-graph")
        nodes.append(Node.create(name, graphs[name].mnt, str(tmp_path / name)))
    load = Load(nodes[0], nodes[1], share, tar, str(tmp_path), graftfs_cli)
    daemons = [g.proc.pid for g in graphs.values() if g.proc is not None]
    try:
        load.prepare()
        rss_before = [rss_kib(pid) for pid in daemons]
        stats = load.run(LOAD_SECONDS)
        rss_after = [rss_kib(pid) for pid in daemons]
    finally:
        load.close()
    print(f"\n{stats.total} operations in {LOAD_SECONDS:g} s, {len(stats.errors)} errors; daemon RSS (KiB) "
          f"{rss_before} -> {rss_after}\n{stats.summary()}")
    assert not stats.errors, "\n".join(stats.errors[:20])
    # every kind of operation really ran, on both nodes
    for kind in ("import", "rmi", "load", "tag", "run-a", "exec", "run-b"):
        assert stats.ops.get(kind, 0) >= 2, stats.ops
    assert all(g.status()["pid"] for g in graphs.values())  # both daemons still serving
    # the layers A removed are deleted (in the background); then unmount and look for residue
    for g in graphs.values():
        trash = os.path.join(g.rw, ".graftfs", "tmp")
        wait_for(lambda t=trash: not os.path.exists(t) or not os.listdir(t), 30, "deleted layers to be swept")  # type: ignore[misc]
        assert g.stop() == 0, g.log_text()[-3000:]
    assert_no_residue([str(tmp_path), *(n.short for n in nodes)], rw_trees=[g.rw for g in graphs.values()],
                      shares=[share], daemons=daemons, mountpoints=[g.mnt for g in graphs.values()])
