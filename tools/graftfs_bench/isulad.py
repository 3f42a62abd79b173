"""A container's data path in iSulad's layout: its graph on native ext4 against the same image on
a share behind a graftfs isulad mount, side by side in one run.

The share holds an image of two layers in iSulad's layout, the top one with a 512 MiB file; the
native graph is a copy of it on the same disk. On each graph a container's layer is made and
mounted the way iSulad's overlay2 driver does (``overlay/<id>/`` with
``diff``, ``work``, ``merged``, its ``link`` file and ``overlay/l/<link>``, its ``lower`` file;
mount(2) of ``merged`` with ``lowerdir=<graph>/overlay/l/<link>:...`` and
``upperdir``/``workdir`` ``<graph>/overlay/<id>/diff`` and ``work``), and removed as it removes
it. Measured in the container's root (from the host: what a container's process would do, with no
runtime needed): reading the image's 512 MiB file cold and warm, and writing 512 MiB with an
fsync; each measurement in a fresh container layer, the graphs in turn. graftfs is measured with
``direct=1`` (layer directories as links: the container's data bypasses graftfs) and with the
layout's default ``direct=0`` (every file served by graftfs).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from graftfs.linux import MNT_DETACH, umount
from graftfs.share.sample import SampleLayer, digest, short_name, write_image, write_layer
from graftfs_bench.common import (
    FuseMount,
    Timing,
    drop_caches,
    fresh_dir,
    graftfs_mount,
    interleaved,
    mount_status,
    print_section,
    say,
    section_json,
)

BASE = digest("bench-isulad:base")
DATA = digest("bench-isulad:data")
BIG_FILE = "data/big.bin"
BIG_MIB = 512
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
DIRECT = "graftfs direct=1"
#: the graftfs variants: direct=1 (what is measured against native), and the layout's default
VARIANTS = {DIRECT: 1, "graftfs direct=0": 0}
MEASURES: dict[str, tuple[str, bool]] = {
    "read 512 MiB image file (cold)": (f"dd if={{root}}/{BIG_FILE} of=/dev/null bs=1M", True),
    "read 512 MiB image file (warm)": (f"dd if={{root}}/{BIG_FILE} of=/dev/null bs=1M", False),
    "write 512 MiB + fsync": (f"dd if=/dev/zero of={{root}}/written bs=1M count={BIG_MIB} conv=fsync", False),
}


def build_share(share: Path) -> None:
    """The image, written once and reused: a base layer of small files and a layer with the
    512 MiB file (random bytes), in iSulad's layout."""
    stamp = share / ".graftfs-bench-isulad"
    if stamp.exists():
        return
    say("isulad: building the share (an image with a 512 MiB file) ...")
    shutil.rmtree(share, ignore_errors=True)
    share.mkdir(parents=True)
    write_layer(str(share), SampleLayer(BASE, None, {"etc/os-release": b"NAME=bench\n", "bin/true": b"#!/bin/sh\n"}))
    write_layer(str(share), SampleLayer(DATA, BASE, {}))
    big = share / "overlay" / DATA / "diff" / BIG_FILE
    big.parent.mkdir(parents=True)
    subprocess.run(["dd", "if=/dev/urandom", f"of={big}", "bs=1M", f"count={BIG_MIB}"], check=True,
                   capture_output=True, timeout=600)
    write_image(str(share), digest("bench-isulad:image"), DATA, ["bench/isulad:1"])
    stamp.write_text("complete\n")


def copy_graph(share: Path, native: Path) -> None:
    """The native graph: the share's trees copied as they are (a node that pulled the image)."""
    if (native / ".graftfs-bench-isulad").exists():
        return
    partial = native.with_name(native.name + ".partial")
    shutil.rmtree(native, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(["cp", "-a", str(share), str(partial)], check=True, timeout=600)
    partial.rename(native)


class Container:
    """A container's layer on the image's top layer, made, mounted, unmounted and removed with
    the calls of iSulad's overlay2 driver (see the module docstring)."""

    def __init__(self, graph: Path) -> None:
        self.home = graph / "overlay"
        self.id = secrets.token_hex(32)
        self.dir = self.home / self.id
        self.root = self.dir / "merged"

    def create(self) -> None:
        for sub, mode in (("", 0o700), ("diff", 0o755)):
            path = self.dir / sub
            path.mkdir(mode)
            os.chmod(path, mode)
        self.link = secrets.token_hex(13)
        os.symlink(f"../{self.id}/diff", self.home / "l" / self.link)
        self._write(self.dir / "link", self.link, 0o644)
        for sub in ("work", "merged"):
            (self.dir / sub).mkdir(0o700)
            os.chmod(self.dir / sub, 0o700)
        parent_link = (self.home / DATA / "link").read_text()
        parent_lower = (self.home / DATA / "lower").read_text()
        self._write(self.dir / "lower", f"l/{parent_link}:{parent_lower}", 0o666)

    @staticmethod
    def _write(path: Path, text: str, mode: int) -> None:
        """util_atomic_write_file: a temporary file beside it, renamed over it."""
        tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(5)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.rename(tmp, path)

    def mount(self) -> None:
        lowers = [str(self.home / lower) for lower in (self.dir / "lower").read_text().split(":")]
        data = f"lowerdir={':'.join(lowers)},upperdir={self.dir}/diff,workdir={self.dir}/work"
        if len(data) > PAGE_SIZE:
            raise SystemExit(f"{self.home}: the mount options exceed a page; use a shorter --work path")
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", data, str(self.root)], check=True,
                       capture_output=True, timeout=60)

    def remove(self) -> None:
        """umount2(MNT_DETACH) of merged, the l/ link unlinked, the layer removed recursively
        (links unlinked, not followed)."""
        with contextlib.suppress(OSError):
            umount(str(self.root), MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.home / "l" / self.link)
        shutil.rmtree(self.dir)


@contextlib.contextmanager
def container(graph: Path) -> Iterator[Container]:
    c = Container(graph)
    c.create()
    try:
        c.mount()
        yield c
    finally:
        c.remove()


def settle(trash: Path | None) -> None:
    """Wait until a removed container layer is deleted and written out (graftfs deletes the
    node's own layer directories in the background, here): no deletion may run during the next
    measurement."""
    deadline = time.monotonic() + 120
    while trash is not None and trash.exists() and any(trash.iterdir()):
        if time.monotonic() > deadline:
            raise SystemExit(f"{trash} still holds deleted layers after 120 s")
        time.sleep(0.05)
    os.sync()


def measure(graph: Path, trash: Path | None, script: str, cold: bool) -> float:
    """Seconds ``script`` takes in the root of a fresh container on ``graph``."""
    settle(trash)
    with container(graph) as c:
        if cold:
            drop_caches()
        started = time.perf_counter()
        subprocess.run(script.format(root=c.root).split(), check=True, capture_output=True, timeout=600)
        return time.perf_counter() - started


def fuse_counts(mount: FuseMount) -> dict[str, int]:
    """Requests served and bytes through FUSE so far."""
    st = mount_status(mount)
    requests = sum(int(v["count"]) for v in st.get("requests", {}).values())
    return {"requests": requests, "bytes_read": int(st["bytes_read"]), "bytes_written": int(st["bytes_written"])}


def run(work: Path, reps: int) -> dict[str, object]:
    base = work / "isulad"
    share, native = base / "share", base / "native"
    base.mkdir(parents=True, exist_ok=True)
    build_share(share)
    copy_graph(share, native)
    mounts: dict[str, FuseMount] = {}
    rows: dict[str, dict[str, Timing]] = {}
    # each graph, and where graftfs deletes removed layers in the background (settle waits for it)
    graphs: dict[str, tuple[Path, Path | None]] = {"native": (native, None)}
    try:
        for name, direct in VARIANTS.items():
            rw = fresh_dir(base / f"rw-direct{direct}")
            mounts[name] = graftfs_mount(base / f"graph-direct{direct}", rw, [share],
                                         base / f"graftfs-direct{direct}.log", f"direct={direct}", layout="isulad")
            graphs[name] = (mounts[name].mnt, rw / ".graftfs" / "tmp")
        if not (mounts[DIRECT].mnt / "overlay" / DATA / "diff").is_symlink():
            raise SystemExit("the shared layer's diff is not a link on the graftfs graph (direct=1 did not take)")
        for graph, _ in graphs.values():
            if not (graph / "overlay" / "l" / short_name(DATA) / BIG_FILE).is_file():
                raise SystemExit(f"{graph}: the image's {BIG_FILE} is missing")
        before = {name: fuse_counts(m) for name, m in mounts.items()}
        for measure_name, (script, cold) in MEASURES.items():
            say(f"  {measure_name}")
            rows[measure_name] = interleaved({name: functools.partial(measure, graph, trash, script, cold)
                                              for name, (graph, trash) in graphs.items()}, reps)
        through = {name: {key: value - before[name][key] for key, value in fuse_counts(m).items()}
                   for name, m in mounts.items()}
        for _, trash in graphs.values():
            settle(trash)
    finally:
        for m in mounts.values():
            m.close()
    print_section("iSulad's overlay2 way: graph on native ext4 vs on graftfs (isulad layout, empty RW + the "
                  "image on a share)", rows)
    for name, counts in through.items():
        print(f"  {name} during all the runs (containers made, mounted and removed each time): "
              f"{counts['requests']} FUSE requests, {counts['bytes_read']} bytes read and "
              f"{counts['bytes_written']} written through FUSE")
    return {"rows": section_json(rows), "through_graftfs": through}
