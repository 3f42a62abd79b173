"""Kernel overlayfs on graftfs, as a container runtime uses it: shared layers as lowerdir, and a
container's upper/work directories created through the mount (which needs rename flags, trusted.*
xattrs and whiteout device nodes from graftfs)."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GraftMount, Sample, force_unmount, needs_mount

pytestmark = needs_mount


@contextlib.contextmanager
def overlay(target: str, lower: list[str], upper: str | None = None, work: str | None = None) -> Iterator[str]:
    os.makedirs(target, exist_ok=True)
    opts = "lowerdir=" + ":".join(lower)
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, target],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout.splitlines()[-5:]
        raise AssertionError(f"overlay mount failed: {res.stderr.strip()}; dmesg: {dmesg}")
    try:
        yield target
    finally:
        force_unmount(target)


def test_overlay_lowerdir_on_graftfs(graft: GraftMount, sample: Sample, tmp_path: Path) -> None:
    ids = sample.ids
    # the runtime's way: lower layers named by their short links, topmost first
    lowers = [graft.path("overlay", "l", Path(graft.path("overlay", lid, "link")).read_text())
              for lid in (ids.app, ids.base)]
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    with overlay(str(tmp_path / "rootfs"), lowers, str(upper), str(work)) as root:
        assert Path(root, "etc", "os-release").read_text() == "NAME=demo\n"
        assert Path(root, "app", "data.txt").read_text() == "application data\n"
        Path(root, "app", "data.txt").write_text("changed in the container\n")
        os.unlink(Path(root, "bin", "hello"))
        assert not Path(root, "bin", "hello").exists()
        wh = os.lstat(upper / "bin" / "hello")
        assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    # nothing of the container's writes reached the shared layer
    assert Path(sample.share, "overlay", ids.app, "diff", "app", "data.txt").read_text() == "application data\n"
    assert Path(graft.path("overlay", ids.base, "diff", "bin", "hello")).exists()


def test_overlay_upper_and_work_on_graftfs(graft: GraftMount, sample: Sample, tmp_path: Path) -> None:
    ids = sample.ids
    # a container layer created through the mount, on top of shared layers (also through the mount)
    container = graft.path("overlay", "c" * 64)
    for sub in ("diff", "work"):
        os.makedirs(os.path.join(container, sub))
    lowers = [graft.path("overlay", lid, "diff") for lid in (ids.app, ids.base)]
    upper = os.path.join(container, "diff")
    with overlay(str(tmp_path / "rootfs"), lowers, upper, os.path.join(container, "work")) as root:
        r = Path(root)
        (r / "new.txt").write_text("written in the container\n")
        (r / "app" / "data.txt").write_text("modified\n")
        os.unlink(r / "bin" / "hello")  # whiteout in the upper
        os.rename(r / "new.txt", r / "renamed.txt")
        os.rename(r / "etc" / "os-release", r / "etc" / "os-release.bak")  # copy-up + rename of a lower file
        # rm -rf of a lower directory then mkdir: an opaque directory
        os.unlink(r / "app" / "data.txt")
        os.rmdir(r / "app")
        os.mkdir(r / "app")
        (r / "app" / "fresh").write_text("fresh\n")
        assert sorted(os.listdir(r / "app")) == ["fresh"]
        assert not (r / "bin" / "hello").exists()
        assert (r / "renamed.txt").read_text() == "written in the container\n"
        assert (r / "etc" / "os-release.bak").read_text() == "NAME=demo\n"
        assert not (r / "etc" / "os-release").exists()
        os.sync()
    # what overlayfs left in its upper, seen through graftfs and on the RW disk
    up = Path(upper)
    wh = os.lstat(up / "bin" / "hello")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(up / "app", "trusted.overlay.opaque") == b"y"
    assert (up / "renamed.txt").read_text() == "written in the container\n"
    assert Path(sample.rw, "overlay", "c" * 64, "diff", "renamed.txt").exists()
    # mounting the same layers again shows the container's state
    with overlay(str(tmp_path / "rootfs2"), [upper, *lowers]) as root:
        assert sorted(os.listdir(Path(root, "app"))) == ["fresh"]
        assert not Path(root, "bin", "hello").exists()
    assert Path(sample.share, "overlay", ids.base, "diff", "bin", "hello").exists()


@pytest.mark.parametrize("where", ["shared", "local"])
def test_overlay_lower_files_read_back_identical(graft: GraftMount, sample: Sample, tmp_path: Path,
                                                 where: str) -> None:
    lid = sample.ids.base if where == "shared" else sample.ids.local
    big = os.urandom(3 * 1024 * 1024 + 17)
    tree = sample.share if where == "shared" else sample.rw
    if where == "shared":
        Path(tree, "overlay", lid, "diff", "big.bin").write_bytes(big)
    else:
        Path(graft.path("overlay", lid, "diff", "big.bin")).write_bytes(big)
    with overlay(str(tmp_path / "rootfs"), [graft.path("overlay", lid, "diff"), str(tmp_path)]) as root:
        assert Path(root, "big.bin").read_bytes() == big
