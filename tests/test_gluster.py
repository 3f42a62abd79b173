"""graftfs on a real distributed share: a GlusterFS replica-3 volume (tests/glustershare.py), with
real podman nodes (tests/test_podman.py's Node and make_node) — publishing through the GlusterFS
FUSE client, running from it, and the share's own faults: a brick lost (the replicas keep
serving), every brick hung (SIGSTOP; with the client's ping-timeout at 3 s, and at GlusterFS'
default of 42 s), the volume stopped and started, glusterd restarted.

What the README promises for a share outage ("Share outages") is asserted: the node's own podman
work (ps, exec, run of a node-local image) answers from the first second of a hang, names the
share's last known view did not hold are answered without it, what graftfs reads from the share
fails within timeout= and then at once, `graftfs status` says UNAVAILABLE, the view keeps its last
known entries, shared images stay listed and inspectable and fail to start at once, and the share
serves again without a remount. Where the README's promise does not hold on GlusterFS (what reaches
the GlusterFS mount through the graph's layer links while the client itself still waits: see
test_hung_bricks_with_the_default_ping_timeout), the test measures it and ends as xfail with the
measurements once everything else has been checked. Every step's duration is printed (-s).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import graftfs_cmd, needs_mount, sh, wait_for
from glustershare import GlusterShare, gluster_share_fixture, needs_gluster  # noqa: F401  (fixture)
from graftfs.share.sample import BUSYBOX, busybox_image_tar
from residue import temp_files
from test_podman import Node, _layer_dirs, busybox_tar, make_node  # noqa: F401  (fixtures)
from test_reliability import PROBE, PYTHON, SHARE_DOWN, Outcome, probe

pytestmark = [needs_mount, needs_gluster,
              pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")]

#: A request on a shared path while every brick hangs fails within this (the brief's ~15 s: the
#: GlusterFS client's ping-timeout or graftfs' own timeout=10, whichever answers first).
HANG_BOUND = 15.0
#: How long a node may take to list a newly published image or drop a retired one.
SEE_BOUND = 10.0
#: README "Share outages": node-local podman commands take well under this during a hang.
NODE_LOCAL_BOUND = 3.0
#: graftfs' default timeout= (README): what graftfs serves from a hung share fails after this.
GRAFTFS_TIMEOUT = 10.0
#: How long the diff-link read and podman's commands on shared images are given with a 42 s
#: ping-timeout (what waits on the GlusterFS client itself would take ~42-84 s).
LINK_PROBE_LIMIT = 15.0
SHARED_CMD_LIMIT = 15.0
LEASE = ("-o", "lease=0.5")


# -- the cluster: a GlusterFS share and podman nodes over it ------------------------------------


@dataclass
class Cluster:
    share: GlusterShare
    make_node: Callable[..., Node]
    image_tar: str  # busybox, for the shared images
    local_tar: str  # busybox plus one file: a node's own image (no layer in common with the share's)
    nodes: list[Node] = field(default_factory=list)

    @property
    def root(self) -> str:
        return self.share.mountpoint

    def node(self, name: str, *options: str, share: str | None = None) -> Node:
        """A podman node whose graph is a graftfs mount over the GlusterFS share."""
        started = time.monotonic()
        node = self.make_node(name, share or self.root, *options)
        self.nodes.append(node)
        kw = self.share.residue_kwargs
        kw.setdefault("rw_trees", []).append(node.mount.rw)
        kw.setdefault("mountpoints", []).append(node.mount.mnt)
        kw.setdefault("tops", []).append(str(Path(node.env["TMPDIR"]).parent.parent))
        self.note_daemon(node)
        step(f"node {name} mounted", started)
        return node

    def note_daemon(self, node: Node) -> None:
        if node.mount.proc is not None:
            self.share.residue_kwargs.setdefault("daemons", []).append(node.mount.proc.pid)


@pytest.fixture(scope="module")
def local_tar(tmp_path_factory: pytest.TempPathFactory) -> str:
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed")
    work = tmp_path_factory.mktemp("local-image")
    busybox_image_tar(str(work))
    Path(work, "rootfs", "node-local").write_text("this node's own layer\n")
    tar = str(work / "local.tar")
    subprocess.run(["tar", "-C", str(work / "rootfs"), "-cf", tar, "."], check=True, timeout=60)
    return tar


@pytest.fixture
def cluster(request: pytest.FixtureRequest, gluster_share: GlusterShare, local_tar: str) -> Iterator[Cluster]:
    """The share first, then the nodes (make_node is set up after the share, so that its
    teardown — podman's containers, then graftfs unmounted — runs before the share's)."""
    c = Cluster(gluster_share, request.getfixturevalue("make_node"), request.getfixturevalue("busybox_tar"),
                local_tar)
    yield c
    # nothing of a publisher's staging is left in the share (when the test left it serving)
    c.share.resume_all()
    if c.share.serves(c.root):
        left = temp_files([], [c.root])
        assert not left, f"temp files left in the share: {left}"


# -- helpers ------------------------------------------------------------------------------------


def step(label: str, started: float) -> float:
    took = time.monotonic() - started
    print(f"  [{took:6.2f} s] {label}")
    return took


def _publish(node: Node, share: str, image: str) -> Any:
    started = time.monotonic()
    res = graftfs_cmd("publish", "--graph", node.mount.mnt, "--share", share, "--json", image, timeout=120)
    assert res.returncode == 0, f"publish {image} onto GlusterFS: {res.stderr}"
    step(f"publish {image}", started)
    return json.loads(res.stdout)["images"][0]


def _gc(share: str) -> Any:
    started = time.monotonic()
    res = graftfs_cmd("gc", "--share", share, "--grace", "0", "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    step("gc", started)
    return json.loads(res.stdout)


def _fsck_clean(share: str) -> None:
    res = graftfs_cmd("fsck", "--share", share, timeout=60)
    assert res.returncode == 0, f"fsck --share on GlusterFS: {res.stdout}{res.stderr}"


def _wait_listed(node: Node, image: str, present: bool = True, bound: float = SEE_BOUND) -> float:
    """Wait until ``node`` lists (or no longer lists) ``image``. A `podman images` that fails
    while the view changes is printed and asked again: a listing that overlaps a publish or an
    unpublish sometimes fails once, on a local share too (reported); one that keeps failing
    fails the wait."""
    started = time.monotonic()
    errors: list[str] = []

    def listed() -> bool:
        res = node.podman("images", "--format", "{{.Repository}}:{{.Tag}}", check=False)
        if res.returncode != 0:
            errors.append(f"{time.monotonic() - started:.2f} s: exit {res.returncode} {res.stderr.strip()[-300:]!r}")
            print(f"  podman images on {node.name} failed while waiting: {errors[-1]}")
            return False
        return (image in res.stdout.split()) == present

    try:
        wait_for(listed, bound, f"{node.name} to {'list' if present else 'drop'} {image}")
    except AssertionError as e:
        raise AssertionError(f"{e}; podman images failed {len(errors)} times: {errors[-3:]}") from None
    return step(f"{node.name} {'lists' if present else 'dropped'} {image}"
                + (f" ({len(errors)} failed listings)" if errors else ""), started)


def _run(node: Node, image: str, *cmd: str) -> str:
    started = time.monotonic()
    out = node.podman("run", "--rm", image, *cmd).stdout
    step(f"{node.name}: podman run {image} {' '.join(cmd)}", started)
    return out


def _share_status(node: Node, root: str) -> Any:
    trees: Any = node.mount.status()["ro"]
    found = [t for t in trees if t.get("tree") == root]
    assert len(found) == 1, trees
    return found[0]


def _available(node: Node, root: str) -> bool:
    return bool(_share_status(node, root)["available"])


def _heal_info(share: GlusterShare) -> str:
    res = share.cli("volume", "heal", share.volume, "info", "summary", timeout=20, check=False)
    return " ".join(line.strip() for line in res.stdout.splitlines() if "entries" in line.lower())[:300]


@dataclass
class Measured:
    what: str
    code: int
    seconds: float
    out: str
    err: str

    def __str__(self) -> str:
        tail = self.err.strip().splitlines()[-1][:300] if self.err.strip() else ""
        return f"{self.what}: exit {self.code} after {self.seconds:.1f} s {tail!r}"


def _measure(node: Node, *args: str, timeout: float = 60) -> Measured:
    started = time.monotonic()
    try:
        res = node.podman(*args, check=False, timeout=timeout)
        code, out, err = res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired:  # not even SIGKILL freed it: stuck in a FUSE request
        code, out, err = -1, "", f"still stuck {timeout + 15:g} s after start (SIGKILL did not free it)"
    m = Measured(f"{node.name}: podman {' '.join(args)}", code, time.monotonic() - started, out, err)
    print(f"  measured {m}")
    return m


@dataclass
class Stuck:
    """Probes a hung share left waiting in a FUSE request (SIGKILL does not end a request the
    filesystem has already taken): reaped once the share answers again."""

    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def probe(self, op: str, path: str, limit: float) -> Outcome:
        """tests/test_reliability.py's probe, but one that does not answer within ``limit`` is
        killed and reported as stuck instead of holding the test up."""
        started = time.monotonic()
        proc = subprocess.Popen([PYTHON, "-c", PROBE, op, path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, stdin=subprocess.DEVNULL)
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            self.procs.append(proc)
            return Outcome(False, time.monotonic() - started, f"no answer within {limit:g} s (stuck; killed)")
        word, _, rest = out.strip().partition(" ")
        return Outcome(word == "OK", time.monotonic() - started, rest.partition(" ")[2])

    def reap(self, timeout: float = 120) -> None:
        procs, self.procs = self.procs, []
        for proc in procs:
            proc.wait(timeout=timeout)


# -- a. two nodes share an image through GlusterFS ----------------------------------------------


@pytest.mark.timeout(150)
def test_two_nodes_share_a_published_image_on_glusterfs(cluster: Cluster) -> None:
    c = cluster
    a, b = c.node("a"), c.node("b")
    assert os.listdir(c.root) == [], os.listdir(c.root)  # a fresh volume: an empty directory
    a.podman("import", c.image_tar, "localhost/base:1")
    a.podman("run", "--name", "build", "localhost/base:1", "sh", "-c",
             "echo shared > /shared.txt; mkdir /data; echo old > /data/old")
    a.podman("commit", "-q", "build", "localhost/mid:1")
    # a whiteout (a 0/0 char device) and an opaque directory (trusted.overlay.opaque) in the
    # top layer: both must survive the copy onto GlusterFS
    a.podman("run", "--name", "top", "localhost/mid:1", "sh", "-c",
             "rm /bin/touch; rm -rf /data; mkdir /data; echo new > /data/new")
    a.podman("commit", "-q", "top", "localhost/app:1")
    image = _publish(a, c.root, "localhost/app:1")
    assert image["status"] == "published" and len(image["layers"]) == 3, image
    assert os.path.exists(os.path.join(c.root, ".graftfs-share"))  # the empty directory became a share
    _wait_listed(b, "localhost/app:1")
    out = _run(b, "localhost/app:1", "sh", "-c", "cat /shared.txt; ls /data; ls /bin/touch || echo gone")
    assert out == "shared\nnew\ngone\n"
    # B's layers are the share's: links into the GlusterFS mount, no copy in B's RW tree
    layers = [la["id"] for la in image["layers"]]
    links = _layer_dirs(b.mount.mnt)
    assert all(links[lid] == os.path.join(c.root, "overlay", lid, "diff") for lid in layers), links
    top = next(os.path.join(c.root, "overlay", lid, "diff") for lid in layers
               if os.path.exists(os.path.join(c.root, "overlay", lid, "diff", "data", "new")))
    assert os.getxattr(os.path.join(top, "data"), "trusted.overlay.opaque") == b"y"
    whiteout = os.lstat(os.path.join(top, "bin", "touch"))
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0, whiteout
    assert not any(Path(b.mount.rw, "overlay", lid, "diff").exists() for lid in layers)
    again = _publish(a, c.root, "localhost/app:1")
    assert again["status"] == "already published", again
    _fsck_clean(c.root)


# -- b. a brick lost: the replicas keep serving -------------------------------------------------


@pytest.mark.timeout(150)
def test_a_killed_brick_does_not_disturb_the_nodes(cluster: Cluster) -> None:
    c = cluster
    a, b = c.node("a"), c.node("b")
    a.podman("import", c.image_tar, "localhost/shared:1")
    _publish(a, c.root, "localhost/shared:1")
    a.podman("import", c.local_tar, "localhost/local:1")  # A's own image, in A's RW tree only
    _wait_listed(b, "localhost/shared:1")
    assert _run(b, "localhost/shared:1", "echo", "before") == "before\n"

    started = time.monotonic()
    pid = c.share.kill_brick(0)
    step(f"brick 0 (pid {pid}) killed; bricks left {c.share.brick_pids()}", started)
    assert _run(b, "localhost/shared:1", "sh", "-c", "echo degraded; ls /bin/busybox") == (
        "degraded\n/bin/busybox\n")
    assert _run(a, "localhost/local:1", "cat", "/node-local") == "this node's own layer\n"
    assert b.images() >= {"localhost/shared:1"} and a.images() >= {"localhost/shared:1", "localhost/local:1"}
    # the share takes writes with two of three replicas: a publish, seen and run by B
    _publish(a, c.root, "localhost/local:1")
    _wait_listed(b, "localhost/local:1")
    assert _run(b, "localhost/local:1", "cat", "/node-local") == "this node's own layer\n"
    assert _available(b, c.root)

    started = time.monotonic()
    c.share.restart_brick()
    step("brick restarted (volume start force) and the client reconnected", started)
    assert _run(b, "localhost/shared:1", "echo", "after") == "after\n"
    print(f"  heal info after the restart: {_heal_info(c.share)}")
    _fsck_clean(c.root)


# -- c. publish, unpublish, gc, fsck on the GlusterFS share --------------------------------------


def _lease_layers(share: str, node: Node) -> set[str]:
    """The layers ``node``'s lease in the share names right now."""
    status: Any = node.mount.status()
    me = status["leases"]["node"]
    nodes = os.path.join(share, ".graftfs-nodes")
    for name in os.listdir(nodes):
        with open(os.path.join(nodes, name, "lease.json")) as f:
            lease = json.load(f)
        if lease["node"] == me:
            return set(lease["layers"])
    return set()


@pytest.mark.timeout(180)
def test_share_tools_on_glusterfs(cluster: Cluster) -> None:
    """publish, unpublish, gc (after the lease TTL) and fsck --share behave as on a local
    directory: a node's lease (written through the GlusterFS client, aged by the bricks' mtimes)
    keeps the layers its container uses; with no node using them, gc deletes them."""
    c = cluster
    a, b = c.node("a", *LEASE), c.node("b", *LEASE)
    a.podman("import", c.image_tar, "localhost/app:1")
    a.podman("run", "--name", "build", "localhost/app:1", "sh", "-c", "echo v2 > /version")
    a.podman("commit", "-q", "build", "localhost/app:2")
    one = _publish(a, c.root, "localhost/app:1")
    two = _publish(a, c.root, "localhost/app:2")
    base = {la["id"] for la in one["layers"]}
    layers = {la["id"] for la in two["layers"]}
    assert base < layers
    _fsck_clean(c.root)
    stats = json.loads(graftfs_cmd("status", "--share", c.root, "--json").stdout)
    print(f"  status --share: {json.dumps(stats)[:400]}")
    _wait_listed(b, "localhost/app:2")
    b.podman("run", "-d", "--name", "svc", "localhost/app:2", "sleep", "600")
    started = time.monotonic()
    wait_for(lambda: layers <= _lease_layers(c.root, b), 10, "B's lease to name app:2's layers")
    step("B's lease names the layers of its container", started)

    for image in ("localhost/app:1", "localhost/app:2"):
        res = graftfs_cmd("unpublish", "--share", c.root, image)
        assert res.returncode == 0 and "retired" in res.stdout, res.stdout + res.stderr
        _wait_listed(b, image, present=False)
    time.sleep(2.5)  # past every lease TTL (4 x 0.5 s)
    plan = _gc(c.root)
    # app:1 goes (no container of it anywhere), its layer stays: B's container runs on it
    assert plan["images"] == [one["id"]] and plan["layers"] == [], plan
    assert all(os.path.isdir(os.path.join(c.root, "overlay", lid, "diff")) for lid in layers)
    assert b.podman("exec", "svc", "cat", "/version").stdout == "v2\n"

    b.podman("rm", "-f", "-t", "0", "svc")
    started = time.monotonic()
    wait_for(lambda: not (layers & _lease_layers(c.root, b)), 10, "B's lease to drop the layers")
    step("B's lease dropped the layers", started)
    plan = _gc(c.root)
    assert plan["images"] == [two["id"]] and set(plan["layers"]) == layers, plan
    assert not any(os.path.exists(os.path.join(c.root, "overlay", lid)) for lid in layers)
    assert not os.path.exists(os.path.join(c.root, "overlay-images", str(two["id"])))
    _fsck_clean(c.root)
    assert b.podman("images", "-q").stdout.strip() == ""
    # A kept its own copies: nothing of the share's retirement touched A's RW tree
    assert a.images() >= {"localhost/app:1", "localhost/app:2"}
    # and the share takes the image again
    assert _publish(a, c.root, "localhost/app:2")["status"] == "published"
    _wait_listed(b, "localhost/app:2")
    _fsck_clean(c.root)


# -- d. every brick hung (SIGSTOP) --------------------------------------------------------------


def _probe_files(root: str, layer: str, count: int) -> list[str]:
    """Files in a shared layer that nobody has read yet (no page cache can answer for them)."""
    d = os.path.join(root, "overlay", layer, "diff", "probe")
    os.makedirs(d, exist_ok=True)
    for i in range(count):
        Path(d, f"f{i}").write_text(f"probe {i}\n")
    return [os.path.join("overlay", layer, "diff", "probe", f"f{i}") for i in range(count)]


def _bounded_failure(what: str, got: Outcome) -> None:
    print(f"  hang: {what}: {got}")
    assert not got.ok and got.value in SHARE_DOWN, (what, got)
    assert got.seconds <= HANG_BOUND, (what, got)


@dataclass
class Hang:
    """Two nodes over the share before its bricks hang: B lists and has inspected two shared
    images, runs a container of its own image, and the share holds files nobody has read."""

    a: Node
    b: Node
    ids: dict[str, str]  # shared image name -> id
    layer: str  # the shared base layer
    probes: Iterator[str]  # view paths of never-read files in that layer
    images: set[str]  # what B lists
    listed: str  # B's overlay-images, as a probe lists it
    pid: int  # B's daemon
    ran: int = 0

    def fresh(self) -> str:
        return self.b.mount.path(next(self.probes))


def _hang_setup(c: Cluster) -> Hang:
    a, b = c.node("a"), c.node("b")
    a.podman("import", c.image_tar, "localhost/shared:1")
    a.podman("run", "--name", "build", "localhost/shared:1", "sh", "-c", "echo two > /two")
    a.podman("commit", "-q", "build", "localhost/shared:2")  # two layers: its top has a lower file
    a.podman("import", c.local_tar, "localhost/a-local:1")  # A's own image
    one = _publish(a, c.root, "localhost/shared:1")
    ids = {"localhost/shared:1": one["id"], "localhost/shared:2": _publish(a, c.root, "localhost/shared:2")["id"]}
    layer = str(one["layers"][0]["id"])
    b.podman("import", c.local_tar, "localhost/local:1")  # B's own image
    _wait_listed(b, "localhost/shared:2")
    assert _run(b, "localhost/shared:1", "echo", "warm") == "warm\n"
    for name, iid in ids.items():  # inspected once before, as a node does before an outage
        assert b.podman("image", "inspect", "--format", "{{.Id}}", name).stdout.strip() == iid
    b.podman("run", "-d", "--name", "up", "localhost/local:1", "sleep", "1000")
    probes = iter(_probe_files(c.root, layer, 6))
    listed = probe("list", b.mount.path("overlay-images"))
    assert listed.ok, listed
    status: Any = b.mount.status()
    return Hang(a, b, ids, layer, probes, b.images(), listed.value, int(status["pid"]))


def _node_local_work(h: Hang) -> None:
    """README "Share outages": podman ps, exec and run of a node-local image work from the first
    second of a hang, each well under NODE_LOCAL_BOUND."""
    h.ran += 1
    checks = [
        (_measure(h.b, "ps", "--format", "{{.Names}}"), "up\n"),
        (_measure(h.b, "exec", "up", "echo", "exec during the hang"), "exec during the hang\n"),
        (_measure(h.b, "run", "--rm", "localhost/local:1", "cat", "/node-local"), "this node's own layer\n"),
        (_measure(h.b, "create", "--name", f"later{h.ran}", "localhost/local:1", "true"), None),
        (_measure(h.a, "run", "--rm", "localhost/a-local:1", "echo", "on A"), "on A\n"),
    ]
    for m, want in checks:
        assert m.code == 0 and (want is None or m.out == want), m
        assert m.seconds < NODE_LOCAL_BOUND, m


def _shared_images_stay(h: Hang, gaps: list[str] | None = None) -> None:
    """README: shared images stay listed and inspectable; one that is not pinned cannot start,
    and says so at once. With ``gaps``, what fails of that is recorded there (each command
    given SHARED_CMD_LIMIT) instead of failing the test."""
    limit = SHARED_CMD_LIMIT if gaps is not None else 60

    def check(ok: bool, m: Measured, promise: str) -> None:
        if gaps is not None and not ok:
            gaps.append(f"{promise} (README 'Share outages'): {m}")
        else:
            assert ok, m

    listing = _measure(h.b, "images", "--format", "{{.Repository}}:{{.Tag}}", timeout=limit)
    check(listing.code == 0 and set(listing.out.split()) == h.images, listing, "shared images stay listed")
    for name, iid in h.ids.items():
        inspect = _measure(h.b, "image", "inspect", "--format", "{{.Id}}", name, timeout=limit)
        check(inspect.code == 0 and inspect.out.strip() == iid, inspect, "shared images stay inspectable")
    shared_run = _measure(h.b, "run", "--rm", "localhost/shared:1", "echo", "shared during the hang", timeout=limit)
    check(shared_run.code != 0 and shared_run.seconds < HANG_BOUND, shared_run,
          "a shared image that is not pinned cannot start, and says so at once")


def _recovers(c: Cluster, h: Hang) -> None:
    """SIGCONT: the share serves again, the view is exactly the share's, no remount."""
    resumed = time.monotonic()
    fresh = h.fresh()
    wait_for(lambda: probe("read", fresh, limit=HANG_BOUND).ok, 60, "a shared file to be readable again")
    step("after SIGCONT: a shared file reads again", resumed)
    wait_for(lambda: _available(h.b, c.root), 15, "B's status to say the share is available")
    step("after SIGCONT: B's status says available", resumed)
    assert h.b.mount.status()["pid"] == h.pid  # no remount
    assert probe("list", h.b.mount.path("overlay-images")).value == h.listed
    assert h.b.images() == h.images
    assert _run(h.b, "localhost/shared:1", "echo", "back") == "back\n"
    assert h.b.podman("exec", "up", "echo", "still up").stdout == "still up\n"


@pytest.mark.timeout(240)
def test_hung_bricks_are_bounded_and_recover_without_remount(cluster: Cluster) -> None:
    """Every brick SIGSTOP'd, the client's ping-timeout at 3 s: a read of a shared layer's file
    (through the diff link, straight to GlusterFS) fails after about two ping-timeouts, then at
    once; graftfs serves what the README promises for an outage, also once the kernel's dentry
    cache is dropped; SIGCONT, and B serves the share again with the same daemon."""
    c = cluster
    h = _hang_setup(c)
    c.share.pause_all()
    hung = time.monotonic()
    try:
        _node_local_work(h)
        step("node-local podman work, from the first second of the hang", hung)
        # shared content through B's view: files of a shared layer (diff is a link into the
        # GlusterFS mount: the client's ping-timeout bounds these), the layer's tar-split and an
        # unknown name in the layer's directory (served by graftfs)
        started = time.monotonic()
        cat = sh("cat", h.fresh(), timeout=40)
        took = step(f"cat of a shared layer's file: exit {cat.returncode} {cat.stderr.strip()!r}", started)
        assert cat.returncode not in (0, 124, 137) and cat.stderr, cat  # failed, not killed by the timeout
        assert took <= HANG_BOUND, took
        _bounded_failure("read a shared layer's file", probe("read", h.fresh(), limit=40))
        _bounded_failure("read a shared tar-split",
                         probe("read", h.b.mount.path("overlay-layers", f"{h.layer}.tar-split.gz"), limit=40))
        _bounded_failure("stat a new name in a shared layer dir",
                         probe("stat", h.b.mount.path("overlay", h.layer, "never-there"), limit=40))
        started = time.monotonic()
        wait_for(lambda: not _available(h.b, c.root), HANG_BOUND, "B's status to say the share is unavailable")
        step("B's status says the share is unavailable", started)
        human = graftfs_cmd("status", h.b.mount.mnt, timeout=30)
        assert human.returncode == 0 and "UNAVAILABLE since" in human.stdout, human
        print(f"  unavailable_reason: {_share_status(h.b, c.root).get('unavailable_reason')!r}")
        # from here on the kernel's dentry cache does not answer for graftfs (as on a node under
        # memory pressure): every name below is looked up in graftfs, during the hang
        Path("/proc/sys/vm/drop_caches").write_text("2")
        kept = probe("list", h.b.mount.path("overlay-images"), limit=HANG_BOUND)
        assert kept.ok and kept.value == h.listed, kept  # the last known view, never "all deleted"
        _shared_images_stay(h)
        _node_local_work(h)
        step("the hang, in all", hung)
    finally:
        c.share.resume_all()
    _recovers(c, h)


# -- f. every brick hung, with GlusterFS' default ping-timeout -----------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("gluster_share", [42], indirect=True, ids=["ping-timeout=42"])
def test_hung_bricks_with_the_default_ping_timeout(cluster: Cluster) -> None:
    """The GlusterFS client's default ping-timeout (42 s): the client itself fails nothing for
    ~42-84 s, so only graftfs' own timeout=10 answers for the share. Asserted: what the README
    promises of graftfs' own answers (node-local work from the first second, names the share's
    last known view did not hold, what graftfs reads from the share bounded by timeout=, status,
    the last known view, recovery). Measured: a read of a shared layer's file through the
    graph's diff link, and podman's commands on shared images — those reach the GlusterFS mount
    directly (the links), where graftfs' limit does not apply; the test ends as xfail with the
    measurements when they are not bounded as the README says."""
    c = cluster
    h = _hang_setup(c)
    c.share.pause_all()
    hung = time.monotonic()
    gaps: list[str] = []
    stuck = Stuck()
    try:
        _node_local_work(h)
        step("node-local podman work, from the first second of the hang", hung)
        # names the share's last known view does not hold, at the graph root and in a managed
        # directory: answered without asking the share
        for parts in (("never-there",), ("overlay-images", "f" * 64)):
            got = probe("stat", h.b.mount.path(*parts), limit=30)
            print(f"  hang: stat {'/'.join(parts)}: {got}")
            assert not got.ok and got.value == "ENOENT" and got.seconds < NODE_LOCAL_BOUND, got
        # what graftfs reads from the share: its timeout=10, then at once
        for what, op, path in [
            ("stat a new name in a shared layer dir", "stat", h.b.mount.path("overlay", h.layer, "never-there")),
            ("read a shared tar-split", "read", h.b.mount.path("overlay-layers", f"{h.layer}.tar-split.gz")),
        ]:
            got = probe(op, path, limit=40)
            print(f"  hang: {what}: {got}")
            assert not got.ok and got.value in SHARE_DOWN and got.seconds <= GRAFTFS_TIMEOUT + 3, (what, got)
        started = time.monotonic()
        wait_for(lambda: not _available(h.b, c.root), HANG_BOUND, "B's status to say the share is unavailable")
        step("B's status says the share is unavailable", started)
        reason = str(_share_status(h.b, c.root).get("unavailable_reason"))
        print(f"  unavailable_reason: {reason!r}")
        assert "does not answer" in reason, reason
        kept = probe("list", h.b.mount.path("overlay-images"), limit=HANG_BOUND)
        assert kept.ok and kept.value == h.listed, kept
        _node_local_work(h)
        step("node-local podman work, once the share is unavailable", hung)
        # measured from here on: what reaches the GlusterFS mount through the links
        link = stuck.probe("read", h.fresh(), limit=LINK_PROBE_LIMIT)
        print(f"  hang: read a shared layer's file through the diff link: {link}")
        if link.ok or link.seconds > GRAFTFS_TIMEOUT + 3:
            gaps.append(f"a read of a shared layer's file through the graph is bounded by timeout= "
                        f"(README 'Share outages'): {link}")
        _shared_images_stay(h, gaps)
        # a podman run killed while it waited on the share leaves an incomplete layer, which the
        # next podman command deletes
        after = _measure(h.b, "ps", "--format", "{{.Names}}", timeout=SHARED_CMD_LIMIT)
        if after.code != 0 or after.seconds >= NODE_LOCAL_BOUND:
            gaps.append(f"podman ps after a run of a shared image was killed during the hang: {after}")
        step("the hang, in all", hung)
    finally:
        c.share.resume_all()
        stuck.reap()
    _recovers(c, h)
    if gaps:  # everything else held: the test reports these gaps instead of failing on them
        pytest.xfail("; ".join(gaps))


# -- e. the volume stopped and started; glusterd restarted --------------------------------------


@pytest.mark.timeout(180)
def test_volume_restart_and_glusterd_restart_recover_without_remount(cluster: Cluster) -> None:
    c = cluster
    a, b = c.node("a"), c.node("b")
    a.podman("import", c.image_tar, "localhost/shared:1")
    _publish(a, c.root, "localhost/shared:1")
    _wait_listed(b, "localhost/shared:1")
    images = b.images()
    listed = probe("list", b.mount.path("overlay-images"))
    assert listed.ok, listed
    pid = b.mount.status()["pid"]

    c.share.stop_volume()
    stopped = time.monotonic()
    wait_for(lambda: not _available(b, c.root), HANG_BOUND, "B's status to say the share is unavailable")
    step("volume stopped: B's status says unavailable", stopped)
    kept = probe("list", b.mount.path("overlay-images"), limit=HANG_BOUND)
    assert kept.ok and kept.value == listed.value, kept
    ps = b.podman("ps", "-a", "--format", "{{.Names}}", timeout=60, check=False)
    assert ps.returncode == 0, ps
    listing = _measure(b, "images", "--format", "{{.Repository}}:{{.Tag}}")  # README: stays listed
    assert listing.code == 0 and set(listing.out.split()) == images, listing

    started = time.monotonic()
    c.share.start_volume()
    took = c.share.wait_clients_connected()
    step(f"volume started (client reconnected in {took:.1f} s)", started)
    wait_for(lambda: _available(b, c.root), 15, "B's status to say the share is available")
    step("volume started: B's status says available", started)
    assert b.mount.status()["pid"] == pid  # no remount
    assert probe("list", b.mount.path("overlay-images")).value == listed.value
    assert b.images() == images  # exactly the share's view again
    assert _run(b, "localhost/shared:1", "echo", "after the volume restart") == "after the volume restart\n"

    started = time.monotonic()
    c.share.restart_glusterd()
    step("glusterd restarted", started)
    assert _available(b, c.root)
    assert b.images() == images
    assert _run(b, "localhost/shared:1", "echo", "after glusterd") == "after glusterd\n"
    # and the share takes a new image, which B lists without a remount
    a.podman("import", c.local_tar, "localhost/later:1")
    _publish(a, c.root, "localhost/later:1")
    _wait_listed(b, "localhost/later:1")
    assert b.images() == images | {"localhost/later:1"}
    assert b.mount.status()["pid"] == pid
    _fsck_clean(c.root)
