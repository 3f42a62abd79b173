"""The command line as users and mount(8) drive it: daemonized mount, umount, dead mounts,
status, one-line errors, and tools/mount-helper."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, Sample, force_unmount, graftfs_cmd, needs_mount, sh, wait_for
from graftfs.node.mounts import find_mount, pid_alive, read_runtime


def daemon_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "graftfs mount"], capture_output=True, text=True, timeout=10).stdout
    return [int(p) for p in out.split()]


def mount_and_signal(sample: Sample, mnt: str, signum: int) -> None:
    """Mount with the daemon in the background, send it ``signum``, wait until it is gone."""
    assert graftfs_cmd("mount", "--rw", sample.rw, "--ro", sample.share_ro, mnt).returncode == 0
    info = read_runtime(mnt)
    assert info is not None and isinstance(info["pid"], int)
    pid: int = info["pid"]
    os.kill(pid, signum)
    wait_for(lambda: not pid_alive(pid), 15, f"the daemon to exit on signal {signum}")


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[str]:
    """A mountpoint that is always cleared at teardown, whatever the test did to it."""
    path = str(tmp_path / "mnt")
    os.makedirs(path)
    yield path
    info = read_runtime(path)
    force_unmount(path)
    if info and isinstance(info.get("pid"), int) and pid_alive(info["pid"]):
        os.kill(info["pid"], signal.SIGKILL)


@needs_mount
def test_mount_umount_leaves_nothing_behind(sample: Sample, mnt: str) -> None:
    before = set(daemon_pids())
    res = graftfs_cmd("mount", "--rw", sample.rw, "--ro", sample.share_ro, mnt)
    assert res.returncode == 0, res.stderr
    # mount returned: the view is ready at once
    assert sample.ids.image_app in os.listdir(os.path.join(mnt, "overlay-images"))
    entry = find_mount(mnt)
    assert entry is not None and entry.fstype == "fuse.graftfs"
    info = read_runtime(mnt)
    assert info is not None and pid_alive(info["pid"])  # type: ignore[arg-type]
    res = graftfs_cmd("umount", mnt)
    assert res.returncode == 0, res.stderr
    assert find_mount(mnt) is None
    assert not pid_alive(info["pid"])  # type: ignore[arg-type]
    assert set(daemon_pids()) <= before
    assert read_runtime(mnt) is None
    tmp_dir = Path(sample.rw, ".graftfs", "tmp")
    assert not tmp_dir.exists() or not os.listdir(tmp_dir)


@needs_mount
def test_umount_clears_a_dead_mount(sample: Sample, mnt: str) -> None:
    mount_and_signal(sample, mnt, signal.SIGKILL)
    res = sh("stat", mnt, timeout=10)
    dead = ("Transport endpoint is not connected", "Software caused connection abort")  # ENOTCONN, ECONNABORTED
    assert res.returncode != 0 and any(m in res.stderr for m in dead), res.stderr
    status = graftfs_cmd("status", mnt)
    assert status.returncode == 1 and "dead mount" in status.stderr
    res = graftfs_cmd("umount", mnt)
    assert res.returncode == 0, res.stderr
    assert find_mount(mnt) is None
    # and the node can mount again, with its state intact
    assert graftfs_cmd("mount", "--rw", sample.rw, "--ro", sample.share_ro, mnt).returncode == 0
    assert Path(mnt, "overlay", sample.ids.local, "diff", "tmp", "container-output.log").exists()
    assert graftfs_cmd("umount", mnt).returncode == 0


@needs_mount
def test_status_for_people(sample: Sample, mnt: str) -> None:
    assert graftfs_cmd("mount", "--rw", sample.rw, "--ro", sample.share_ro, mnt).returncode == 0
    os.unlink(os.path.join(mnt, "overlay", sample.ids.base, "diff", "bin", "hello"))
    res = graftfs_cmd("status", mnt)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"rw   {sample.rw}: 1 layers, 0 images" in out
    assert f"ro   {sample.share_ro}: 3 layers, 2 images visible" in out
    assert f"overlay/{sample.ids.base}/diff/bin/hello" in out
    assert f"layer {sample.ids.broken[:12]} in {sample.share_ro}: overlay link file missing" in out
    raw = subprocess.run(["getfattr", "--only-values", "-n", "user.graftfs.status", mnt],
                         capture_output=True, timeout=30)
    assert raw.returncode == 0 and b'"layout": "isulad"' in raw.stdout
    assert graftfs_cmd("umount", mnt).returncode == 0


@needs_mount
def test_mount_errors_are_one_line(sample: Sample, mnt: str, tmp_path: Path) -> None:
    cases = [
        (["--rw", str(tmp_path / "missing"), "--ro", sample.share_ro, mnt], "does not exist"),
        (["--rw", sample.rw, mnt], "no RO directory"),
        (["--rw", sample.rw, "--ro", sample.share_ro, "-o", "bogus", mnt], "unknown mount option 'bogus'"),
        (["--rw", sample.rw, "--ro", sample.share_ro, "--layout", "nope", mnt], "invalid choice"),
        (["--rw", mnt, "--ro", sample.share_ro, mnt], "is the mountpoint or inside it"),
        (["--rw", sample.rw, "--ro", sample.share_ro, "-o", "timeout=soon", mnt], "not a number"),
    ]
    for argv, message in cases:
        res = graftfs_cmd("mount", *argv)
        assert res.returncode != 0, argv
        assert message in res.stderr, (argv, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    # a busy mountpoint
    assert graftfs_cmd("mount", "--rw", sample.rw, "--ro", sample.share_ro, mnt).returncode == 0
    res = graftfs_cmd("mount", "--rw", sample.rw, "--ro", sample.share_ro, mnt)
    assert res.returncode == 1 and "is busy" in res.stderr and len(res.stderr.splitlines()) == 1
    res = graftfs_cmd("umount", str(tmp_path))
    assert res.returncode == 1 and "is not mounted" in res.stderr
    assert graftfs_cmd("umount", mnt).returncode == 0


@needs_mount
def test_a_daemon_dying_before_ready_is_reported_at_once(sample: Sample, mnt: str, tmp_path: Path) -> None:
    """A daemon that cannot even start (here: its trio import fails; the command itself loads no
    trio) is reported with its exit status, not after the 120 s readiness timeout."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "trio.py").write_text("raise ImportError('trio is broken on purpose')\n")
    env = {**os.environ, "PYTHONPATH": f"{broken}:{REPO / 'src'}"}
    res = subprocess.run([sys.executable, "-m", "graftfs", "mount", "--rw", sample.rw, "--ro", sample.share_ro, mnt],
                         capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and "exited with status 1 before the mount was ready" in res.stderr, res.stderr
    assert find_mount(mnt) is None


def test_bad_cli_arguments_get_one_line() -> None:
    for argv in (["mount"], ["frobnicate"], ["status"], ["umount", "a", "b"],
                 ["mount", "--rw", "/tmp", "-o", "kernel_opens=yes", "/mnt"]):
        res = graftfs_cmd(*argv)
        assert res.returncode == 2, argv
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_every_command_and_argument_has_help() -> None:
    """--help is the reference a user reads first: every command, argument and mount option
    is explained there."""
    import argparse

    from graftfs.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
                assert action.help, f"graftfs {name}: {action.dest} has no help text"
        res = graftfs_cmd(name, "--help")
        assert res.returncode == 0 and res.stdout.startswith("usage: graftfs " + name), res.stderr
    mount_help = graftfs_cmd("mount", "--help").stdout
    for key in ("rw=", "ro=", "layout=", "timeout=", "poll=", "share_inotify=", "lease=", "direct=", "publish=",
                "publish_match=", "log=", "metrics=", "kernel_opens="):
        assert key in mount_help, key


@needs_mount
def test_mount_helper_as_mount8_calls_it(sample: Sample, mnt: str) -> None:
    helper = str(REPO / "tools" / "mount-helper")
    graftfs_bin = Path(sys.executable).parent / "graftfs"
    if not graftfs_bin.exists():
        pytest.skip(f"{graftfs_bin} missing: install the package (pip install -e .)")
    env = {**os.environ, "GRAFTFS_BIN": str(graftfs_bin)}
    opts = f"rw={sample.rw},ro={sample.share_ro},defaults,_netdev,x-systemd.requires=/mnt,nodev"
    res = subprocess.run([helper, "none", mnt, "-o", opts], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    entry = find_mount(mnt)
    assert entry is not None and entry.fstype == "fuse.graftfs" and "nodev" in entry.options
    assert sample.ids.image_web in os.listdir(os.path.join(mnt, "overlay-images"))
    assert graftfs_cmd("umount", mnt).returncode == 0
    bad = subprocess.run([helper, "none", mnt, "-o", f"rw={sample.rw}"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert bad.returncode != 0 and "no RO directory" in bad.stderr


@needs_mount
def test_mount_t_graftfs_and_fstab_when_helper_installed(sample: Sample, mnt: str, tmp_path: Path) -> None:
    if not os.path.exists("/sbin/mount.graftfs"):
        pytest.skip("/sbin/mount.graftfs is not installed (tools/install installs it)")
    # libmount drops the value of "rw=DIR" before calling the helper; the helper must recover it
    res = subprocess.run(["mount", "-t", "graftfs", "none", mnt, "-o", f"rw={sample.rw},ro={sample.share_ro}"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert sample.ids.image_app in os.listdir(os.path.join(mnt, "overlay-images"))
    assert Path(sample.rw, ".graftfs").is_dir()
    assert graftfs_cmd("umount", mnt).returncode == 0
    fstab = tmp_path / "fstab"
    fstab.write_text(f"none {mnt} graftfs rw={sample.rw},ro={sample.share_ro},_netdev,noauto,nosuid 0 0\n")
    res = subprocess.run(["mount", "-T", str(fstab), mnt], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    entry = find_mount(mnt)
    assert entry is not None and "nosuid" in entry.options
    assert sample.ids.image_web in os.listdir(os.path.join(mnt, "overlay-images"))
    assert graftfs_cmd("umount", mnt).returncode == 0


@needs_mount
def test_sigterm_unmounts_cleanly(sample: Sample, mnt: str) -> None:
    mount_and_signal(sample, mnt, signal.SIGTERM)
    assert find_mount(mnt) is None
    assert read_runtime(mnt) is None
    assert "signal 15: unmounting" in Path(sample.rw, ".graftfs", "graftfs.log").read_text()


@needs_mount
def test_status_stays_within_xattr_size_with_many_hides(sample: Sample, mnt: str) -> None:
    state = Path(sample.rw, ".graftfs")
    state.mkdir(exist_ok=True)
    with open(state / "hides.log", "w") as f:
        for i in range(3000):
            f.write(json.dumps(f"overlay/{'x' * 200}{i}") + "\n")
    assert graftfs_cmd("mount", "--rw", sample.rw, "--ro", sample.share_ro, mnt).returncode == 0
    res = graftfs_cmd("status", "--json", mnt)
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["hidden_count"] == 3000 and 0 < len(st["hidden"]) < 3000
    assert "... and 2990 more (status --json)" in graftfs_cmd("status", mnt).stdout  # 10 paths shown
    assert graftfs_cmd("umount", mnt).returncode == 0


@needs_mount
def test_verbose_daemon_logs_each_request_with_its_path(sample: Sample, mount_factory: object) -> None:
    """--verbose: which paths the runtime walks, request by request (for finding what still
    reaches graftfs), in the daemon's log."""
    # (graftfs serving opens: with kernel_opens the kernel sends neither open nor release)
    gm = mount_factory(sample.rw, [sample.share_ro], "--verbose", "-o", "kernel_opens=0")  # type: ignore[operator]
    manifest = gm.path("overlay-images", sample.ids.image_app, "manifest")
    with open(manifest, "rb") as f:
        f.read()
    os.listdir(gm.path("overlay-layers"))
    log = gm.log_text()
    rel = f"overlay-images/{sample.ids.image_app}/manifest"
    for line in (f"request lookup {rel}", f"request open {rel}", f"request read {rel}", f"request release {rel}",
                 "request opendir overlay-layers", "request readdir overlay-layers"):
        assert line in log, line


@needs_mount
def test_verbose_tracing_survives_files_deleted_while_open(sample: Sample, mount_factory: object) -> None:
    """A file deleted while open is read, stat'ed and closed (containers do it all the time): the
    tracer names it "?" and the request is answered; the mount stays up."""
    gm = mount_factory(sample.rw, [sample.share_ro], "--verbose")  # type: ignore[operator]
    path = gm.path("overlay", sample.ids.local, "diff", "scratch")
    with open(path, "w+b") as f:
        f.write(b"x" * 10)
        f.flush()
        os.unlink(path)
        f.seek(0)
        assert f.read() == b"x" * 10 and os.fstat(f.fileno()).st_size == 10
    assert os.listdir(gm.path("overlay-images"))  # still serving
    assert "request read ?" in gm.log_text()  # a node gone from the view: named "?"
