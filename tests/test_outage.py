"""The node never waits on its share for its own work: with the share's server SIGSTOP'd (a hung
server, as an NFS hard mount sees it: sshfs without keepalives, so nothing fails fast on its
own), what the node owns or the view already knows answers from the first second: the runtime's
files at the graph root, creating and renaming in the managed directories, lookups of names the
share's last known view does not hold, `podman ps`, `exec` and `run` of a node-local image, and
`podman images` / `image inspect` of a shared image (its small files are kept on the node).
Measured from the moment the server stops, each bounded well below graftfs' own time limit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, GraftMount, graftfs_cmd, needs_mount, sh, wait_for
from graftfs.share.sample import BUSYBOX, busybox_image_tar
from residue import assert_no_residue
from sshshare import ssh_share
from test_reliability import _unmount_below, shared_and_local_images

pytestmark = [needs_mount, pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"), reason="needs openssh-server")]

#: What "from the first second" allows: a podman run costs about a second here by itself.
LOCAL_BOUND = 3.0
#: graftfs' time limit in these mounts: anything that waited on the share would take this long.
LIMIT = 10.0


def _timed(*argv: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    res = sh(*argv, timeout=LIMIT * 3)
    return time.monotonic() - started, res


@pytest.mark.timeout(240)
@pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static is not installed")
def test_node_local_work_never_waits_on_a_hung_share(tmp_path: Path, mount_factory: object) -> None:
    export, local_tar = shared_and_local_images(tmp_path)
    from graftfs_soak.load import Node  # on the path now
    with ssh_share(tmp_path, str(export), keepalive=False) as ssh:
        rw = tmp_path / "rw"
        rw.mkdir()
        g: GraftMount = mount_factory(str(rw), [ssh.mnt], "--layout", "containers-storage",  # type: ignore[operator]
                                      "-o", f"timeout={LIMIT:g},lease=0")
        node = Node.create("node", g.mnt, str(tmp_path / "node"))
        daemon = g.proc.pid if g.proc else 0
        try:
            node.must("import", "-q", local_tar, "localhost/local:1")
            # listing and inspecting the shared image keeps its small files on the node
            images = sorted(node.must("images", "--format", "{{.Repository}}:{{.Tag}}").split())
            assert images == ["localhost/local:1", "localhost/shared:1"], images
            inspected = node.must("image", "inspect", "--format", "{{.Id}} {{.Architecture}}", "localhost/shared:1")
            node.must("run", "-d", "--name", "up", "localhost/local:1", "sleep", "1000")
            assert node.must("run", "--rm", "localhost/local:1", "echo", "ok") == "ok\n"
            assert os.path.exists(g.path("defaultNetworkBackend"))  # the runtime's own file at the root
            ssh.pause()  # the server stops answering; sshfs waits for it forever
            hung_at = time.monotonic()
            run = node.podman("run", "--rm", "localhost/local:1", "echo", "local run", timeout=60)
            run_done = time.monotonic() - hung_at
            assert run.code == 0 and run.out == "local run\n", run
            assert run_done < LOCAL_BOUND + 1.5, f"a node-local run took {run_done:.1f} s into the hang"
            for argv in (["stat", g.path("defaultNetworkBackend")], ["stat", g.path("overlay-layers")],
                         ["ls", g.mnt], ["touch", g.path("new-at-the-root")],
                         ["mkdir", "-p", g.path("overlay-layers", "made-in-the-hang")],
                         ["mv", g.path("new-at-the-root"), g.path("overlay-images", "moved-in-the-hang")],
                         ["stat", "-c", "%n", g.path("no-such-name")]):
                took, res = _timed(*argv)
                wanted = 1 if argv[-1].endswith("no-such-name") else 0
                assert res.returncode == wanted, (argv, res.stderr)
                assert took < LOCAL_BOUND, f"{' '.join(argv)} took {took:.1f} s during the hang"
            ps = node.podman("ps", "--format", "{{.Names}}", timeout=60)
            assert ps.code == 0 and ps.out.split() == ["up"], ps
            execd = node.podman("exec", "up", "echo", "still up", timeout=60)
            assert execd.code == 0 and execd.out == "still up\n", execd
            # the shared image stays listed and inspectable, from the first second and on
            listed = node.podman("images", "--format", "{{.Repository}}:{{.Tag}}", timeout=60)
            assert listed.code == 0 and sorted(listed.out.split()) == images, listed
            again = node.podman("image", "inspect", "--format", "{{.Id}} {{.Architecture}}", "localhost/shared:1")
            assert again.code == 0 and again.out == inspected, again
            assert time.monotonic() - hung_at < LIMIT, "the node's own work waited for graftfs' time limit"
            wait_for(lambda: not g.status()["ro"][1]["available"], 3 * LIMIT,  # type: ignore[index]
                     "graftfs to call the hung share unavailable")
            later = node.podman("images", "--format", "{{.Repository}}:{{.Tag}}", timeout=60)
            assert later.code == 0 and sorted(later.out.split()) == images, later
            cache = g.status()["cache"]
            assert cache["images"] == 1 and cache["hits"] > 0, cache  # type: ignore[index]
            ssh.resume()
            wait_for(lambda: node.podman("run", "--rm", "localhost/local:1", "true", timeout=60).code == 0, 30,
                     "runs after the share is back")
        finally:
            ssh.resume()
            node.clean()
            assert g.stop() == 0, g.log_text()[-3000:]
    assert_no_residue([str(tmp_path)], rw_trees=[str(rw)], shares=[str(export)], daemons=[daemon],
                      mountpoints=[g.mnt])


@pytest.mark.timeout(180)
@pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static is not installed")
def test_publish_onto_a_share_that_cannot_keep_link_owners(tmp_path: Path, mount_factory: object) -> None:
    """sftp cannot set the owner or times of a symbolic link: publish says so in one line and
    goes on, keeping everything else; a node runs the image from that share."""
    sys.path.insert(0, str(REPO / "tools"))
    from graftfs_soak.load import Node

    tar = busybox_image_tar(str(tmp_path / "image"))
    export = tmp_path / "share"
    export.mkdir()
    writer = Node.create("writer", str(tmp_path / "writer-graph"), str(tmp_path / "writer"))
    try:
        writer.must("import", "-q", tar, "localhost/over-sftp:1")
        with ssh_share(tmp_path, str(export)) as ssh:
            pub = graftfs_cmd("publish", "--graph", writer.graph, "--share", ssh.mnt, "localhost/over-sftp:1",
                              timeout=120)
            assert pub.returncode == 0, pub.stderr
            notes = [line for line in pub.stderr.splitlines() if "cannot keep" in line]
            assert len(notes) == 1 and "symbolic links" in notes[0], pub.stderr
            rw = tmp_path / "rw"
            rw.mkdir()
            g: GraftMount = mount_factory(str(rw), [ssh.mnt], "--layout", "containers-storage")  # type: ignore[operator]
            node = Node.create("node", g.mnt, str(tmp_path / "node"))
            try:
                out = node.must("run", "--rm", "localhost/over-sftp:1", "sh", "-c", "stat -c '%a %u' /bin/busybox")
                local = os.stat(os.path.join(tmp_path, "image", "rootfs", "bin", "busybox"))
                assert out.split() == [f"{local.st_mode & 0o7777:o}", "0"], out
            finally:
                node.clean()
                assert g.stop() == 0, g.log_text()[-3000:]
    finally:
        writer.clean()
        _unmount_below(str(tmp_path / "writer-graph"))
