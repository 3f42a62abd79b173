"""Reliability: share outages on a real network share, a killed daemon, hostile share content and
unprivileged users — with nothing lost and nothing left behind.

The share in the outage tests is served by a test-private sshd over loopback and mounted with
sshfs (tests/sshshare.py): stopping the sshd or SIGSTOP-ing it is a real fault of the backing
filesystem, seen by graftfs exactly as an NFS outage would be. Every access to the mount runs in
a separate process bounded by ``timeout -k`` (a process blocked on a FUSE request ignores
SIGTERM), and every test ends with the shared residue check (tests/residue.py).
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

from conftest import REPO, GraftMount, Sample, bind_ro, force_unmount, graftfs_cmd, needs_mount, sh, wait_for
from graftfs.cli.status import fetch_status
from graftfs.linux import MNT_DETACH, umount
from graftfs.node.mounts import find_mount, mount_table, pid_alive, read_runtime
from graftfs.share.sample import build_demo, digest
from residue import assert_no_residue
from sshshare import SshShare, needs_sshfs, ssh_share

pytestmark = [needs_mount]

MountFactory = Callable[..., GraftMount]

#: The issue's bound: a request on a shared path fails within this many seconds when the share
#: is gone or hangs (graftfs' default timeout= is 10 s; sshfs' own keepalive is faster).
FAIL_BOUND = 10.0
#: errno values an unreachable share may answer with (never ENOENT: the entry is not known gone).
SHARE_DOWN = {"EIO", "ETIMEDOUT", "ENOTCONN"}

#: One access to the mount, in a process of its own: prints "OK <seconds> <data>" or
#: "ERR <seconds> <errno name>". Plain python3, so that it runs as `nobody` too.
PROBE = r"""
import errno, os, sys, time
op, path = sys.argv[1], sys.argv[2]
t = time.monotonic()
try:
    data = b""
    if op == "read":
        with open(path, "rb") as f:
            data = f.read()
    elif op == "list":
        data = "/".join(sorted(os.listdir(path))).encode()
    elif op == "stat":
        os.stat(path)
    elif op == "write":
        with open(path, "wb") as f:
            f.write(sys.argv[3].encode())
            os.fsync(f.fileno())
        d = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(d)
        os.close(d)
    elif op == "mkdir":
        os.mkdir(path)
    elif op == "readlink":
        data = os.readlink(path).encode("utf-8", "surrogateescape")
    print("OK", round(time.monotonic() - t, 3), data.decode("utf-8", "replace"))
except OSError as e:
    print("ERR", round(time.monotonic() - t, 3), errno.errorcode.get(e.errno, str(e.errno)))
"""


#: The system's python for probes: `nobody` can run it (a venv or pyenv shim may be root-only).
PYTHON = "/usr/bin/python3"


@dataclass
class Outcome:
    ok: bool
    seconds: float  # wall clock seen by the caller, process start included
    value: str  # the data read (ok) or the errno name

    def __str__(self) -> str:
        return f"{'OK' if self.ok else 'ERR'} after {self.seconds:.2f} s: {self.value[:200]!r}"


def probe(op: str, path: str, *extra: str, limit: float = 30.0, user: str | None = None) -> Outcome:
    """Do ``op`` on ``path`` in a separate process, killed after ``limit`` seconds."""
    argv = [PYTHON, "-c", PROBE, op, path, *extra]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *argv]
    started = time.monotonic()
    res = subprocess.run(["timeout", "-k", "2", str(limit), *argv], capture_output=True, text=True,
                         timeout=limit + 10, stdin=subprocess.DEVNULL)
    took = time.monotonic() - started
    if res.returncode in (124, 137) or not res.stdout:
        return Outcome(False, took, f"hung or died (exit {res.returncode}): {res.stderr[-300:]}")
    out = res.stdout[:-1] if res.stdout.endswith("\n") else res.stdout  # print's own newline only
    word, _, rest = out.partition(" ")
    return Outcome(word == "OK", took, rest.partition(" ")[2])


def _tree_status(g: GraftMount, st: dict[str, object] | None = None) -> dict[str, object]:
    """The status of the mount's share (found by its path: a node's pin tree may come first)."""
    ro = (st or g.status())["ro"]
    assert isinstance(ro, list)
    found = [t for t in ro if t.get("tree") == g.ro[0]]
    assert len(found) == 1, ro
    return found[0]  # type: ignore[no-any-return]


def _add_probe_files(share: str, layer: str, count: int) -> list[str]:
    """Files in a shared layer that no one has read yet (the page cache cannot answer for them)."""
    d = os.path.join(share, "overlay", layer, "diff", "probe")
    os.makedirs(d, exist_ok=True)
    names = []
    for i in range(count):
        Path(d, f"f{i}").write_text(f"probe {i}\n")
        names.append(f"f{i}")
    return names


@dataclass
class NetShare:
    """The demo trees, the share served over sshfs, graftfs mounted over it."""

    ssh: SshShare
    export: str
    rw: str
    ids: object
    graft: GraftMount
    probes: Iterator[str]

    def view(self, *parts: str) -> str:
        return self.graft.path(*parts)

    def fresh_shared_file(self) -> tuple[str, str]:
        """A shared file never read through the view, and what it holds."""
        name = next(self.probes)
        return self.view("overlay", self.ids.base, "diff", "probe", name), f"probe {name[1:]}\n"  # type: ignore[attr-defined]


def _net_share(tmp_path: Path, mount_factory: MountFactory, keepalive: bool, *opts: str) -> Iterator[NetShare]:
    export, rw = str(tmp_path / "share"), str(tmp_path / "rw")
    ids = build_demo(export, rw)
    names = _add_probe_files(export, ids.base, 40)
    with ssh_share(tmp_path, export, keepalive=keepalive) as ssh:
        graft = mount_factory(rw, [ssh.mnt], *opts)
        try:
            yield NetShare(ssh, export, rw, ids, graft, iter(names))
        finally:
            ssh.resume()  # a hung share would keep the unmount waiting
            daemon = graft.proc.pid if graft.proc else 0
            assert graft.stop() == 0, graft.log_text()[-3000:]
    assert_no_residue([str(tmp_path)], rw_trees=[rw], shares=[export], daemons=[daemon], mountpoints=[graft.mnt])


@pytest.fixture
def net_share(tmp_path: Path, mount_factory: MountFactory) -> Iterator[NetShare]:
    """sshfs with keepalives: a stopped or hung server makes sshfs itself fail in seconds."""
    yield from _net_share(tmp_path, mount_factory, True)


@pytest.fixture
def hard_share(tmp_path: Path, mount_factory: MountFactory) -> Iterator[NetShare]:
    """sshfs without keepalives (hangs as long as the server does, like an NFS hard mount) and
    graftfs with a 3 s limit: only graftfs' own time limit can answer."""
    yield from _net_share(tmp_path, mount_factory, False, "-o", "timeout=3")


def _assert_rw_serves(ns: NetShare, tag: str) -> None:
    """RW-only paths answer while the share is out: the node's own layer, read and written."""
    ids = ns.ids
    own = probe("read", ns.view("overlay", ids.local, "diff", "tmp", "container-output.log"), limit=FAIL_BOUND)  # type: ignore[attr-defined]
    assert own.ok and own.value == "written by a container\n", own
    new = ns.view("overlay", ids.local, "diff", "tmp", f"during-{tag}.txt")  # type: ignore[attr-defined]
    wrote = probe("write", new, f"written during {tag}\n", limit=FAIL_BOUND)
    assert wrote.ok, wrote
    back = probe("read", new, limit=FAIL_BOUND)
    assert back.ok and back.value == f"written during {tag}\n", back
    listed = probe("list", ns.view("overlay", ids.local, "diff", "tmp"), limit=FAIL_BOUND)  # type: ignore[attr-defined]
    assert listed.ok and f"during-{tag}.txt" in listed.value.split("/"), listed
    assert Path(ns.rw, "overlay", ids.local, "diff", "tmp", f"during-{tag}.txt").read_text() == (  # type: ignore[attr-defined]
        f"written during {tag}\n")


def _assert_shared_fails_fast(ns: NetShare) -> None:
    path, _ = ns.fresh_shared_file()
    for op, target in [("read", path), ("list", os.path.dirname(path)),
                       ("stat", os.path.join(os.path.dirname(path), "never-there"))]:
        got = probe(op, target, limit=FAIL_BOUND + 20)
        assert not got.ok and got.value in SHARE_DOWN, (op, target, got)
        assert got.seconds <= FAIL_BOUND, (op, target, got)


@needs_sshfs
@pytest.mark.timeout(150)
def test_stopped_sshd_fails_fast_and_recovers_without_remount(net_share: NetShare) -> None:
    ns = net_share
    images = probe("list", ns.view("overlay-images"))
    assert images.ok and len(images.value.split("/")) == 2, images
    path, want = ns.fresh_shared_file()
    first = probe("read", path)
    assert first.ok and first.value == want, first
    pid = ns.graft.status()["pid"]

    ns.ssh.stop_sshd()
    _assert_shared_fails_fast(ns)
    _assert_rw_serves(ns, "outage")
    wait_for(lambda: not _tree_status(ns.graft)["available"], FAIL_BOUND, "status to say the share is unavailable")
    human = graftfs_cmd("status", ns.graft.mnt, timeout=30)
    assert human.returncode == 0 and "UNAVAILABLE since" in human.stdout, human
    # never read as "everything was deleted": the catalog's view stays
    assert probe("list", ns.view("overlay-images")).value == images.value

    ns.ssh.start_sshd()  # same port; sshfs reconnects by itself
    path, want = ns.fresh_shared_file()
    wait_for(lambda: probe("read", path, limit=FAIL_BOUND).value == want, 30, "a shared file to be readable again")
    wait_for(lambda: bool(_tree_status(ns.graft)["available"]), 15, "status to say the share is back")
    assert ns.graft.status()["pid"] == pid  # no remount
    assert probe("list", ns.view("overlay-images")).value == images.value
    _assert_rw_serves(ns, "after")


@needs_sshfs
@pytest.mark.timeout(150)
def test_sigstopped_sshd_fails_fast_and_recovers(net_share: NetShare) -> None:
    ns = net_share
    path, want = ns.fresh_shared_file()
    assert probe("read", path).value == want
    ns.ssh.pause()
    _assert_shared_fails_fast(ns)
    _assert_rw_serves(ns, "hang")
    wait_for(lambda: not _tree_status(ns.graft)["available"], FAIL_BOUND, "status to say the share is unavailable")
    ns.ssh.resume()
    path, want = ns.fresh_shared_file()
    wait_for(lambda: probe("read", path, limit=FAIL_BOUND).value == want, 30, "a shared file to be readable again")
    wait_for(lambda: bool(_tree_status(ns.graft)["available"]), 15, "status to say the share is available")


@needs_sshfs
@pytest.mark.timeout(180)
def test_hung_share_is_bounded_by_graftfs_own_timeout(hard_share: NetShare) -> None:
    """sshfs without keepalives hangs with the server: graftfs' timeout=3 answers ETIMEDOUT;
    more requests stuck on the share at once than graftfs has worker slots do not starve
    RW-only paths (they did: abandoned workers kept their slots); requests queued in one
    directory all fail within the bound too (the kernel sends them one at a time, since
    pyfuse3/libfuse 3.14 do not ask for parallel directory operations: each waited the full
    timeout in turn until graftfs failed calls on a tree already stuck at once); status says
    the share is unavailable and the view keeps its last known entries, as for a share that
    fails; the share comes back by itself."""
    ns = hard_share
    crowd_dirs = _add_crowd_dirs(ns, 40)
    path, want = ns.fresh_shared_file()
    assert probe("read", path).value == want
    images = probe("list", ns.view("overlay-images"))
    assert images.ok, images
    ns.ssh.pause()
    _assert_shared_fails_fast(ns)
    # a tree whose poll hangs past the limit is unavailable, like one that fails: the view stays
    wait_for(lambda: not _tree_status(ns.graft)["available"], FAIL_BOUND, "status to say the share is unavailable")
    assert "does not answer" in str(_tree_status(ns.graft)["unavailable_reason"])
    assert probe("list", ns.view("overlay-images"), limit=FAIL_BOUND).value == images.value
    assert probe("list", ns.view(), limit=FAIL_BOUND).ok
    crowd = _start_probes("read", [os.path.join(d, "f") for d in crowd_dirs])
    time.sleep(1)  # all of them waiting on the share now
    try:
        _assert_rw_serves(ns, "crowd")
    finally:
        _all_fail_fast(crowd)
    _assert_rw_serves(ns, "after-crowd")
    # a crowd in one directory: lookups of new names, which the kernel serializes
    one_dir = os.path.dirname(ns.fresh_shared_file()[0])
    _all_fail_fast(_start_probes("stat", [os.path.join(one_dir, f"q{i}") for i in range(8)]))
    ns.ssh.resume()
    path, want = ns.fresh_shared_file()
    wait_for(lambda: probe("read", path, limit=FAIL_BOUND).value == want, 30, "a shared file to be readable again")
    wait_for(lambda: bool(_tree_status(ns.graft)["available"]), 15, "status to say the share is available")


def _start_probes(op: str, paths: list[str]) -> list[subprocess.Popen[str]]:
    """Probes running at once, each in its own process (bounded by ``timeout -k``)."""
    return [subprocess.Popen(["timeout", "-k", "2", "60", PYTHON, "-c", PROBE, op, path], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, stdin=subprocess.DEVNULL) for path in paths]


def _all_fail_fast(procs: list[subprocess.Popen[str]]) -> None:
    """Each probe failed as a share that is down does, within the bound (all reaped, always)."""
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=70)
            word, took, err = [*out.split(), "", "", ""][:3]
            assert word == "ERR" and err in SHARE_DOWN and float(took) <= FAIL_BOUND, out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _add_crowd_dirs(ns: NetShare, count: int) -> list[str]:
    """``count`` shared directories with a file each, looked up through the view (so that the
    kernel asks graftfs only for the files)."""
    top = os.path.join(ns.export, "overlay", ns.ids.base, "diff", "crowd")  # type: ignore[attr-defined]
    for i in range(count):
        os.makedirs(os.path.join(top, f"d{i}"))
        Path(top, f"d{i}", "f").write_text(f"crowd {i}\n")
    dirs = [ns.view("overlay", ns.ids.base, "diff", "crowd", f"d{i}") for i in range(count)]  # type: ignore[attr-defined]
    listed = probe("list", os.path.dirname(dirs[0]))
    assert listed.ok and len(listed.value.split("/")) == count, listed
    for d in dirs:
        assert probe("stat", d).ok
    return dirs


# -- a daemon killed with SIGKILL ---------------------------------------------------------------


def _daemon_pid(mnt: str) -> int:
    info = read_runtime(mnt)
    assert info is not None and isinstance(info.get("pid"), int), info
    return int(info["pid"])  # type: ignore[call-overload]


def _kill_daemon(mnt: str) -> int:
    pid = _daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 10, "the daemon to die")
    dead = probe("list", mnt, limit=FAIL_BOUND)  # a listing always reaches the daemon
    assert not dead.ok and dead.value == "ENOTCONN", dead  # the kernel mount is left dead
    return pid


def _state_after_crash(sample: Sample, mnt: str, note: str) -> None:
    """What the node did before the crash is all there, and the share is served again."""
    ids = sample.ids
    images = probe("list", os.path.join(mnt, "overlay-images"))
    assert images.ok and images.value.split("/") == [ids.image_app], images  # web stays hidden
    assert not probe("stat", os.path.join(mnt, "overlay", ids.base, "diff", "bin", "hello")).ok
    kept = probe("read", os.path.join(mnt, "notes", "kept.txt"))
    assert kept.ok and kept.value == note, kept
    shared = probe("read", os.path.join(mnt, "overlay", ids.app, "diff", "app", "data.txt"))
    assert shared.ok and shared.value == "application data\n", shared


@pytest.mark.timeout(180)
def test_killed_daemon_remount_keeps_hides_and_synced_writes(sample: Sample, tmp_path: Path) -> None:
    """SIGKILL of the daemon leaves a dead mount: `graftfs umount` clears it, and a new mount —
    by `graftfs mount` or by the mount(8) helper — shows the hides and the fsync'ed RW writes
    made before the crash."""
    ids = sample.ids
    mnt = str(tmp_path / "graph")
    os.mkdir(mnt)
    argv = ["mount", "--rw", sample.rw, "--ro", sample.share_ro, mnt]
    helper_bin = tmp_path / "graftfs-bin"
    helper_bin.write_text(f"#!/bin/sh\nexec {sys.executable} -m graftfs \"$@\"\n")  # this checkout's graftfs
    helper_bin.chmod(0o755)
    pids: list[int] = []
    try:
        started = graftfs_cmd(*argv)
        assert started.returncode == 0, started.stderr
        pids.append(_daemon_pid(mnt))
        note = "fsync'ed before the crash\n"
        # deletes of shared entries (hides), and an RW write the client fsyncs (file and dir)
        assert probe("mkdir", os.path.join(mnt, "notes")).ok
        wrote = probe("write", os.path.join(mnt, "notes", "kept.txt"), note)
        assert wrote.ok, wrote
        gone = sh("rm", "-rf", os.path.join(mnt, "overlay-images", ids.image_web))
        assert gone.returncode == 0, gone.stderr
        gone = sh("rm", os.path.join(mnt, "overlay", ids.base, "diff", "bin", "hello"))
        assert gone.returncode == 0, gone.stderr
        # the client's fsync and fsync of the directory reached graftfs (which fsyncs the backing
        # file and directory, and the hide log)
        served = fetch_status(mnt)["requests"]
        assert served["fsync"]["count"] >= 1 and served["fsyncdir"]["count"] >= 1, served

        _kill_daemon(mnt)
        status = graftfs_cmd("status", mnt)
        assert status.returncode == 1 and "dead mount" in status.stderr, status
        cleared = graftfs_cmd("umount", mnt)
        assert cleared.returncode == 0, cleared  # (it does not always say "dead": its check is a stat,
        # which the kernel may answer from its attribute cache without asking the dead daemon)
        assert find_mount(mnt) is None
        again = graftfs_cmd(*argv)
        assert again.returncode == 0, again.stderr
        pids.append(_daemon_pid(mnt))
        _state_after_crash(sample, mnt, note)

        # the same through the mount(8) helper, as an fstab line or a systemd unit would mount
        _kill_daemon(mnt)
        assert graftfs_cmd("umount", mnt).returncode == 0
        helper = subprocess.run([str(REPO / "tools" / "mount-helper"), "none", mnt, "-o",
                                 f"rw={sample.rw},ro={sample.share_ro}"], capture_output=True, text=True,
                                timeout=120, env={**os.environ, "GRAFTFS_BIN": str(helper_bin)},
                                stdin=subprocess.DEVNULL)
        assert helper.returncode == 0, helper.stderr
        pids.append(_daemon_pid(mnt))
        _state_after_crash(sample, mnt, note)
        done = graftfs_cmd("umount", mnt)
        assert done.returncode == 0, done.stderr
    finally:
        if find_mount(mnt) is not None:
            graftfs_cmd("umount", "--lazy", mnt)
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert_no_residue([str(tmp_path)], rw_trees=[sample.rw], shares=[sample.share], daemons=pids,
                      mountpoints=[mnt], keep_mounts=[sample.share_ro])


# -- hostile share content ----------------------------------------------------------------------

LONG_NAME = "n" * 255
ODD_NAMES = ["back\\slash", "new\nline", "..dots", "a..b", LONG_NAME, "tab\there", "-dash", " lead-space"]


@dataclass
class Hostile:
    """Ids of what the hostile share holds, and where its outside-the-share bait is."""

    truncated: str
    not_utf8: str
    huge: str
    loop_image: str
    loop_layers: tuple[str, str]
    linked_record: str  # images.json is a symlink to a record outside the share
    linked_link: str  # a layer whose link file is a symlink to a file outside the share
    linked_diff: str  # a layer whose diff is a symlink to a directory outside the share
    linked_entry: str  # overlay/<id> itself is a symlink outside the share
    outside: str


def _hostile_share(share: str, ids: object, outside: str) -> Hostile:
    """Add to the demo share entries that a broken or malicious publisher could leave."""
    from graftfs.share.sample import SampleLayer, write_image, write_layer

    base = ids.base  # type: ignore[attr-defined]
    diff = os.path.join(share, "overlay", base, "diff")
    for name in ODD_NAMES:
        Path(diff, name).write_text(f"literal {name!r}\n")
    with open(os.path.join(os.fsencode(diff), b"caf\xe9-latin1"), "wb") as f:  # not UTF-8
        f.write(b"bytes name\n")
    os.symlink("loop-b", os.path.join(diff, "loop-a"))
    os.symlink("loop-a", os.path.join(diff, "loop-b"))
    os.symlink("../../../../../../../../../etc/hostname", os.path.join(diff, "up-and-out"))
    os.symlink(os.path.join(outside, "secret"), os.path.join(diff, "abs-out"))
    os.symlink("/etc", os.path.join(share, "evil-top"))  # a link at the share's top
    h = Hostile(digest("image:truncated"), digest("image:not-utf8"), digest("image:huge"), digest("image:loop"),
                (digest("layer:loop-a"), digest("layer:loop-b")), digest("image:linked-record"),
                digest("layer:linked-link"), digest("layer:linked-diff"), digest("layer:linked-entry"), outside)
    write_image(share, h.truncated, ids.app, ["bad/truncated:1"], record=b'{"id": "' + h.truncated.encode())  # type: ignore[attr-defined]
    write_image(share, h.not_utf8, ids.app, ["bad/latin1:1"],  # type: ignore[attr-defined]
                record=json.dumps({"id": h.not_utf8, "layer": ids.app, "names": ["x"]}).encode()[:-2] + b'\xe9"}')  # type: ignore[attr-defined]
    pad = "x" * (50 * 1024 * 1024)
    write_image(share, h.huge, ids.app, ["bad/huge:1"],  # type: ignore[attr-defined]
                record=json.dumps({"id": h.huge, "layer": ids.app, "names": ["bad/huge:1"], "pad": pad}).encode())  # type: ignore[attr-defined]
    a, b = h.loop_layers
    write_layer(share, SampleLayer(a, b, {"a.txt": b"a\n"}))
    write_layer(share, SampleLayer(b, a, {"b.txt": b"b\n"}))
    write_image(share, h.loop_image, a, ["bad/loop:1"])
    # bait outside the share: a record that would pass every check if it were read
    os.makedirs(outside, exist_ok=True)
    Path(outside, "secret").write_text("outside the share\n")
    Path(outside, "images.json").write_text(json.dumps({"id": h.linked_record, "layer": ids.app,  # type: ignore[attr-defined]
                                                        "names": ["bait/record:1"]}))
    write_image(share, h.linked_record, ids.app, ["bait/record:1"])  # type: ignore[attr-defined]
    record = os.path.join(share, "overlay-images", h.linked_record, "images.json")
    os.unlink(record)
    os.symlink(os.path.join(outside, "images.json"), record)
    Path(outside, "short").write_text("OUTSIDESHORTNAME\n")
    write_layer(share, SampleLayer(h.linked_link, base, {"l.txt": b"l\n"}))
    link = os.path.join(share, "overlay", h.linked_link, "link")
    os.unlink(link)
    os.symlink(os.path.join(outside, "short"), link)
    os.makedirs(os.path.join(outside, "diff"), exist_ok=True)
    Path(outside, "diff", "planted").write_text("outside diff\n")
    write_layer(share, SampleLayer(h.linked_diff, base, {}))
    shutil.rmtree(os.path.join(share, "overlay", h.linked_diff, "diff"))
    os.symlink(os.path.join(outside, "diff"), os.path.join(share, "overlay", h.linked_diff, "diff"))
    write_layer(share, SampleLayer(h.linked_entry, base, {"e.txt": b"e\n"}))
    entry = os.path.join(share, "overlay", h.linked_entry)
    shutil.move(entry, os.path.join(outside, "entry"))
    os.symlink(os.path.join(outside, "entry"), entry)
    # names in the managed directories that are not entry ids: never entries, never shown
    for managed, name in JUNK_ENTRY_NAMES:
        os.makedirs(os.path.join(share, managed, name), exist_ok=True)
    os.symlink(os.path.join(outside, "entry"), os.path.join(share, "overlay-images", digest("image:linked-dir")))
    return h


JUNK_ENTRY_NAMES = [("overlay", "..evil"), ("overlay-images", "a\nb"), ("overlay-layers", "A" * 64),
                    ("overlay-images", "x" * 255)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", ["isulad", "containers-storage"])
def test_hostile_share_content_is_skipped_or_served_literally(tmp_path: Path, ro_binds: Callable[[str], str],
                                                              mount_factory: MountFactory, layout: str) -> None:
    """Entries a broken or malicious publisher could leave are skipped (logged once, shown by
    status) or served literally as data; the mount stays up, and nothing outside the share is
    read into the view: records and link files are not followed when they are symlinks."""
    share, rw, outside = str(tmp_path / "share"), str(tmp_path / "rw"), str(tmp_path / "outside")
    ids = build_demo(share, rw)
    h = _hostile_share(share, ids, outside)
    share_ro = ro_binds(share)
    g = mount_factory(rw, [share_ro], "--layout", layout)
    time.sleep(2.5)  # several watcher polls and record sweeps over the hostile entries
    st = g.status()
    tree = _tree_status(g, st)
    skipped = {s["id"]: s["reason"] for s in st["skipped"]}  # type: ignore[attr-defined]
    bad_images = {h.truncated, h.not_utf8, h.huge, h.loop_image, h.linked_record}
    bad_layers = {*h.loop_layers, h.linked_link, h.linked_diff}
    assert bad_images | bad_layers <= set(skipped), skipped
    assert "larger than" in skipped[h.huge] and "loop" in skipped[h.loop_layers[0]], skipped
    assert tree["images"] == 2, tree  # app and web, nothing else
    # each problem is logged once, however many polls and sweeps saw it
    log = g.log_text()
    for bad in bad_images | bad_layers:
        assert log.count(f"skipping image {bad}") + log.count(f"skipping layer {bad}") == 1, (bad, log[-3000:])
    # nothing of the bait outside the share shows through the view
    view = _view_text(g, layout)
    baits = [h.linked_record, h.linked_link, h.linked_diff, h.linked_entry, "OUTSIDESHORTNAME", "bait/record",
             digest("image:linked-dir"), *(name for _, name in JUNK_ENTRY_NAMES)]
    for bait in baits:
        assert bait not in view, bait
    synthesized = probe("list", g.path("overlay", "l"))
    assert synthesized.ok and "OUTSIDESHORTNAME" not in synthesized.value, synthesized
    for short in synthesized.value.split("/"):
        target = probe("readlink", g.path("overlay", "l", short))
        assert target.ok and target.value.startswith("../") and target.value.endswith("/diff"), target
        assert not target.value[3:-5].count("/"), target  # ../<id>/diff, one level, inside the view
    # odd names inside a good layer are served literally, symlinks as the links they are
    diff = g.path("overlay", ids.base, "diff")
    listed = os.listdir(os.fsencode(diff))
    for name in ODD_NAMES:
        assert os.fsencode(name) in listed, name
        got = probe("read", os.path.join(diff, name))
        assert got.ok and got.value == f"literal {name!r}\n", (name, got)
    assert b"caf\xe9-latin1" in listed
    assert Path(os.fsencode(diff).decode("utf-8", "surrogateescape"), "caf\udce9-latin1").read_bytes() == (
        b"bytes name\n")
    assert probe("readlink", os.path.join(diff, "loop-a")).value == "loop-b"
    loop = probe("read", os.path.join(diff, "loop-a"))
    assert not loop.ok and loop.value == "ELOOP", loop
    assert probe("readlink", os.path.join(diff, "up-and-out")).value == "../../../../../../../../../etc/hostname"
    assert probe("readlink", os.path.join(diff, "abs-out")).value == os.path.join(outside, "secret")
    assert probe("readlink", g.path("evil-top")).value == "/etc"
    too_long = probe("stat", os.path.join(diff, "n" * 256))
    assert not too_long.ok and too_long.value == "ENAMETOOLONG", too_long
    # the mount is alive and still serves the good images
    assert probe("read", g.path("overlay", ids.app, "diff", "app", "data.txt")).value == "application data\n"
    assert g.status()["pid"] == st["pid"]  # (mount_factory checks that it exits cleanly)


@pytest.fixture
def ro_binds(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Read-only bind mounts of shares; requested before mount_factory, so removed after it."""
    made: list[str] = []

    def make(src: str) -> str:
        dst = str(tmp_path / f"{os.path.basename(src)}-ro")
        made.append(dst)
        bind_ro(src, dst)
        return dst

    yield make
    for dst in made:
        force_unmount(dst)


def _view_text(g: GraftMount, layout: str) -> str:
    """Every name under the view's managed directories, and the composed indexes' text."""
    out = []
    for top in ("overlay", "overlay-layers", "overlay-images"):
        listed = probe("list", g.path(top))
        assert listed.ok, listed
        out.append(listed.value)
    if layout == "containers-storage":
        for index in (("overlay-layers", "layers.json"), ("overlay-images", "images.json")):
            got = probe("read", g.path(*index))
            assert got.ok, got
            json.loads(got.value)
            out.append(got.value)
    return "\n".join(out)


# -- permissions: allow_other with default_permissions ----------------------------------------------


@pytest.mark.timeout(120)
def test_unprivileged_user_gets_normal_permission_checks(tmp_path: Path, ro_binds: Callable[[str], str]) -> None:
    """The mount is shared with every user (allow_other) and the kernel checks mode bits
    (default_permissions): `nobody` reads what is world-readable, in the share and in RW, and
    nothing else; it writes only its own files."""
    share, rw = str(tmp_path / "share"), str(tmp_path / "rw")
    ids = build_demo(share, rw)
    diff = Path(share, "overlay", ids.base, "diff")
    (diff / "pub.txt").write_text("public\n")
    (diff / "secret.txt").write_text("root only\n")
    (diff / "secret.txt").chmod(0o600)
    (diff / "locked").mkdir(mode=0o700)
    (diff / "locked" / "inside.txt").write_text("behind a 0700 dir\n")
    own = Path(rw, "overlay", ids.local, "diff", "tmp")
    (own / "nobodys.txt").write_text("nobody's own\n")
    (own / "nobodys.txt").chmod(0o600)
    os.chown(own / "nobodys.txt", 65534, 65534)
    share_ro = ro_binds(share)
    top = tempfile.mkdtemp(prefix="gfs-perm-", dir="/tmp")  # pytest's tmp dirs are 0700: nobody could not walk in
    os.chmod(top, 0o755)
    g = GraftMount(os.path.join(top, "mnt"), rw, [share_ro], str(tmp_path / "mnt.log"))
    os.mkdir(g.mnt)
    try:
        g.start()
        entry = find_mount(g.mnt)
        assert entry is not None
        opts = next(line.split()[3] for line in Path("/proc/self/mounts").read_text().splitlines()
                    if line.split()[1] == g.mnt).split(",")
        assert "allow_other" in opts and "default_permissions" in opts, opts

        def as_nobody(op: str, *parts: str, data: str = "") -> Outcome:
            return probe(op, g.path(*parts), *([data] if data else []), user="nobody")

        layer = ("overlay", ids.base, "diff")
        mine = ("overlay", ids.local, "diff", "tmp")
        assert as_nobody("read", *layer, "pub.txt").value == "public\n"
        assert as_nobody("read", *mine, "container-output.log").value == "written by a container\n"
        assert as_nobody("read", *mine, "nobodys.txt").value == "nobody's own\n"
        assert as_nobody("write", *mine, "nobodys.txt", data="changed by nobody\n").ok
        assert Path(own, "nobodys.txt").read_text() == "changed by nobody\n"
        denied = [
            as_nobody("read", *layer, "secret.txt"),
            as_nobody("list", *layer, "locked"),
            as_nobody("read", *layer, "locked", "inside.txt"),
            as_nobody("write", *layer, "pub.txt", data="overwrite"),
            as_nobody("write", *layer, "new.txt", data="create"),
            as_nobody("write", *mine, "container-output.log", data="overwrite"),
            as_nobody("mkdir", "nobody-dir"),
        ]
        assert all(not d.ok and d.value == "EACCES" for d in denied), denied
        # root still can, and what nobody was refused left no trace in RW
        assert probe("read", g.path(*layer, "secret.txt")).value == "root only\n"
        assert not Path(rw, *layer, "pub.txt").exists() and not Path(rw, "nobody-dir").exists()
        assert Path(rw, *mine, "container-output.log").read_text() == "written by a container\n"
    finally:
        daemon = g.proc.pid if g.proc else 0
        code = g.stop()
        shutil.rmtree(top, ignore_errors=True)
    assert code == 0, g.log_text()[-3000:]
    assert_no_residue([str(tmp_path), top], rw_trees=[rw], shares=[share], daemons=[daemon], mountpoints=[g.mnt],
                      keep_mounts=[share_ro])


# -- the runtime on a node whose share is down ----------------------------------------------------


@needs_sshfs
@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
@pytest.mark.timeout(300)
def shared_and_local_images(tmp_path: Path) -> tuple[Path, str]:
    """A share holding ``localhost/shared:1``, published from a plain podman graph as a writer
    node would, and the tar of a different image for the node's own use (with the same content
    podman would reuse the shared layer, and a container on it would read the share itself)."""
    from graftfs.share.sample import BUSYBOX, busybox_image_tar

    sys.path.insert(0, str(REPO / "tools"))
    from graftfs_soak.load import Node

    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed")
    tar = busybox_image_tar(str(tmp_path / "image"))
    Path(tmp_path, "image", "rootfs", "node-local").write_text("this node's own layer\n")
    local_tar = str(tmp_path / "image" / "local.tar")
    subprocess.run(["tar", "-C", str(tmp_path / "image" / "rootfs"), "-cf", local_tar, "."], check=True, timeout=60)
    export = tmp_path / "share"
    export.mkdir()
    writer = Node.create("writer", str(tmp_path / "writer-graph"), str(tmp_path / "writer"))
    try:
        writer.must("import", "-q", tar, "localhost/shared:1")
        pub = graftfs_cmd("publish", "--graph", writer.graph, "--share", str(export), "localhost/shared:1", timeout=120)
        assert pub.returncode == 0, pub.stderr
    finally:
        writer.clean()
        _unmount_below(str(tmp_path / "writer-graph"))
    return export, local_tar


def test_podman_keeps_working_on_the_node_while_its_share_is_down(tmp_path: Path, mount_factory: MountFactory) -> None:
    """podman's graph is a graftfs mount over a share served by sshd: with the sshd gone,
    `podman ps`, `exec` and a run of a node-local image keep working (RW paths), the shared
    image stays in the view, and everything works again when the sshd is back, no remount."""
    export, local_tar = shared_and_local_images(tmp_path)
    from graftfs_soak.load import Node  # on the path now
    with ssh_share(tmp_path, str(export)) as ssh:
        rw = tmp_path / "rw"
        rw.mkdir()
        g = mount_factory(str(rw), [ssh.mnt], "--layout", "containers-storage")
        node = Node.create("node", g.mnt, str(tmp_path / "node"))
        try:
            node.must("import", "-q", local_tar, "localhost/local:1")
            node.must("run", "-d", "--name", "up", "localhost/local:1", "sleep", "1000")
            assert node.must("run", "--rm", "localhost/shared:1", "echo", "from the share") == "from the share\n"
            images = node.must("images", "--format", "{{.Repository}}:{{.Tag}}").split()
            assert sorted(images) == ["localhost/local:1", "localhost/shared:1"], images

            ssh.stop_sshd()
            wait_for(lambda: not _tree_status(g)["available"], FAIL_BOUND, "status to say the share is unavailable")
            ps = node.podman("ps", "--format", "{{.Names}}", timeout=60)
            assert ps.code == 0 and ps.out.split() == ["up"], ps
            execd = node.podman("exec", "up", "echo", "still up", timeout=60)
            assert execd.out == "still up\n", execd
            # the shared image stays in the view (never read as deleted); its files answer EIO,
            # so `podman images`, which reads every image's config, fails until the share is back
            shown = probe("list", g.path("overlay-images"))
            assert shown.ok and len([n for n in shown.value.split("/") if len(n) == 64]) == 2, shown
            local = node.podman("run", "--rm", "localhost/local:1", "echo", "local run", timeout=60)
            assert local.code == 0 and local.out == "local run\n", local

            ssh.start_sshd()
            wait_for(lambda: bool(_tree_status(g)["available"]), 30, "status to say the share is back")
            again = node.podman("run", "--rm", "localhost/shared:1", "echo", "back", timeout=60)
            assert again.code == 0 and again.out == "back\n", again
            assert sorted(node.must("images", "--format", "{{.Repository}}:{{.Tag}}").split()) == sorted(images)
        finally:
            node.clean()
            _unmount_below(g.mnt, keep={g.mnt})
            ssh.resume()
            daemon = g.proc.pid if g.proc else 0
            assert g.stop() == 0, g.log_text()[-3000:]
    assert_no_residue([str(tmp_path), node.short], rw_trees=[str(rw)], shares=[str(export)], daemons=[daemon],
                      mountpoints=[g.mnt])


def _unmount_below(top: str, keep: set[str] | None = None) -> None:
    """Detach what podman may have left mounted below ``top`` (deepest first)."""
    for entry in sorted(mount_table(), key=lambda m: -len(m.mountpoint)):
        if entry.mountpoint.startswith(top + "/") and entry.mountpoint not in (keep or set()):
            with contextlib.suppress(OSError):
                umount(entry.mountpoint, MNT_DETACH)
