"""`graftfs umount` without --lazy on a graph the runtime used: the runtime's binds of its own
directories over themselves (containers/storage's overlay home) and graftfs' binds are taken
away, the mount follows and its daemon exits; while containers or processes use the graph it
refuses in one line and changes nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import GraftMount, Sample, graftfs_cmd, sh, wait_for
from graftfs.node.mounts import find_mount, mount_table
from test_podman import Node, busybox_tar, make_node, needs_mount, share  # noqa: F401  (fixtures)

pytestmark = [needs_mount, pytest.mark.timeout(240)]
needs_podman = pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")

MountFactory = Callable[..., GraftMount]


def below(mnt: str) -> list[tuple[str, str]]:
    """(mount point, fstype) of everything mounted below ``mnt``, in mount order."""
    return [(e.mountpoint, e.fstype) for e in mount_table() if e.mountpoint.startswith(mnt + "/")]


def assert_unmounted(gm: GraftMount) -> None:
    """Nothing left at or below the mount point, and the daemon exited by itself, cleanly."""
    assert find_mount(gm.mnt) is None and not below(gm.mnt), mount_table()
    assert gm.proc is not None and gm.proc.wait(timeout=30) == 0, gm.log_text()[-3000:]


@pytest.fixture
def killed_on_exit() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes the test started; each one's process group is killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _killed_podman_service(node: Node, sock: str, procs: list[subprocess.Popen[bytes]]) -> None:
    """Start podman's API service on ``node`` and SIGKILL it once its store is open: the
    overlay driver's home stays bound over itself, as after any podman process that was killed
    (or that ended with a container mounted)."""
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], env=node.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    procs.append(proc)
    wait_for(lambda: os.path.exists(sock), 30, "the podman API socket")
    wait_for(lambda: find_mount(node.mount.path("overlay")) is not None, 30, "podman's bind of overlay/")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@needs_podman
def test_umount_after_podman_without_lazy(make_node: Callable[..., Node], share: str, busybox_tar: str,
                                          killed_on_exit: list[subprocess.Popen[bytes]]) -> None:
    node = make_node("n", share)
    node.podman("import", busybox_tar, "localhost/bb:1")
    assert node.podman("run", "--rm", "localhost/bb:1", "echo", "hi").stdout == "hi\n"
    _killed_podman_service(node, os.path.join(node.env["TMPDIR"], "api.sock"), killed_on_exit)
    mnt = node.mount.mnt
    self_bind = find_mount(node.mount.path("overlay"))
    assert self_bind is not None and self_bind.fstype == "fuse.graftfs", below(mnt)
    assert find_mount(node.mount.path("storage.lock")) is not None  # and graftfs' own binds
    res = graftfs_cmd("umount", mnt)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "graftfs umount: removed the runtime's bind of overlay/ over itself\n"
    assert_unmounted(node.mount)


@needs_podman
def test_umount_refuses_under_a_running_container(make_node: Callable[..., Node], share: str,
                                                  busybox_tar: str) -> None:
    node = make_node("n", share)
    mnt = node.mount.mnt
    node.podman("import", busybox_tar, "localhost/bb:1")
    node.podman("run", "-d", "--name", "svc", "localhost/bb:1", "sleep", "600")
    before = below(mnt)
    res = graftfs_cmd("umount", mnt)
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stderr
    # (the container's layer is the node's own: shown as a link to its RW directory, where the
    # runtime's overlay mount of it lands)
    merged = [m for m, fstype in below(node.mount.rw) if fstype == "overlay"]
    assert len(merged) == 1 and merged[0].endswith("/merged"), below(node.mount.rw)
    assert res.stderr == (f"graftfs umount: {mnt} is in use: 2 container mounts below it (e.g. {merged[0]}); "
                          "stop the containers (podman stop -a, then podman unmount -a) or use --lazy\n")
    # nothing was taken away: the runtime's bind, graftfs' binds and the container's mounts stay
    assert below(mnt) == before and (node.mount.path("overlay"), "fuse.graftfs") in before
    listed = sh("ls", mnt, timeout=30)
    assert listed.returncode == 0 and "overlay-containers" in listed.stdout.split(), listed.stderr
    node.podman("exec", "svc", "true")
    node.podman("stop", "-t", "0", "svc")
    node.podman("rm", "svc")
    res = graftfs_cmd("umount", mnt)
    assert res.returncode == 0, res.stderr
    assert_unmounted(node.mount)


def _bind_over_itself(path: str) -> None:
    subprocess.run(["mount", "--bind", path, path], check=True, timeout=30)


def test_umount_removes_self_binds_made_by_hand(sample: Sample, mount_factory: MountFactory) -> None:
    gm = mount_factory(sample.rw, [sample.share_ro])
    _bind_over_itself(gm.path("overlay"))
    _bind_over_itself(gm.path("overlay", sample.ids.base))  # below the first: removed before it
    _bind_over_itself(gm.path("overlay-layers"))
    res = graftfs_cmd("umount", gm.mnt)
    assert res.returncode == 0, res.stderr
    assert res.stderr == (f"graftfs umount: removed the runtime's binds of overlay/, overlay/{sample.ids.base}/, "
                          "overlay-layers/ over themselves\n")
    assert_unmounted(gm)


def test_umount_refuses_what_it_did_not_make_and_processes_using_it(
        sample: Sample, mount_factory: MountFactory, tmp_path: Path,
        killed_on_exit: list[subprocess.Popen[bytes]]) -> None:
    gm = mount_factory(sample.rw, [sample.share_ro])
    _bind_over_itself(gm.path("overlay"))
    # a bind of another directory of the mount is not the runtime's self-bind, a tmpfs is unknown
    subprocess.run(["mount", "--bind", gm.path("overlay-images"), gm.path("overlay-layers")], check=True, timeout=30)
    subprocess.run(["mount", "-t", "tmpfs", "scratch", gm.path("overlay", sample.ids.base)], check=True, timeout=30)
    before = below(gm.mnt)
    res = graftfs_cmd("umount", gm.mnt)
    assert res.returncode == 1 and res.stderr == (
        f"graftfs umount: {gm.mnt} is in use: 2 mounts below it that graftfs does not recognise "
        f"(e.g. {gm.path('overlay-layers')}, fuse.graftfs); unmount them (findmnt -R {gm.mnt} lists them) "
        "or use --lazy\n")
    assert below(gm.mnt) == before
    assert sh("umount", gm.path("overlay", sample.ids.base), timeout=30).returncode == 0
    assert sh("umount", gm.path("overlay-layers"), timeout=30).returncode == 0
    # a process working in the runtime's bind holds it, and the mount, busy
    sleeper = subprocess.Popen(["sleep", "600"], cwd=gm.path("overlay"), start_new_session=True,
                               stdin=subprocess.DEVNULL)
    killed_on_exit.append(sleeper)
    res = graftfs_cmd("umount", gm.mnt)
    assert res.returncode == 1 and res.stderr == (
        f"graftfs umount: {gm.mnt} is in use by 1 process (e.g. {sleeper.pid} sleep: cwd {gm.path('overlay')}); "
        "stop it or use --lazy\n")
    assert below(gm.mnt) == [(gm.path("overlay"), "fuse.graftfs")]
    os.killpg(sleeper.pid, signal.SIGKILL)
    sleeper.wait(timeout=30)
    res = graftfs_cmd("umount", gm.mnt)
    assert res.returncode == 0 and "removed the runtime's bind of overlay/ over itself" in res.stderr, res.stderr
    assert_unmounted(gm)
