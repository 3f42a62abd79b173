"""graftfs demo: mount an embedded sample and show the merged layout with each entry's origin."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

from graftfs.cli.status import fetch_status, format_status
from graftfs.format.names import ORIGIN_XATTRS
from graftfs.share.sample import build_demo

NAME = "demo"
HELP = "build a sample share and node tree in a temp dir, mount them, show the merged layout, unmount"
SHOWN_DIRS = ("overlay", "overlay/l", "overlay-layers", "overlay-images")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", action="store_true", help="keep the temp dir (the mount is always removed)")


def _origin(path: str) -> str:
    try:
        # trusted.* also answers for symlinks, where the kernel refuses user.* attributes
        return os.getxattr(path, ORIGIN_XATTRS[1], follow_symlinks=False).decode()
    except OSError as e:
        return f"? ({e.strerror})"


def list_with_origins(mountpoint: str, rel: str) -> list[str]:
    """`ls -l`-style lines of one directory of the mount, plus where each entry comes from."""
    lines = [f"{rel}/:"]
    base = os.path.join(mountpoint, rel)
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        st = os.lstat(path)
        shown = name if len(name) < 20 else name[:12] + "…"
        if stat.S_ISLNK(st.st_mode):
            shown += f" -> {os.readlink(path)}"
        lines.append(f"  {stat.filemode(st.st_mode)} {st.st_size:>6}  {shown:<48} {_origin(path)}")
    return lines


def _graftfs(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "graftfs", *argv], capture_output=True, text=True, timeout=120)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0 or not os.access("/dev/fuse", os.R_OK | os.W_OK):
        print("graftfs demo: needs root and /dev/fuse (it mounts a FUSE filesystem)", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="graftfs-demo-")
    share, rw, mnt = (os.path.join(tmp, n) for n in ("share", "rw", "mnt"))
    os.makedirs(mnt)
    ids = build_demo(share, rw)
    print(f"sample in {tmp}: share {share} (2 complete images, 1 half-published layer), node RW {rw}")
    mounted = _graftfs("mount", "--rw", rw, "--ro", share, "--layout", "isulad", mnt)
    if mounted.returncode != 0:
        print(mounted.stderr.strip() or "graftfs demo: mount failed", file=sys.stderr)
        return 1
    try:
        print(f"mounted at {mnt}\n")
        for rel in SHOWN_DIRS:
            print("\n".join(list_with_origins(mnt, rel)))
            print()
        merged = os.path.join(mnt, "overlay", ids.app)
        print(f"overlay/{ids.app[:12]}… merges the shared layer with this node's own dirs: "
              f"{sorted(os.listdir(merged))}")
        print(f"the half-published layer {ids.broken[:12]}… and its image are absent until complete.\n")
        print(format_status(fetch_status(mnt)))
    finally:
        done = _graftfs("umount", mnt)
        if done.returncode != 0:
            print(done.stderr.strip(), file=sys.stderr)
        time.sleep(0.1)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\nunmounted; demo done.")
    return 0 if done.returncode == 0 else 1
