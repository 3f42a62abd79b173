"""Shared fixtures: real graftfs mounts served by a daemon subprocess the tests can kill.

Every mount made here is unmounted in teardown, even when the test failed: the daemon is asked
to stop by unmounting, then killed if it does not exit, and the mountpoint is detached lazily
as a last resort. The shared trees are bind-mounted read-only, so any write graftfs might make
to them fails loudly (EROFS) instead of passing unnoticed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from graftfs.cli.status import fetch_status
from graftfs.linux import MNT_DETACH, umount
from graftfs.node.mounts import find_mount
from graftfs.share.sample import DemoIds, build_demo

REPO = Path(__file__).resolve().parent.parent
MOUNT_READY_TIMEOUT = 30.0

can_mount = os.geteuid() == 0 and os.access("/dev/fuse", os.R_OK | os.W_OK)
needs_mount = pytest.mark.skipif(not can_mount, reason="needs root and /dev/fuse for real FUSE mounts")


def graftfs_cmd(*args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the graftfs CLI as a user would (bounded in time, output captured)."""
    return subprocess.run([sys.executable, "-m", "graftfs", *args], capture_output=True, text=True,
                          timeout=timeout, check=check, stdin=subprocess.DEVNULL)


def sh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command that touches the mount; `timeout -k` frees it even from a hung FUSE wait."""
    return subprocess.run(["timeout", "-k", "2", str(timeout), *args], capture_output=True, text=True,
                          timeout=timeout + 10, stdin=subprocess.DEVNULL)


def layer_diff(graph: str, lid: str) -> str:
    """Where a layer's ``diff`` in a containers-storage graph really is, as the view shows it:
    below the link its whole directory is where the node holds the layer itself, or the link
    ``diff`` itself is (a shared layer). A merged FUSE directory fails the test: the kernel's
    overlay mounts must never sit on graftfs."""
    layer_dir = os.path.join(graph, "overlay", lid)
    if os.path.islink(layer_dir):
        return os.path.join(os.readlink(layer_dir), "diff")
    diff = os.path.join(layer_dir, "diff")
    assert os.path.islink(diff), f"{diff} is not a link to its backing directory (a merged FUSE directory)"
    return os.readlink(diff)


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def settled_notifications(g: GraftMount) -> int:
    """The kernel notifications sent so far, once the mount's own first changes are told (its
    lease written into the share shows in the next poll)."""
    last = None
    for _ in range(20):
        now = int(g.status()["watcher"]["kernel_notifications"])  # type: ignore[index]
        if now == last:
            return now
        last = now
        time.sleep(0.7)
    raise AssertionError("the watcher keeps notifying on an idle mount")


def force_unmount(path: str) -> None:
    """Unmount whatever is at ``path`` (busy or dead mounts are detached)."""
    for _ in range(5):
        if find_mount(path) is None:
            return
        try:
            umount(path)
        except OSError:
            with contextlib.suppress(OSError):
                umount(path, MNT_DETACH)


@dataclass
class GraftMount:
    """One graftfs mount over a RW dir and RO trees, served by a killable subprocess."""

    mnt: str
    rw: str
    ro: list[str]
    log: str
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.mnt, *parts)

    def start(self) -> None:
        argv = [sys.executable, "-m", "graftfs", "mount", "--foreground", "--rw", self.rw, "--log-file", self.log,
                *self.extra]
        for r in self.ro:
            argv += ["--ro", r]
        self.proc = subprocess.Popen([*argv, self.mnt], stdin=subprocess.DEVNULL, start_new_session=True)
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"graftfs exited with {proc.returncode} before mounting:\n{self.log_text()}")
            return find_mount(self.mnt) is not None

        wait_for(ready, MOUNT_READY_TIMEOUT, "the mount")

    def stop(self) -> int | None:
        """Unmount and reap the daemon; returns its exit status (None if it had to be killed)."""
        proc, self.proc = self.proc, None
        force_unmount(self.mnt)
        if proc is None:
            return 0
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            force_unmount(self.mnt)
            return None

    def remount(self) -> None:
        assert self.stop() == 0, self.log_text()
        self.start()

    def status(self) -> dict[str, object]:
        return fetch_status(self.mnt)

    def log_text(self) -> str:
        try:
            return Path(self.log).read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class Sample:
    """The demo trees: a share (also bind-mounted read-only) and a node's RW dir."""

    root: Path
    share: str  # writable path, for the test to change the share
    share_ro: str  # read-only bind mount of it, what graftfs is given
    rw: str
    ids: DemoIds


def bind_ro(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    subprocess.run(["mount", "--bind", src, dst], check=True, timeout=30)
    subprocess.run(["mount", "-o", "remount,bind,ro", dst], check=True, timeout=30)
    try:
        os.mkdir(os.path.join(dst, ".write-probe"))
    except OSError as e:
        assert e.errno == errno.EROFS, e
    else:
        raise AssertionError(f"{dst} is writable; the read-only bind mount did not take")


@pytest.fixture
def sample(tmp_path: Path) -> Iterator[Sample]:
    if not can_mount:
        pytest.skip("needs root and /dev/fuse for real FUSE mounts")
    share, rw = str(tmp_path / "share"), str(tmp_path / "rw")
    ids = build_demo(share, rw)
    share_ro = str(tmp_path / "share-ro")
    bind_ro(share, share_ro)
    try:
        yield Sample(tmp_path, share, share_ro, rw, ids)
    finally:
        force_unmount(share_ro)


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[object]:
    """Make GraftMounts; every one is stopped at teardown, and must not have crashed."""
    made: list[GraftMount] = []

    def make(rw: str, ro: list[str], *extra: str, name: str = "mnt") -> GraftMount:
        mnt = str(tmp_path / name)
        os.makedirs(mnt, exist_ok=True)
        gm = GraftMount(mnt, rw, ro, str(tmp_path / f"{name}.log"), list(extra))
        made.append(gm)
        gm.start()
        return gm

    yield make
    crashed = []
    for gm in made:
        code = gm.stop()
        if code != 0:
            crashed.append(f"{gm.mnt}: exit {code}\n{gm.log_text()[-3000:]}")
    assert not crashed, "graftfs daemon did not exit cleanly:\n" + "\n".join(crashed)


@pytest.fixture(params=["kernel_opens=auto", "kernel_opens=0"])
def graft(request: pytest.FixtureRequest, sample: Sample, mount_factory: object) -> GraftMount:
    """The demo sample mounted: RW dir over the read-only share; once with the kernel opening
    files itself where this pyfuse3 can (graftfs.fuse.files), once with graftfs serving opens."""
    return mount_factory(sample.rw, [sample.share_ro], "-o", request.param)  # type: ignore[operator, no-any-return]
