"""`graftfs remount`: a new daemon (new code, same options) in place of the old one while the
node's containers run; they keep running, and exec, stop, rm and new runs work afterwards."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import GraftMount, Sample, graftfs_cmd, wait_for
from graftfs.node.mounts import pid_alive, read_runtime
from test_podman import Node, busybox_tar, make_node, needs_mount, share  # noqa: F401  (fixtures)

pytestmark = [needs_mount, pytest.mark.timeout(180)]


def test_remount_under_running_containers(make_node: Callable[..., Node], share: str, busybox_tar: str) -> None:
    a = make_node("a", share, "-o", "lease=0.5,publish=auto")
    a.podman("import", busybox_tar, "localhost/app:1")
    a.podman("run", "-d", "--name", "svc", "localhost/app:1", "sh", "-c",
             "i=0; while :; do i=$((i+1)); echo $i > /tmp/beat; sleep 0.2; done")
    cid = a.podman("inspect", "--format", "{{.Id}}", "svc").stdout.strip()
    before = read_runtime(a.mount.mnt) or {}
    res = graftfs_cmd("remount", a.mount.mnt, timeout=120)
    assert res.returncode == 0 and "replaced by" in res.stdout, res.stdout + res.stderr
    after = read_runtime(a.mount.mnt) or {}
    assert after["pid"] != before["pid"] and pid_alive(int(after["pid"]))  # type: ignore[call-overload]
    assert after["argv"] == before["argv"]  # the same options
    status = a.mount.status()
    assert status["pid"] == after["pid"] and "autopublish" in status and status["leases"], status
    # the container never stopped, and everything works on the new mount
    assert a.podman("inspect", "--format", "{{.Id}} {{.State.Running}}", "svc").stdout.split() == [cid, "true"]
    first = a.podman("exec", "svc", "cat", "/tmp/beat").stdout
    time.sleep(0.5)
    assert a.podman("exec", "svc", "cat", "/tmp/beat").stdout != first  # still beating
    assert a.podman("run", "--rm", "localhost/app:1", "echo", "new run").stdout == "new run\n"
    a.podman("stop", "-t", "0", "svc")
    a.podman("rm", "svc")
    assert a.podman("ps", "-aq").stdout.strip() == ""
    # the old daemon let go of its detached mount and exited
    old = int(before["pid"])  # type: ignore[call-overload]
    deadline = time.monotonic() + 10
    while pid_alive(old) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(old)


def test_remount_keeps_verbose_logging(sample: Sample, mount_factory: Callable[..., GraftMount]) -> None:
    g = mount_factory(sample.rw, [sample.share_ro], "--verbose")
    res = graftfs_cmd("remount", g.mnt, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    new = (read_runtime(g.mnt) or {})["pid"]
    assert os.listdir(g.path("overlay"))  # requests to the new daemon
    wait_for(lambda: f"[{new}]: request " in Path(g.log).read_text(), 5, "the new daemon's request log")


def test_remount_refuses_what_is_not_a_graftfs_mount(tmp_path: str) -> None:
    res = graftfs_cmd("remount", os.fspath(tmp_path))
    assert res.returncode == 1 and "not a graftfs mount" in res.stderr and len(res.stderr.splitlines()) == 1
