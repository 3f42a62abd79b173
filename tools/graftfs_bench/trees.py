"""Walking and reading a graph: `ls -lR`, `find` and a 512 MiB sequential read, cold and warm,
on the backing trees themselves (native), through graftfs, and through mergerfs over the same
trees, in one run.

graftfs is measured twice. With ``direct=0`` every file of every layer is served by
graftfs, like mergerfs serves it: the FUSE path, apples to apples. As podman mounts it
(``direct`` on, the default of the containers-storage layout), a layer's diff/ is a
symlink to its backing directory: `ls -lR` of the graph then lists the runtime's metadata and
not the layers' files, and reading a layer file follows the link to the backing filesystem.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from pathlib import Path

from graftfs.share.sample import SampleLayer, digest, write_image, write_layer
from graftfs_bench.common import (
    FuseMount,
    Timing,
    fresh_dir,
    graftfs_mount,
    mergerfs_mount,
    print_section,
    repeat,
    say,
    section_json,
)

BIG_LAYER = digest("bench:big-layer")
BIG_FILE = "data/big.bin"
BIG_BYTES = 512 << 20


def build_share(share: Path, layers: int, images: int, files_per_layer: int = 1) -> None:
    """LAYERS layers in IMAGES chains (images share nothing), written once and reused."""
    stamp = share / ".graftfs-bench-complete"
    want = f"{layers} {images} {files_per_layer}"
    if stamp.exists() and stamp.read_text() == want:
        return
    shutil.rmtree(share, ignore_errors=True)
    share.mkdir(parents=True)
    (share / ".graftfs-share").write_text("graftfs share v1\n")
    per_image = max(1, layers // images)
    started = time.monotonic()
    for i in range(images):
        parent = None
        for j in range(per_image):
            lid = digest(f"bench:{i}:{j}")
            files = {f"d{k % 3}/f{k}": f"{i} {j} {k}\n".encode() for k in range(files_per_layer)}
            write_layer(str(share), SampleLayer(lid, parent, files))
            parent = lid
        assert parent is not None
        write_image(str(share), digest(f"bench-image:{i}"), parent, [f"bench/{i}:1"])
        if i % 100 == 99:
            say(f"  built {i + 1}/{images} images ({time.monotonic() - started:.0f} s)")
    stamp.write_text(want)


def add_big_layer(share: Path) -> Path:
    """A layer holding one 512 MiB file of random bytes (not sparse, not compressible)."""
    path = share / "overlay" / BIG_LAYER / "diff" / BIG_FILE
    if path.exists() and path.stat().st_size == BIG_BYTES:
        return path
    write_layer(str(share), SampleLayer(BIG_LAYER, None, {"data/.keep": b""}))
    with open(path, "wb") as f:
        for _ in range(BIG_BYTES >> 20):
            f.write(os.urandom(1 << 20))
    write_image(str(share), digest("bench-image:big"), BIG_LAYER, ["bench/big:1"])
    return path


def _walk(argv: list[str]) -> int:
    """Run a tree walk; returns the number of lines it printed (what was walked)."""
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False, timeout=1200)
    return out.stdout.count(b"\n")


def _read(path: Path) -> None:
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=600)


def run(work: Path, layers: int, files_per_layer: int, reps: int) -> dict[str, object]:
    share = work / f"tree-share-{layers}x{files_per_layer}"
    say(f"trees: a share with {layers} layers x {files_per_layer} files and a 512 MiB layer in {share} ...")
    build_share(share, layers, max(1, layers // 10), files_per_layer)
    big = add_big_layer(share)
    rw = fresh_dir(work / "tree-rw")
    (rw / "overlay-layers").mkdir()
    (rw / "overlay-layers" / "layers.json").write_text("[]")
    mounts: dict[str, FuseMount] = {}
    try:
        mounts["graftfs"] = graftfs_mount(work / "tree-graftfs", rw, [share], work / "tree-graftfs.log",
                                          "direct=0")
        mounts["graftfs (podman's view)"] = graftfs_mount(work / "tree-direct", rw, [share],
                                                          work / "tree-direct.log")
        mounts["mergerfs"] = mergerfs_mount(work / "tree-mergerfs", rw, [share], work / "tree-mergerfs.log")
        roots = {"native": [str(rw), str(share)], **{k: [str(m.mnt)] for k, m in mounts.items()}}
        walks: dict[str, dict[str, Timing]] = {}
        counts: dict[str, dict[str, int]] = {}
        for tool, argv in (("ls -lR", ["ls", "-lR"]), ("find", ["find"])):
            for temp in ("cold", "warm"):
                measure = f"{tool} ({temp})"
                walks[measure] = {}
                for variant, dirs in roots.items():
                    say(f"  {measure}: {variant}")
                    counts.setdefault(tool, {})[variant] = _walk([*argv, *dirs])
                    walks[measure][variant] = repeat(functools.partial(_walk, [*argv, *dirs]), reps, temp == "cold")
        reads: dict[str, dict[str, Timing]] = {}
        rel = big.relative_to(share)
        paths = {"native": big, **{k: m.mnt / rel for k, m in mounts.items()}}
        for temp in ("cold", "warm"):
            measure = f"read 512 MiB shared file ({temp})"
            reads[measure] = {}
            for variant, path in paths.items():
                say(f"  {measure}: {variant}")
                reads[measure][variant] = repeat(functools.partial(_read, path), reps, temp == "cold")
        rss = {k: round(m.rss_mb(), 1) for k, m in mounts.items()}
    finally:
        for m in mounts.values():
            m.close()
    print_section(f"tree walks over {layers} layers x {files_per_layer} files (lines walked: {counts})", walks)
    print_section("sequential read of a 512 MiB file in a shared layer", reads)
    return {"layers": layers, "files_per_layer": files_per_layer, "lines_walked": counts,
            "walks": section_json(walks), "reads": section_json(reads), "rss_mb_after": rss}
