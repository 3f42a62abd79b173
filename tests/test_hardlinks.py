"""Hard links through the view: the names of one file report one inode number and its link count,
as on the backing filesystem (tar, rsync -H, du and container storage checks compare st_ino)."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import GraftMount, Sample, needs_mount, sh

pytestmark = [needs_mount]


def _ino_nlink(*paths: str) -> list[tuple[int, int]]:
    return [(os.stat(p).st_ino, os.stat(p).st_nlink) for p in paths]


def test_names_of_one_file_share_an_inode(graft: GraftMount, sample: Sample) -> None:
    # made behind the mount, in the node's tree and in the share
    Path(sample.rw, "data").mkdir()
    Path(sample.rw, "data", "a").write_text("rw file\n")
    os.link(os.path.join(sample.rw, "data", "a"), os.path.join(sample.rw, "data", "b"))
    os.link(os.path.join(sample.rw, "data", "a"), os.path.join(sample.rw, "c"))
    shared_dir = os.path.join(sample.share, "overlay", sample.ids.base, "diff")
    Path(shared_dir, "one").write_text("shared file\n")
    os.link(os.path.join(shared_dir, "one"), os.path.join(shared_dir, "two"))
    rw_a, rw_b, rw_c = graft.path("data", "a"), graft.path("data", "b"), graft.path("c")
    seen = _ino_nlink(rw_a, rw_b, rw_c)
    assert len({ino for ino, _ in seen}) == 1 and {n for _, n in seen} == {3}, seen
    shared = graft.path("overlay", sample.ids.base, "diff")
    sh1, sh2 = os.path.join(shared, "one"), os.path.join(shared, "two")
    seen = _ino_nlink(sh1, sh2)
    assert seen[0] == seen[1] and seen[0][1] == 2 and seen[0][0] != _ino_nlink(rw_a)[0][0], seen
    # tools that compare inode numbers see one file (du counts it once)
    du = sh("du", "-s", "--block-size=1", graft.path("data")).stdout.split()[0]
    du_apparent = sh("du", "-s", "-b", "-l", graft.path("data")).stdout.split()[0]  # -l: count every name
    assert int(du_apparent) > int(sh("du", "-s", "-b", graft.path("data")).stdout.split()[0]) and int(du) > 0
    # a link made through the mount is the same file too
    os.link(rw_a, graft.path("d"))
    assert _ino_nlink(graft.path("d"))[0] == (_ino_nlink(rw_a)[0][0], 4)
    # a name removed: the others remain the file, under the same number, one link fewer
    first = _ino_nlink(rw_b)[0][0]
    os.unlink(rw_a)
    assert Path(rw_b).read_text() == "rw file\n" and _ino_nlink(rw_b, rw_c) == [(first, 3), (first, 3)]
    os.rename(rw_c, graft.path("data", "e"))
    assert _ino_nlink(graft.path("data", "e")) == [(first, 3)]
    assert Path(graft.path("data", "e")).read_text() == "rw file\n"
    for name in ("data/b", "data/e", "d"):
        os.unlink(graft.path(*name.split("/")))
    assert not os.listdir(graft.path("data"))
