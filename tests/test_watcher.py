"""The watcher on real mounts: changes in the share and in the RW tree reach every reader through
the kernel's long caches, quickly, exactly, and without ever reading an unreachable share as
"everything was deleted". Readers are separate processes (stat, ls, cat), so what they see is
what the kernel caches, not what graftfs would answer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import GraftMount, Sample, needs_mount, settled_notifications, sh, wait_for
from graftfs.linux import umount
from graftfs.share.sample import chain, digest, publish_sample_image, short_name

pytestmark = needs_mount

MountFactory = Callable[..., GraftMount]
#: The issue's promise is "within a second"; the share here is local (inotify wakes the poller),
#: so this bound has room for a loaded CI machine without hiding a watcher that does nothing.
FRESH = 1.0


def visible(path: str) -> bool:
    """Does a separate process see ``path`` (through the kernel's cache)?"""
    return sh("stat", "-c", "%i", path, timeout=10).returncode == 0


def listing(path: str) -> set[str]:
    out = sh("ls", "-a", path, timeout=10)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split()) - {".", ".."}


def seen_within(predicate: Callable[[], bool], seconds: float, what: str) -> float:
    start = time.monotonic()
    wait_for(predicate, seconds, what)
    return time.monotonic() - start


def test_kernel_caches_are_long(graft: GraftMount) -> None:
    st = graft.status()
    assert st["cache_timeout"] >= 60  # warm lookups never reach Python
    watcher = st["watcher"]
    assert isinstance(watcher, dict) and watcher["poll_interval"] == 0.5 and watcher["failures"] == 0
    assert watcher["local_shared_trees"] and watcher["inotify_watches"] >= 1


def test_published_image_appears_and_negative_lookup_turns_positive(graft: GraftMount, sample: Sample) -> None:
    image_id = digest("image:late/app:1")
    target = graft.path("overlay-images", image_id, "images.json")
    assert not visible(target)  # the kernel now holds a negative entry for the image
    assert not visible(graft.path("overlay-images", image_id))
    before = listing(graft.path("overlay-images"))
    layers = chain("late", 3, parent=sample.ids.base)
    assert publish_sample_image(sample.share, "late/app:1", layers) == image_id
    took = seen_within(lambda: visible(target), FRESH, "the published image through stat")
    assert listing(graft.path("overlay-images")) == before | {image_id}
    assert {la.id for la in layers} <= listing(graft.path("overlay-layers"))
    assert os.readlink(graft.path("overlay", "l", short_name(layers[-1].id))) == f"../{layers[-1].id}/diff"
    record = json.loads(sh("cat", target).stdout)
    assert record["layer"] == layers[-1].id
    st = graft.status()["watcher"]
    assert st["last_change"]["source"] == "share" and st["changes_applied"] >= 1  # type: ignore[index]
    assert st["last_change"]["latency_ms"] < FRESH * 1000  # type: ignore[index]
    print(f"visible after {took * 1000:.0f} ms")


def test_removed_layer_makes_its_image_vanish(graft: GraftMount, sample: Sample) -> None:
    ids = sample.ids
    image_dir = graft.path("overlay-images", ids.image_web)
    assert visible(os.path.join(image_dir, "images.json"))  # cached positive entries
    assert ids.image_web in listing(graft.path("overlay-images"))
    # the layer record is moved out of the share (as a gc would): the image loses its chain
    os.rename(os.path.join(sample.share, "overlay-layers", ids.web), os.path.join(sample.share, ".graftfs-trash"))
    seen_within(lambda: not visible(image_dir), FRESH, "the image to vanish")
    assert ids.image_web not in listing(graft.path("overlay-images"))
    assert ids.web not in listing(graft.path("overlay-layers"))
    assert not visible(graft.path("overlay", "l", short_name(ids.web)))
    assert ids.image_app in listing(graft.path("overlay-images"))  # the other image is untouched
    reasons = {s["id"]: s["reason"] for s in graft.status()["skipped"]}  # type: ignore[attr-defined]
    assert "is not visible" in reasons[ids.image_web]
    # and back: the layer returns, so does the image
    os.rename(os.path.join(sample.share, ".graftfs-trash"), os.path.join(sample.share, "overlay-layers", ids.web))
    seen_within(lambda: visible(image_dir), FRESH, "the image to come back")


def test_incomplete_layer_shows_once_its_link_is_written(graft: GraftMount, sample: Sample) -> None:
    ids = sample.ids
    assert not visible(graft.path("overlay-images", ids.image_broken))
    Path(sample.share, "overlay", ids.broken, "link").write_text(short_name(ids.broken))
    seen_within(lambda: visible(graft.path("overlay-images", ids.image_broken)), FRESH, "the completed image")
    assert sh("cat", graft.path("overlay", "l", short_name(ids.broken), "half", "written")).stdout == "x"


def test_polled_share_without_inotify(sample: Sample, mount_factory: MountFactory) -> None:
    """What a network share gets: no inotify wake-ups, only polls (here every 0.2 s)."""
    graft = mount_factory(sample.rw, [sample.share_ro], "-o", "share_inotify=0,poll=0.2")
    assert graft.status()["watcher"]["local_shared_trees"] == []  # type: ignore[index]
    image_id = digest("image:polled:1")
    assert not visible(graft.path("overlay-images", image_id))
    publish_sample_image(sample.share, "polled:1", chain("polled", 2, parent=sample.ids.base))
    seen_within(lambda: visible(graft.path("overlay-images", image_id)), 0.2 + FRESH, "the polled image")
    shutil.rmtree(os.path.join(sample.share, "overlay-images", image_id))
    seen_within(lambda: not visible(graft.path("overlay-images", image_id)), 0.2 + FRESH, "its removal")


def test_record_rewritten_in_share_is_seen_by_cat_and_stat(graft: GraftMount, sample: Sample) -> None:
    rel = ("overlay-images", sample.ids.image_app, "images.json")
    on_mount, in_share = graft.path(*rel), os.path.join(sample.share, *rel)
    assert sh("cat", on_mount).stdout == Path(in_share).read_text()  # pages and attributes now cached
    assert sh("stat", "-c", "%s", on_mount).stdout.strip() == str(os.path.getsize(in_share))
    # rewritten in place (same inode), longer
    record = json.loads(Path(in_share).read_text())
    record["names"] = ["demo/app:1", "demo/app:latest", "registry.example/demo/app:1"]
    Path(in_share).write_text(json.dumps(record))
    new = Path(in_share).read_text()
    seen_within(lambda: sh("cat", on_mount).stdout == new, FRESH, "the new content through cat")
    assert sh("stat", "-c", "%s", on_mount).stdout.strip() == str(len(new))
    # replaced by rename (a new inode), shorter
    tmp = in_share + ".tmp"
    Path(tmp).write_text(json.dumps({**record, "names": ["x"]}))
    os.rename(tmp, in_share)
    newer = Path(in_share).read_text()
    seen_within(lambda: sh("cat", on_mount).stdout == newer, FRESH, "the replaced record through cat")
    assert sh("stat", "-c", "%s", on_mount).stdout.strip() == str(len(newer))


def _polls(graft: GraftMount) -> int:
    return int(graft.status()["ro"][0]["polls"])  # type: ignore[index]


def test_a_record_caught_mid_rewrite_never_hides_its_image(graft: GraftMount, sample: Sample) -> None:
    """A poll that finds a shared record half rewritten in place keeps its image in the view, as
    it last checked good, until the next poll: a reader on the mount never sees it vanish."""
    rel = ("overlay-images", sample.ids.image_app, "images.json")
    record, target = Path(sample.share, *rel), graft.path(*rel)
    good = json.loads(record.read_text())
    assert visible(target)
    vanished: list[float] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            if not os.path.exists(target):
                vanished.append(time.monotonic())
            time.sleep(0.005)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with open(record, "r+") as f:
            f.truncate(0)
            f.write('{"id": "')  # the writer is slow: a poll finds the record like this
        polls = _polls(graft)
        wait_for(lambda: _polls(graft) > polls, 3, "a poll of the half-written record")
        time.sleep(0.1)  # (a poll takes milliseconds here)
        record.write_text(json.dumps({**good, "names": ["demo/app:2"]}))
        seen_within(lambda: "demo/app:2" in sh("cat", target).stdout, FRESH, "the rewritten record")
    finally:
        done.set()
        thread.join(timeout=10)
    assert not vanished, f"the image vanished from the view {len(vanished)} times"


def test_rw_changes_behind_the_mount_are_seen(graft: GraftMount, sample: Sample) -> None:
    name = graft.path("notes.txt")
    assert not visible(name)  # negative entry cached
    Path(sample.rw, "notes.txt").write_text("one\n")
    seen_within(lambda: visible(name), FRESH, "a file created in the RW tree")
    assert sh("cat", name).stdout == "one\n"
    Path(sample.rw, "notes.txt").write_text("one\ntwo\n")
    seen_within(lambda: sh("cat", name).stdout == "one\ntwo\n", FRESH, "the file's new content")
    # a directory made behind the mount, with a file written before graftfs could watch it
    assert not visible(graft.path("made"))
    os.makedirs(os.path.join(sample.rw, "made", "later"))
    Path(sample.rw, "made", "later", "f").write_text("f\n")
    seen_within(lambda: sh("cat", graft.path("made", "later", "f")).stdout == "f\n", FRESH, "a new subtree")
    # mkdir -p below shared directories the kernel already caches, down to a cached negative name
    deep = ("overlay", sample.ids.base, "diff", "etc", "newdir", "newfile")
    assert visible(graft.path(*deep[:4])) and not visible(graft.path(*deep))
    assert not visible(graft.path(*deep[:5]))
    os.makedirs(os.path.join(sample.rw, *deep[:5]))
    Path(sample.rw, *deep).write_text("deep\n")
    seen_within(lambda: sh("cat", graft.path(*deep)).stdout == "deep\n", FRESH, "a file below a new RW path")
    os.unlink(os.path.join(sample.rw, "notes.txt"))
    seen_within(lambda: not visible(name), FRESH, "the removed file to vanish")
    # an RW file shadowing a shared one is removed behind the mount: the shared one shows again
    shared = ("overlay", sample.ids.base, "diff", "etc", "os-release")
    assert sh("cat", graft.path(*shared)).stdout == "NAME=demo\n"  # cached: the shared file
    Path(sample.rw, *shared).write_text("NAME=local\n")
    seen_within(lambda: sh("cat", graft.path(*shared)).stdout == "NAME=local\n", FRESH, "the RW copy")
    os.unlink(os.path.join(sample.rw, *shared))
    seen_within(lambda: sh("cat", graft.path(*shared)).stdout == "NAME=demo\n", FRESH, "the shared file again")


def test_changes_through_the_mount_are_not_told_back_to_the_kernel(graft: GraftMount, sample: Sample) -> None:
    """The RW tree's inotify events for what requests through the mount did are theirs: the
    kernel made those changes and knows their outcome, so the watcher tells it nothing (it did,
    several times per container start). A change behind the mount afterwards is still seen."""
    notified = settled_notifications(graft)
    work = graft.path("work")
    script = f"""set -e
        mkdir {work} {work}/sub
        for i in $(seq 20); do echo $i > {work}/f$i; echo more >> {work}/f$i; done
        for i in $(seq 10); do mv {work}/f$i {work}/sub/g$i; chmod 600 {work}/sub/g$i; done
        truncate -s 1 {work}/f11
        rm {work}/f12 {work}/sub/g1
        ln -s f13 {work}/link"""
    out = sh("sh", "-c", textwrap.dedent(script))
    assert out.returncode == 0, out.stderr
    time.sleep(0.5)  # the events are read within milliseconds
    assert graft.status()["watcher"]["kernel_notifications"] == notified  # type: ignore[index]
    assert sh("cat", graft.path("work", "f11")).stdout == "1"
    time.sleep(1.0)  # past InodeTable's OWN_CHANGE_SECONDS: now a change of these names is someone else's
    Path(sample.rw, "work", "sub", "g2").write_text("changed behind\n")
    seen_within(lambda: sh("cat", graft.path("work", "sub", "g2")).stdout == "changed behind\n", FRESH,
                "a change behind the mount to a name changed through it before")
    Path(sample.rw, "work", "f14").unlink()
    seen_within(lambda: not visible(graft.path("work", "f14")), FRESH, "a removal behind the mount")


def test_unavailable_share_keeps_the_view(graft: GraftMount, sample: Sample) -> None:
    images = listing(graft.path("overlay-images"))
    layers = listing(graft.path("overlay-layers"))
    marker = os.path.join(sample.share, ".graftfs-share")
    # 1. the marker file vanishes (a half-mounted or damaged share): nothing is read as deleted
    os.rename(marker, marker + ".away")
    shutil.rmtree(os.path.join(sample.share, "overlay-images", sample.ids.image_web))
    wait_for(lambda: _unavailable(graft), 3, "status to report the share unavailable")
    assert listing(graft.path("overlay-images")) == images
    assert visible(graft.path("overlay-images", sample.ids.image_web))
    reason = _tree(graft)["unavailable_reason"]
    assert ".graftfs-share" in reason, reason  # type: ignore[operator]
    human = subprocess.run([sys.executable, "-m", "graftfs", "status", graft.mnt], capture_output=True, text=True,
                           timeout=30)
    assert "UNAVAILABLE since" in human.stdout, human.stdout
    # marker back: the view catches up with what really changed meanwhile
    os.rename(marker + ".away", marker)
    seen_within(lambda: not visible(graft.path("overlay-images", sample.ids.image_web)), 3, "the catch-up")
    assert not _unavailable(graft)
    images.discard(sample.ids.image_web)
    # 2. the share's mountpoint shows an empty directory (NFS not mounted): same view, EIO inside
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "empty", sample.share_ro], check=True, timeout=30)
    try:
        wait_for(lambda: _unavailable(graft), 3, "status to report the emptied share")
        assert listing(graft.path("overlay-images")) == images
        assert listing(graft.path("overlay-layers")) == layers
        assert visible(graft.path("overlay-images", sample.ids.image_app))
        unseen = sh("cat", graft.path("overlay", sample.ids.app, "diff", "app", "data.txt"))
        assert unseen.returncode != 0 and "Input/output error" in unseen.stderr, unseen
    finally:
        umount(sample.share_ro)  # only the tmpfs: the read-only bind of the share is under it
    seen_within(lambda: not _unavailable(graft), 3, "the share to be available again")
    assert sh("cat", graft.path("overlay", sample.ids.app, "diff", "app", "data.txt")).stdout == "application data\n"
    assert listing(graft.path("overlay-images")) == images


def _tree(g: GraftMount) -> dict[str, object]:
    ro = g.status()["ro"]
    assert isinstance(ro, list)
    return ro[0]  # type: ignore[no-any-return]


def _unavailable(g: GraftMount) -> bool:
    return not _tree(g)["available"]


CHURN_READER = textwrap.dedent("""
    import errno, json, os, sys, time
    mnt, names, seconds = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
    images = os.path.join(mnt, "overlay-images")
    ok = absent = 0
    errors = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        os.listdir(images)
        for name in names:
            try:
                os.stat(os.path.join(images, name))
                with open(os.path.join(images, name, "images.json"), "rb") as f:
                    json.loads(f.read())
                ok += 1
            except OSError as e:
                if e.errno != errno.ENOENT:
                    errors.append(f"{name}: {e}")
                absent += 1
            except ValueError as e:
                errors.append(f"{name}: torn record {e}")
    print(json.dumps({"ok": ok, "absent": absent, "errors": errors[:20], "error_count": len(errors)}))
""")


def test_churn_of_1000_entries_with_a_reader(graft: GraftMount, sample: Sample, tmp_path: Path) -> None:
    base = sample.ids.base
    names = []
    parked = tmp_path / "share" / ".graftfs-parked"
    parked.mkdir()
    for i in range(1000):
        names.append(_publish_small(sample.share, i, base))
    reader = subprocess.Popen(
        ["timeout", "-k", "2", "60", sys.executable, "-c", CHURN_READER, graft.mnt, json.dumps(names[:200]), "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    images = os.path.join(sample.share, "overlay-images")
    moves = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for name in names[moves % 2 :: 2][:250]:  # 250 out, then 250 back, alternating halves
            src, dst = os.path.join(images, name), str(parked / name)
            if os.path.exists(src):
                os.rename(src, dst)
            else:
                os.rename(dst, src)
        moves += 1
        time.sleep(0.2)
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    result = json.loads(out)
    assert result["error_count"] == 0, result
    assert result["ok"] > 0 and result["absent"] > 0, result
    # the churn stops: the view settles on exactly what the share holds
    in_share = set(os.listdir(images)) - {sample.ids.image_broken}  # incomplete: never shown
    seen_within(lambda: listing(graft.path("overlay-images")) == in_share, FRESH, "the settled listing")
    for name in names[:200]:
        assert visible(graft.path("overlay-images", name)) == (name in in_share), name
    assert graft.proc is not None and graft.proc.poll() is None
    print(f"{moves} rounds of 250 renames; reader: {result}; watcher: {graft.status()['watcher']}")


def _publish_small(share: str, i: int, base: str) -> str:
    """An image on the share's base layer (no new layers): just an image record to move around."""
    from graftfs.share.sample import write_image

    image_id = digest(f"image:churn/{i}")
    write_image(share, image_id, base, [f"churn/{i}:1"])
    return image_id
