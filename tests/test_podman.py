"""Real podman (containers/storage, native overlay driver) on graftfs graphs: one node's whole
lifecycle, and two nodes sharing images published by `graftfs publish`.

Each node gets its own storage.conf/containers.conf (graphroot on its graftfs mount, runroot in
a temp dir, runc, no network) through CONTAINERS_STORAGE_CONF/CONTAINERS_CONF; nothing under
/etc/containers or /var/lib/containers is touched. Images are built without a registry from a
busybox-static rootfs. Teardown removes containers and any mount podman left below the test's
directory before graftfs is unmounted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import GraftMount, graftfs_cmd, layer_diff, needs_mount, wait_for
from graftfs.linux import MNT_DETACH, umount
from graftfs.node.mounts import find_mount, mount_table
from graftfs.share.sample import BUSYBOX, busybox_image_tar

pytestmark = [needs_mount, pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")]

MountFactory = Callable[..., GraftMount]


@pytest.fixture(scope="module")
def busybox_tar(tmp_path_factory: pytest.TempPathFactory) -> str:
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed")
    return busybox_image_tar(str(tmp_path_factory.mktemp("image")))


@dataclass
class Node:
    """One node: a graftfs mount as podman's graph, and podman pointed at it."""

    name: str
    mount: GraftMount
    env: dict[str, str]

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        # output goes to files, not pipes: with a pipe, podman 4.3 waits ~20 s for conmon at exit
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            code = subprocess.run(["timeout", "-k", "5", str(timeout), "podman", *args], stdout=out, stderr=err,
                                  env=self.env, timeout=timeout + 15, stdin=subprocess.DEVNULL).returncode
            out.seek(0)
            err.seek(0)
            res = subprocess.CompletedProcess(args, code, out.read(), err.read())
        if check:
            assert res.returncode == 0, f"podman {' '.join(args)} on {self.name}: {res.stderr[-2000:]}"
        return res

    def images(self) -> set[str]:
        out = self.podman("images", "--format", "{{.ID}} {{.Repository}}:{{.Tag}}").stdout.split("\n")
        return {line.split()[1] for line in out if line.strip()}


@pytest.fixture
def make_node(tmp_path: Path, mount_factory: MountFactory) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    short = Path(tempfile.mkdtemp(prefix="gfs-", dir="/tmp"))  # conmon's socket paths must stay short

    def make(name: str, share: str, *options: str) -> Node:
        base = tmp_path / name
        rw, run, tmp = base / "rw", short / name / "run", short / name / "tmp"
        for d in (rw, run, tmp):
            d.mkdir(parents=True)
        mount = mount_factory(str(rw), [share], "--layout", "containers-storage", *options, name=f"{name}-graph")
        (base / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{mount.mnt}"\nrunroot = "{run}"\n')
        (base / "containers.conf").write_text(
            '[containers]\nnetns = "none"\ndefault_ulimits = ["nofile=10000:10000", "nproc=32768:32768"]\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'tmp_dir = "{run}/libpod-tmp"\n')
        env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
               "CONTAINERS_CONF": str(base / "containers.conf"), "TMPDIR": str(tmp)}
        node = Node(name, mount, env)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.podman("rm", "-af", "-t", "0", timeout=60, check=False)
        node.podman("unmount", "-a", timeout=60, check=False)
    _unmount_below(str(tmp_path), keep={n.mount.mnt for n in nodes})
    _unmount_below(str(short), keep=set())
    shutil.rmtree(short, ignore_errors=True)


def _unmount_below(top: str, keep: set[str]) -> None:
    """Detach what podman may have left mounted below ``top`` (deepest first)."""
    for entry in sorted(mount_table(), key=lambda m: -len(m.mountpoint)):
        if entry.mountpoint.startswith(top + "/") and entry.mountpoint not in keep:
            with contextlib.suppress(OSError):
                umount(entry.mountpoint, MNT_DETACH)


@pytest.fixture
def share(tmp_path: Path) -> str:
    path = tmp_path / "share"
    path.mkdir()  # empty: the first publish lays it out
    return str(path)


def test_podman_lifecycle_on_one_node(make_node: Callable[[str, str], Node], share: str, busybox_tar: str) -> None:
    node = make_node("node", share)
    info = json.loads(node.podman("info", "--format", "json").stdout)
    status = dict(info["store"]["graphStatus"])
    assert info["store"]["graphDriverName"] == "overlay" and status.get("Native Overlay Diff") == "true", status
    assert "mount_program" not in json.dumps(info["store"].get("graphOptions", {}))
    node.podman("import", busybox_tar, "localhost/bb:1")
    assert node.podman("run", "--rm", "localhost/bb:1", "echo", "hello").stdout == "hello\n"
    node.podman("run", "--name", "c1", "localhost/bb:1", "sh", "-c", "echo data > /f; rm /bin/touch")
    node.podman("commit", "-q", "c1", "localhost/bb:2")
    out = node.podman("run", "--rm", "localhost/bb:2", "sh", "-c", "cat /f; ls /bin/touch || echo whiteout").stdout
    assert out == "data\nwhiteout\n"
    assert node.images() == {"localhost/bb:1", "localhost/bb:2"}
    node.podman("rm", "c1")
    node.podman("rmi", "localhost/bb:1")  # untags only: bb:2 still uses its layer
    node.mount.remount()
    assert node.images() == {"localhost/bb:2"}
    assert node.podman("run", "--rm", "localhost/bb:2", "cat", "/f").stdout == "data\n"
    assert node.mount.status()["layout"] == "containers-storage"


def _layer_dirs(graph: str) -> dict[str, str]:
    """overlay/<id>/diff of every layer in a graph, as the view shows it: id -> backing directory."""
    return {entry.name: layer_diff(graph, entry.name) for entry in os.scandir(os.path.join(graph, "overlay"))
            if len(entry.name) == 64}


def test_container_data_bypasses_graftfs(make_node: Callable[[str, str], Node], share: str, busybox_tar: str) -> None:
    """The layers the node holds itself are links to their RW directories: the runtime makes,
    mounts and removes them, the kernel's overlay mounts sit on them and all of a container's
    reads and writes go to the backing filesystem, none through FUSE."""
    node = make_node("node", share)
    node.podman("import", busybox_tar, "localhost/bb:1")
    before = node.mount.status()
    node.podman("run", "--name", "io", "localhost/bb:1", "sh", "-c",
                "dd if=/dev/zero of=/big bs=1M count=64 2>/dev/null && cat /big /big > /dev/null && "
                "mkdir /many && cd /many && for i in $(seq 500); do echo $i > f$i; done")
    after = node.mount.status()
    written = int(after["bytes_written"]) - int(before["bytes_written"])  # type: ignore[call-overload]
    read = int(after["bytes_read"]) - int(before["bytes_read"])  # type: ignore[call-overload]
    assert written < 4 << 20 and read < 4 << 20, (written, read)  # the runtime's own records only
    links = _layer_dirs(node.mount.mnt)
    assert len(links) == 2 and all(t == os.path.join(node.mount.rw, "overlay", lid, "diff") for lid, t in links.items())
    cid = node.podman("inspect", "--format", "{{.Id}}", "io").stdout.strip()
    layer = json.loads(node.podman("inspect", "--format", "json", "io").stdout)[0]["GraphDriver"]["Data"]["UpperDir"]
    upper = os.path.realpath(layer)
    assert upper.startswith(os.path.join(node.mount.rw, "overlay")), upper
    assert os.path.getsize(os.path.join(upper, "big")) == 64 << 20
    assert sorted(os.listdir(os.path.join(upper, "many"))) == sorted(f"f{i}" for i in range(1, 501))
    assert os.path.islink(os.path.dirname(layer))  # overlay/<container layer>, made through the mount
    assert os.path.realpath(os.path.join(os.path.dirname(layer), "merged")).startswith(node.mount.rw)
    # removing the container removes its layer's backing directories, not just the links
    node.podman("rm", cid)
    wait_for(lambda: not os.path.exists(upper), 10, "the container's layer to be deleted from RW")
    assert set(_layer_dirs(node.mount.mnt)) == set(links) - {os.path.basename(os.path.dirname(layer))}
    # the runtime's lock files and node-local dirs are bind mounts: a run costs a few hundred requests
    binds = [node.mount.path("storage.lock"), node.mount.path("overlay-layers", "layers.lock"),
             node.mount.path("libpod"), node.mount.path("overlay-containers")]
    assert all(find_mount(b) is not None for b in binds), mount_table()
    before = node.mount.status()["requests"]
    node.podman("run", "--rm", "localhost/bb:1", "true")
    after = node.mount.status()["requests"]
    served = sum(v["count"] for v in after.values()) - sum(v["count"] for v in before.values())  # type: ignore[union-attr]
    assert served < 500, (served, after)  # ~1,900 through a plain passthrough, ~650 with links only
    # graftfs umount takes its binds away first, and leaves nothing mounted below
    assert graftfs_cmd("umount", node.mount.mnt).returncode == 0
    assert not [e for e in mount_table() if e.mountpoint.startswith(node.mount.mnt)]
    assert node.mount.stop() == 0
    node.mount.start()
    assert node.podman("run", "--rm", "localhost/bb:1", "echo", "ok").stdout == "ok\n"
    trash = os.path.join(node.mount.rw, ".graftfs", "tmp")
    wait_for(lambda: not os.path.exists(trash) or not os.listdir(trash), 10, "the deleted layers to be swept")


def _service(node: Node, sock: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], env=node.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_for(lambda: os.path.exists(sock), 30, "the podman API socket")
    return proc


def _service_images(sock: str) -> set[str]:
    res = subprocess.run(["curl", "-sf", "--max-time", "20", "--unix-socket", sock,
                          "http://d/v4.0.0/libpod/images/json"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"the API service did not answer: {res.stderr}"
    images = json.loads(res.stdout)
    assert isinstance(images, list), images
    return {name for image in images for name in image.get("Names") or []}


def test_two_nodes_share_a_published_image(make_node: Callable[[str, str], Node], share: str, busybox_tar: str,
                                           tmp_path: Path) -> None:
    a, b = make_node("a", share), make_node("b", share)
    sock = str(tmp_path / "b-api.sock")
    service = _service(b, sock)
    try:
        assert _service_images(sock) == set()
        a.podman("import", busybox_tar, "localhost/base:1")
        a.podman("run", "--name", "build", "localhost/base:1", "sh", "-c", "echo shared > /shared.txt; rm /bin/touch")
        a.podman("commit", "-q", "build", "localhost/app:1")
        pub = graftfs_cmd("publish", "--graph", a.mount.mnt, "--share", share, "--json", "localhost/app:1")
        assert pub.returncode == 0, pub.stderr
        summary = json.loads(pub.stdout)
        assert summary["images"][0]["status"] == "published" and len(summary["images"][0]["layers"]) == 2
        assert os.path.exists(os.path.join(share, ".graftfs-share"))  # the first publish laid the share out
        # node B, never restarted, sees it: the CLI and the long-running API service
        wait_for(lambda: "localhost/app:1" in b.images(), 5, "node B to list the published image")
        wait_for(lambda: "localhost/app:1" in _service_images(sock), 10, "the API service on B to list it")
        out = b.podman("run", "--rm", "localhost/app:1", "sh", "-c", "cat /shared.txt; ls /bin/touch || echo gone")
        assert out.stdout == "shared\ngone\n"
        # B's RW tree holds no copy of the shared layers: B's layer dirs link to the share's
        layers = [la["id"] for la in summary["images"][0]["layers"]]
        links = _layer_dirs(b.mount.mnt)
        assert all(links[lid] == os.path.join(share, "overlay", lid, "diff") for lid in layers), links
        rw_b = Path(b.mount.rw)
        assert not any((rw_b / "overlay" / lid / "diff").exists() for lid in layers)
        assert not any(p.name == "shared.txt" for p in rw_b.rglob("*"))
        own_layers = json.loads((rw_b / "overlay-layers" / "layers.json").read_text() or "[]")
        assert not {r["id"] for r in own_layers} & set(layers)  # shared records are not duplicated either
        # publishing again finds everything in place
        again = graftfs_cmd("publish", "--graph", a.mount.mnt, "--share", share, "--json", "localhost/app:1")
        assert json.loads(again.stdout)["images"][0]["status"] == "already published"
        # rmi on B hides the image for B only, while A runs a container from it
        a.podman("run", "-d", "--name", "running", "localhost/app:1", "sleep", "300")
        b.podman("rmi", "localhost/app:1")
        assert "localhost/app:1" not in b.images()
        # one hide per removed shared entry (the diff link), not one per file of each layer
        assert int(b.mount.status()["hidden_count"]) < 20, b.mount.status()["hidden"]  # type: ignore[call-overload]
        assert "localhost/app:1" in a.images()
        assert a.podman("exec", "running", "cat", "/shared.txt").stdout == "shared\n"
        assert os.path.isdir(os.path.join(share, "overlay-images", summary["images"][0]["id"]))
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        try:
            service.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait(timeout=10)


def test_big_multi_layer_image_and_killed_publish(make_node: Callable[[str, str], Node], share: str,
                                                  busybox_tar: str) -> None:
    a, b = make_node("a", share), make_node("b", share)
    a.podman("import", busybox_tar, "localhost/ml:0")
    tag = "localhost/ml:0"
    for i in range(1, 5):  # four small layers on the base
        a.podman("run", "--name", f"l{i}", tag, "sh", "-c", f"mkdir -p /data && echo layer{i} > /data/{i}.txt")
        tag = f"localhost/ml:{i}"
        a.podman("commit", "-q", f"l{i}", tag)
    a.podman("run", "--name", "big", tag, "sh", "-c",
             "dd if=/dev/urandom of=/big bs=1M count=200 2>/dev/null && sha256sum /big > /big.sha")
    a.podman("commit", "-q", "big", "localhost/ml:big")
    want = a.podman("run", "--rm", "localhost/ml:big", "cat", "/big.sha").stdout
    image_id = a.podman("image", "inspect", "--format", "{{.Id}}", "localhost/ml:big").stdout.strip()
    # a publisher killed half-way through the big layer: nothing of the image shows anywhere
    argv = [sys.executable, "-m", "graftfs", "publish", "--graph", a.mount.mnt, "--share", share, "localhost/ml:big"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = Path(share, ".graftfs-staging")

    def copying_big() -> bool:
        # staged entries are renamed into place while we walk: a walk that ignores vanished dirs
        return any("big" in files for _, _, files in os.walk(staging))

    wait_for(copying_big, 60, "the publisher to start copying the big layer")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert not os.path.exists(os.path.join(share, "overlay-images", image_id))

    def copier_alive() -> bool:
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=30).stdout
        return any(line.startswith("cp -a") and str(staging) in line for line in ps.splitlines())

    wait_for(lambda: not copier_alive(), 5, "the publisher's copy to stop with it")
    debris = set(os.listdir(share)) - {".graftfs-share", ".graftfs-staging", "overlay", "overlay-layers",
                                       "overlay-images", ".graftfs-nodes", ".graftfs-intents"}
    assert not debris, debris  # whatever the kill left is inside the private staging area
    # and its publish intent, which lapses after its TTL (the nodes' leases are not debris)
    assert len(os.listdir(os.path.join(share, ".graftfs-intents"))) == 1
    time.sleep(1.5)  # several watcher polls
    assert "localhost/ml:big" not in b.images()
    # a re-run completes it; B reads the big file back intact
    pub = graftfs_cmd("publish", "--graph", a.mount.mnt, "--share", share, "--json", "localhost/ml:big", timeout=300)
    assert pub.returncode == 0, pub.stderr
    layers = json.loads(pub.stdout)["images"][0]["layers"]
    assert len(layers) >= 6 and max(la["bytes"] for la in layers) >= 200 * 1024 * 1024
    wait_for(lambda: "localhost/ml:big" in b.images(), 5, "node B to list the big image")
    got = b.podman("run", "--rm", "localhost/ml:big", "sh", "-c", "sha256sum /big; cat /data/1.txt /data/4.txt")
    assert got.stdout == want + "layer1\nlayer4\n"


def test_publish_from_a_plain_podman_graph(make_node: Callable[[str, str], Node], share: str, busybox_tar: str,
                                           tmp_path: Path) -> None:
    reader = make_node("reader", share)
    plain = tmp_path / "plain-graph"
    plain.mkdir()
    writer = Node("plain", reader.mount, dict(reader.env))  # podman on an ordinary directory, no graftfs
    conf = tmp_path / "plain.conf"
    run = Path(reader.env["TMPDIR"]).parent / "plain-run"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{plain}"\nrunroot = "{run}"\n')
    writer.env["CONTAINERS_STORAGE_CONF"] = str(conf)
    try:
        writer.podman("import", busybox_tar, "localhost/plain:1")
        pub = graftfs_cmd("publish", "--graph", str(plain), "--share", share, "plain:1")
        assert pub.returncode == 0, pub.stderr
        assert "published (1 of 1 layers copied)" in pub.stdout
        wait_for(lambda: "localhost/plain:1" in reader.images(), 5, "the reader to list the image")
        assert reader.podman("run", "--rm", "localhost/plain:1", "echo", "from a plain graph").stdout == (
            "from a plain graph\n")
        du = subprocess.run(["du", "-sb", reader.mount.rw], capture_output=True, text=True, timeout=60)
        assert int(du.stdout.split()[0]) < 512 * 1024  # the reader keeps no copy of the ~2 MB layer
    finally:
        writer.podman("rm", "-af", "-t", "0", timeout=60, check=False)
        _unmount_below(str(plain), keep=set())
