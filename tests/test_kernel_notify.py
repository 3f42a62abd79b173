"""Every cache notification graftfs sends is one the kernel takes.

A notification the kernel refuses is not an error graftfs sees (it is skipped quietly), but
libfuse prints each one on the daemon's stderr, which a backgrounded mount writes to its log
file: ``fuse: writing device: Not a directory`` for an entry named below what the kernel knows
as a link (a layer's ``diff``, whose backing directory a container writes to behind the
mount). Here a typical podman workload runs on two nodes sharing a published image, with
each daemon's stderr in its log file as in a backgrounded mount, and neither log may hold a
single such line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import graftfs_cmd, wait_for
from test_podman import Node, busybox_tar, make_node, needs_mount, share  # noqa: F401  (fixtures)

pytestmark = [needs_mount, pytest.mark.timeout(300)]

#: What libfuse prints when the kernel refuses a write to /dev/fuse (a notification it rejects).
REFUSED = "writing device"


@contextlib.contextmanager
def stderr_into(path: Path) -> Iterator[None]:
    """Daemons started inside inherit ``path`` as their stderr (appended to, like their log
    file: the daemon's own log lines and libfuse's land in one file, in order)."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def test_podman_workload_sends_no_refused_notifications(make_node: Callable[..., Node], share: str,
                                                         busybox_tar: str, tmp_path: Path) -> None:
    nodes = []
    for name in ("a", "b"):
        with stderr_into(tmp_path / f"{name}-graph.log"):  # the --log-file make_node gives the mount
            nodes.append(make_node(name, share))
    a, b = nodes
    assert all(Path(n.mount.log) == tmp_path / f"{n.name}-graph.log" for n in nodes)

    # node A: import, run, commit, save, rmi, load again, run what was loaded
    a.podman("import", busybox_tar, "localhost/base:1")
    assert a.podman("run", "--rm", "localhost/base:1", "echo", "hello").stdout == "hello\n"
    a.podman("run", "--name", "build", "localhost/base:1", "sh", "-c",
             "mkdir -p /data/sub && echo built > /data/sub/f && rm /bin/touch")
    a.podman("commit", "-q", "build", "localhost/app:1")
    a.podman("rm", "build")
    archive = str(tmp_path / "app.tar")
    a.podman("save", "-o", archive, "localhost/app:1")
    a.podman("rmi", "localhost/app:1")
    assert "localhost/app:1" not in a.images()
    a.podman("load", "-q", "-i", archive)
    out = a.podman("run", "--rm", "localhost/app:1", "sh", "-c", "cat /data/sub/f; ls /bin/touch || echo gone")
    assert out.stdout == "built\ngone\n"

    # published to the share; node B, running all along, runs it and writes in its container
    pub = graftfs_cmd("publish", "--graph", a.mount.mnt, "--share", share, "--json", "localhost/app:1", timeout=120)
    assert pub.returncode == 0, pub.stderr
    assert json.loads(pub.stdout)["images"][0]["status"] == "published"
    wait_for(lambda: "localhost/app:1" in b.images(), 10, "node B to list the published image")
    b.podman("run", "--name", "work", "localhost/app:1", "sh", "-c",
             "cat /data/sub/f > /copy && mkdir -p /var/x && for i in 1 2 3; do echo $i > /var/x/$i; done")
    assert b.podman("start", "-a", "work").returncode == 0
    b.podman("rm", "work")
    b.podman("rmi", "localhost/app:1")
    assert "localhost/app:1" not in b.images()
    assert "localhost/app:1" in a.images()
    a.podman("rmi", "-a")

    time.sleep(1.0)  # the watchers' last changes (a poll is 0.5 s) reach the kernel
    for node in nodes:
        watcher = node.mount.status()["watcher"]
        assert watcher["kernel_notifications"] > 0, (node.name, watcher)  # type: ignore[index]
        refused = [line for line in node.mount.log_text().splitlines() if REFUSED in line]
        assert not refused, f"{node.name}: {len(refused)} refused notifications, e.g. {refused[:3]}"
