"""The containers-storage layout on real mounts: podman's index files (layers.json,
images.json) merged from the node's own records and the share's per-entry records, and split
back when the runtime rewrites them (temp file renamed over, as containers/storage does)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import GraftMount, Sample, bind_ro, force_unmount, needs_mount, settled_notifications, sh, wait_for
from graftfs.node.mounts import find_mount
from graftfs.share.sample import SampleLayer, chain, digest, publish_sample_image, short_name

pytestmark = needs_mount

MountFactory = Callable[..., GraftMount]


def records(path: str) -> dict[str, dict[str, object]]:
    out = sh("cat", path)
    assert out.returncode == 0, out.stderr
    return {str(r["id"]): r for r in json.loads(out.stdout)}


@pytest.fixture(params=["kernel_opens=auto", "kernel_opens=0"])
def podman_node(request: pytest.FixtureRequest, tmp_path: Path, mount_factory: MountFactory
                ) -> tuple[GraftMount, Sample, dict[str, str]]:
    """A share with two images (per-entry records) and a node whose RW tree podman wrote; once
    with the kernel opening files itself where it can (graftfs.fuse.files), once without."""
    share, rw = tmp_path / "share", tmp_path / "rw"
    share.mkdir()
    (share / ".graftfs-share").write_text("graftfs share v1\n")
    base = chain("cs-base", 2)
    image_a = publish_sample_image(str(share), "cs/a:1", base)
    app = chain("cs-app", 1, parent=base[-1].id)
    image_b = publish_sample_image(str(share), "cs/b:1", app)
    for layer in base + app:
        tar_split = Path(share, "overlay-layers", layer.id, f"{layer.id}.tar-split.gz")
        tar_split.write_bytes(b"tar-split " + layer.id.encode())
    local_layer, local_image = digest("layer:cs-local"), digest("image:cs-local")
    for d in ("overlay-layers", "overlay-images", "overlay/l"):
        (rw / d).mkdir(parents=True)
    (rw / "overlay-layers" / "layers.json").write_text(json.dumps([{"id": local_layer, "parent": base[-1].id}]))
    (rw / "overlay-images" / "images.json").write_text(json.dumps([{"id": local_image, "layer": local_layer}]))
    (rw / "overlay-layers" / "layers.lock").write_bytes(b"\0" * 64)
    share_ro = str(tmp_path / "share-ro")
    bind_ro(str(share), share_ro)
    ids = {"base0": base[0].id, "base1": base[1].id, "app": app[0].id, "image_a": image_a, "image_b": image_b,
           "local_layer": local_layer, "local_image": local_image}
    try:
        g = mount_factory(str(rw), [share_ro], "-o", request.param)  # layout auto: RW holds layers.json
        yield g, Sample(tmp_path, str(share), share_ro, str(rw), None), ids  # type: ignore[arg-type]
        g.stop()  # before the share's bind mount goes (mount_factory stops it again: a no-op)
    finally:
        force_unmount(share_ro)


def test_index_files_merge_node_and_share(podman_node: tuple[GraftMount, Sample, dict[str, str]]) -> None:
    g, _, ids = podman_node
    assert g.status()["layout"] == "containers-storage"
    layers = records(g.path("overlay-layers", "layers.json"))
    assert set(layers) == {ids["base0"], ids["base1"], ids["app"], ids["local_layer"]}
    assert layers[ids["app"]]["parent"] == ids["base1"]  # the share's record as published
    images = records(g.path("overlay-images", "images.json"))
    assert set(images) == {ids["image_a"], ids["image_b"], ids["local_image"]}
    listed = set(os.listdir(g.path("overlay-layers")))
    assert {"layers.json", "layers.lock", f"{ids['app']}.tar-split.gz"} <= listed
    assert ids["app"] not in listed  # the share's per-entry record directories are not shown
    assert Path(g.path("overlay-layers", f"{ids['app']}.tar-split.gz")).read_bytes() == b"tar-split " + ids[
        "app"].encode()
    assert os.path.isdir(g.path("overlay", ids["app"], "diff"))
    size = int(sh("stat", "-c", "%s", g.path("overlay-layers", "layers.json")).stdout)
    assert size == len(Path(g.path("overlay-layers", "layers.json")).read_bytes())


def test_runtime_rewrite_is_split_back(podman_node: tuple[GraftMount, Sample, dict[str, str]]) -> None:
    g, sample, ids = podman_node
    index = g.path("overlay-layers", "layers.json")
    current = json.loads(Path(index).read_text())  # read by the process that rewrites it, as podman does
    new_layer = {"id": digest("layer:cs-new"), "parent": ids["local_layer"]}
    written = [r for r in current if r["id"] != ids["app"]] + [new_layer]  # podman deleted a leaf, added one
    tmp = g.path("overlay-layers", ".tmp-layers.json123")
    Path(tmp).write_text(json.dumps(written, indent=1))  # not the size of the file composed from it
    os.rename(tmp, index)  # what containers/storage's atomic write does
    assert set(records(index)) == {ids["base0"], ids["base1"], ids["local_layer"], new_layer["id"]}
    # the kernel held the renamed file's size under the name: it is told the composed file's
    wait_for(lambda: int(sh("stat", "-c", "%s", index).stdout) == len(sh("cat", index).stdout.encode()), 2,
             "the composed file's size through stat")
    # its top layer is gone here (with the kernel opening files itself: once the kernel is told,
    # a moment after the rename)
    wait_for(lambda: ids["image_b"] not in records(g.path("overlay-images", "images.json")), 2, "image_b hidden")
    own = json.loads(Path(sample.rw, "overlay-layers", "layers.json").read_text())
    assert {r["id"] for r in own} == {ids["local_layer"], new_layer["id"]}  # shared records stay shared
    assert not os.path.exists(os.path.join(sample.rw, "overlay-layers", ".tmp-layers.json123"))
    assert "overlay-layers/" + ids["app"] in g.status()["hidden"]  # type: ignore[operator]
    g.remount()
    assert set(records(index)) == {ids["base0"], ids["base1"], ids["local_layer"], new_layer["id"]}
    assert os.path.isdir(os.path.join(sample.share, "overlay-layers", ids["app"]))  # the share is untouched
    # a record published after this process read the file is not taken as deleted by its rewrite
    late = publish_sample_image(sample.share, "cs/after-read:1", [SampleLayer(digest("layer:cs-after"), ids["base1"],
                                                                             {})])
    before = json.loads(Path(index).read_text())
    wait_for(lambda: late in records(g.path("overlay-images", "images.json")), 2, "the late image")
    Path(tmp).write_text(json.dumps([*before, {"id": digest("layer:cs-new2"), "parent": ids["local_layer"]}]))
    os.rename(tmp, index)
    # (with the kernel opening files itself, the name shows what was written until its new
    # number reaches the kernel, a moment later)
    wait_for(lambda: digest("layer:cs-after") in records(index), 2, "the late layer, not taken as deleted")


def _requests(g: GraftMount, op: str) -> int:
    """How many ``op`` requests the mount has served (graftfs status)."""
    requests = g.status()["requests"]
    return int(requests.get(op, {}).get("count", 0))  # type: ignore[union-attr]


def test_the_kernel_keeps_link_targets(podman_node: tuple[GraftMount, Sample, dict[str, str]]) -> None:
    """Path walks through a layer's links (``l/<short>``, ``<id>/diff``) cost no readlink
    request once the kernel has the target (pyfuse3 rebuilt by tools/build-pyfuse3)."""
    g, sample, ids = podman_node
    if not g.status()["links_cached"]:
        pytest.skip("this pyfuse3 does not ask the kernel to cache links (tools/build-pyfuse3)")
    short = g.path("overlay", "l", short_name(ids["app"]))
    diff = g.path("overlay", ids["app"], "diff")
    first = sh("readlink", short, diff)
    assert first.stdout.split() == [f"../{ids['app']}/diff", os.path.join(sample.share_ro, "overlay", ids["app"],
                                                                           "diff")]
    asked = _requests(g, "readlink")
    for _ in range(5):
        again = sh("sh", "-c", f"readlink {short} {diff}; ls {short}/ {diff}/ > /dev/null")
        assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
    assert _requests(g, "readlink") == asked


def test_a_link_renamed_leads_to_its_new_place(podman_node: tuple[GraftMount, Sample, dict[str, str]]) -> None:
    """A layer directory the node holds itself is shown as a link to its RW directory. Renaming
    it moves that directory: the link keeps its inode number while its target changes, and the
    kernel, which caches link targets in the link's pages, must be told (graftfs re-checks the
    name after the rename)."""
    g, sample, _ = podman_node
    old, new = digest("layer:moved-a"), digest("layer:moved-b")
    os.makedirs(g.path("overlay", old, "diff"))
    # (mkdir is answered with the directory it made, the name shows the link from the next lookup on)
    was = os.path.join(sample.rw, "overlay", old)
    wait_for(lambda: sh("readlink", g.path("overlay", old)).stdout.strip() == was, 2, "the link")
    assert sh("readlink", g.path("overlay", old)).stdout.strip() == was  # (cached by the kernel now)
    os.rename(g.path("overlay", old), g.path("overlay", new))
    want = os.path.join(sample.rw, "overlay", new)
    wait_for(lambda: sh("readlink", g.path("overlay", new)).stdout.strip() == want, 1,
             "the renamed link's new target")
    Path(want, "diff", "f").write_text("moved\n")
    assert sh("cat", g.path("overlay", new, "diff", "f")).stdout == "moved\n"

def _daemon_syncs(trace: Path) -> int:
    """fsync/fdatasync system calls in a ``strace -o`` file of the daemon so far."""
    try:
        return sum("sync(" in line for line in trace.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (tools/install --test)")
def test_staging_copy_is_made_durable_at_its_rename_not_at_its_fsync(
        podman_node: tuple[GraftMount, Sample, dict[str, str]], tmp_path: Path) -> None:
    """containers/storage fsyncs its staging copy of an index file, then renames it over the
    merged one; the split-back rewrites that copy and fsyncs it before the rename returns, so the
    runtime's own fsync costs no disk sync. Seen in the daemon's own system calls; any other file
    is synced when asked."""
    g, sample, ids = podman_node
    trace = tmp_path / "daemon.strace"
    strace = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(trace), "-p",
                               str(g.status()["pid"])], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe = g.path("sync-probe")
        wait_for(lambda: _write_synced(probe, b"x") or _daemon_syncs(trace) > 0, 10, "strace attached")
        index = g.path("overlay-layers", "layers.json")
        new = [*json.loads(Path(index).read_text()), {"id": digest("layer:cs-synced"), "parent": ids["local_layer"]}]
        before = _daemon_syncs(trace)
        staging = g.path("overlay-layers", ".tmp-layers.json456")
        _write_synced(staging, json.dumps(new).encode())
        time.sleep(0.3)  # strace writes each call as it returns
        assert _daemon_syncs(trace) == before, trace.read_text()[-2000:]
        os.rename(staging, index)
        wait_for(lambda: _daemon_syncs(trace) > before, 5, "the split-back's fsync")
        _write_synced(probe, b"y")
        wait_for(lambda: _daemon_syncs(trace) > before + 1, 5, "an ordinary file's fsync")
    finally:
        strace.terminate()
        strace.wait(timeout=10)
    own = json.loads(Path(sample.rw, "overlay-layers", "layers.json").read_text())
    assert digest("layer:cs-synced") in {r["id"] for r in own}


def test_merged_file_is_read_from_the_page_cache_under_a_number_per_content(
        podman_node: tuple[GraftMount, Sample, dict[str, str]]) -> None:
    g, sample, ids = podman_node
    index = g.path("overlay-layers", "layers.json")
    first = Path(index).read_bytes()
    reads = _requests(g, "read")
    for _ in range(3):  # podman loads it several times per command: later loads cost no request
        assert Path(index).read_bytes() == first
    assert _requests(g, "read") == reads
    number = os.stat(index).st_ino
    held = os.open(index, os.O_RDONLY)  # a reader that opened it before the share changed
    try:
        late = publish_sample_image(sample.share, "cs/page-cache:1", [SampleLayer(digest("layer:cs-pc"),
                                                                                 ids["base1"], {})])
        wait_for(lambda: digest("layer:cs-pc") in records(index), 2, "the published layer in layers.json")
        assert os.stat(index).st_ino != number  # another content, another number
        assert os.pread(held, len(first) + 10, 0) == first  # the old content, whole, from the old number
        assert late in records(g.path("overlay-images", "images.json"))
    finally:
        os.close(held)
    # the runtime's rewrite: the name shows the composed file, under a number of its own
    renamed_over = os.stat(index).st_ino
    current = json.loads(Path(index).read_text())
    tmp = g.path("overlay-layers", ".tmp-layers.json-pc")
    Path(tmp).write_text(json.dumps([*current, {"id": digest("layer:cs-pc2"), "parent": ids["local_layer"]}],
                                    indent=2))  # not the composed file's bytes
    written = os.stat(tmp).st_ino
    os.rename(tmp, index)
    wait_for(lambda: os.stat(index).st_ino not in (number, renamed_over, written), 2,
             "a new number for the composed file")
    composed = sh("cat", index).stdout.encode()
    assert digest("layer:cs-pc2") in {r["id"] for r in json.loads(composed)}
    assert os.stat(index).st_size == len(composed) and Path(index).read_bytes() == composed
    reads = _requests(g, "read")
    assert Path(index).read_bytes() == composed
    assert _requests(g, "read") == reads


def test_readers_never_miss_a_merged_file_rewritten_under_them(
        podman_node: tuple[GraftMount, Sample, dict[str, str]]) -> None:
    """Each rewrite gives the name a new number while readers hold the old one from their
    lookups: opens, stats and reads through it must keep answering (as the name it was)."""
    g, _, ids = podman_node
    index = g.path("overlay-layers", "layers.json")
    base = json.loads(Path(index).read_text())
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                with open(index, "rb") as f:
                    st = os.fstat(f.fileno())
                    data = f.read()
                assert ids["local_layer"] in {r["id"] for r in json.loads(data)}
                assert st.st_size > 0
            except Exception as e:
                errors.append(repr(e))

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        tmp = g.path("overlay-layers", ".tmp-layers.json-race")
        for i in range(150):
            extra = [{"id": digest(f"layer:cs-race{j}"), "parent": ids["local_layer"]} for j in range(i % 4)]
            Path(tmp).write_text(json.dumps(base + extra))
            os.rename(tmp, index)
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    assert not errors, errors[:5]
    assert {r["id"] for r in json.loads(Path(index).read_text())} >= {ids["local_layer"], digest("layer:cs-race0")}


def test_changes_behind_the_binds_are_not_told_until_the_view_below_them_is_walked(
        podman_node: tuple[GraftMount, Sample, dict[str, str]]) -> None:
    """podman changes its database and lock files through graftfs' binds all the time: the
    kernel caches nothing of the view below them, so the watcher tells it nothing. Once the view
    below a bound directory is walked (the bind removed), changes behind it are told again."""
    g, sample, _ = podman_node
    libpod, lock = g.path("libpod"), g.path("overlay-layers", "layers.lock")
    wait_for(lambda: find_mount(libpod) is not None and find_mount(lock) is not None, 10, "the daemon's binds")
    notified = settled_notifications(g)
    for i in range(10):
        Path(libpod, "db").write_text(str(i))
        fd = os.open(lock, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes([i]) * 64, 0)  # a new token, as a writer of the store leaves
        finally:
            os.close(fd)
    time.sleep(0.5)  # the events are read within milliseconds
    assert g.status()["watcher"]["kernel_notifications"] == notified  # type: ignore[index]
    subprocess.run(["umount", libpod], check=True, timeout=30)
    assert sh("cat", g.path("libpod", "db")).stdout == "9"  # through the view now: the kernel caches it
    Path(sample.rw, "libpod", "db").write_text("behind")
    wait_for(lambda: sh("cat", g.path("libpod", "db")).stdout == "behind", 2, "a change behind the view")


def test_image_published_while_mounted_shows_in_images_json(
        podman_node: tuple[GraftMount, Sample, dict[str, str]]) -> None:
    g, sample, ids = podman_node
    late = publish_sample_image(sample.share, "cs/late:1", [SampleLayer(digest("layer:cs-late"), ids["app"],
                                                                        {"late": b"1"})])
    wait_for(lambda: late in records(g.path("overlay-images", "images.json")), 2, "the late image in images.json")
    assert digest("layer:cs-late") in records(g.path("overlay-layers", "layers.json"))


def read_token(path: str) -> bytes:
    fd = os.open(path, os.O_RDWR)  # as containers/storage opens its lock files
    try:
        return os.pread(fd, 64, 0)
    finally:
        os.close(fd)


def test_lock_token_changes_with_the_share(podman_node: tuple[GraftMount, Sample, dict[str, str]]) -> None:
    """Long-running clients reload the index files when the token in a lock file changes: graftfs
    writes a new one when the share changes, under the lock, as a writer would."""
    g, sample, ids = podman_node
    lock = g.path("overlay-layers", "layers.lock")
    backing = Path(sample.rw, "overlay-layers", "layers.lock")
    # the lock files are the RW files themselves, bind-mounted over the view (graftfs.node.binds), each
    # with a token from the start (layers.lock held zeros, images.lock did not exist)
    images_lock = g.path("overlay-images", "images.lock")
    wait_for(lambda: find_mount(lock) is not None and find_mount(images_lock) is not None, 5, "the binds")
    assert os.stat(lock).st_ino == backing.stat().st_ino
    assert read_token(lock) == backing.read_bytes() and len(backing.read_bytes()) == 64
    assert backing.read_bytes() != b"\0" * 64 and len(read_token(images_lock)) == 64
    first = read_token(lock)
    assert read_token(lock) == first  # stable while nothing changes
    # the share changes while a client holds the lock: the new token waits for the lock
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(backing)], stdout=subprocess.PIPE,
                              stdin=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        layer = digest("layer:cs-token")
        publish_sample_image(sample.share, "cs/token:1", [SampleLayer(layer, ids["app"], {})])
        wait_for(lambda: layer in records(g.path("overlay-layers", "layers.json")), 2, "the layer in layers.json")
        time.sleep(0.3)
        assert read_token(lock) == first  # not written beside the lock holder
    finally:
        holder.communicate(b"\n", timeout=10)
    wait_for(lambda: read_token(lock) != first, 2, "the lock token to change after the lock was released")
    assert len(read_token(lock)) == 64 and read_token(lock) == backing.read_bytes()


def test_lock_file_created_through_the_mount_has_a_token(tmp_path: Path, mount_factory: MountFactory) -> None:
    """Without binds (direct=0), a lock file the runtime creates gets a token at once:
    containers/storage 1.43 reloads on every lock while a lock file is shorter than a token."""
    share, rw = tmp_path / "share", tmp_path / "rw"
    share.mkdir()
    (share / ".graftfs-share").write_text("graftfs share v1\n")
    (rw / "overlay-layers").mkdir(parents=True)
    (rw / "overlay-layers" / "layers.json").write_text("[]")
    g = mount_factory(str(rw), [str(share)], "-o", "direct=0")
    lock = g.path("overlay-layers", "layers.lock")
    os.close(os.open(lock, os.O_RDWR | os.O_CREAT, 0o644))
    assert len(read_token(lock)) == 64 and find_mount(lock) is None
    assert read_token(lock) == (rw / "overlay-layers" / "layers.lock").read_bytes()


#: A client holding a lock file's write lock until told to let go (as containers/storage locks).
HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


def test_a_name_belongs_to_the_newest_image(podman_node: tuple[GraftMount, Sample, dict[str, str]]) -> None:
    from graftfs.share.sample import write_image

    g, sample, ids = podman_node
    old, new = digest("image:dup-old"), digest("image:dup-new")
    for iid, created in ((old, "2026-11-01T00:00:00Z"), (new, "2026-11-20T00:00:00Z")):
        record = {"id": iid, "layer": ids["app"], "names": ["localhost/dup:1", f"localhost/{iid[:8]}:1"],
                  "created": created}
        write_image(sample.share, iid, ids["app"], [], record=json.dumps(record).encode())
    wait_for(lambda: {old, new} <= set(records(g.path("overlay-images", "images.json"))), 2, "both images")
    images = records(g.path("overlay-images", "images.json"))
    assert images[new]["names"] == ["localhost/dup:1", f"localhost/{new[:8]}:1"]
    assert images[old]["names"] == [f"localhost/{old[:8]}:1"]  # the re-published tag moved to the new image
    stored = json.loads(Path(sample.share, "overlay-images", old, "images.json").read_text())
    assert "localhost/dup:1" in stored["names"]  # on disk, nothing was rewritten
