"""Propagation: a share change seen through the mount; idle watcher CPU; start time and memory.

A share with LAYERS layers in IMAGES images is mounted; then, SAMPLES times, a new image (one new
layer on an existing one) is published the way a writer does (staged on the share, renamed into
place, image last) while a reader has already cached "no such entry" for it; the time from the
image's rename to the reader's stat succeeding through the mount is measured. Run once with the
share's inotify wake-ups (a local share) and once polling only (what a network share gets).
Then the daemon's CPU time over IDLE seconds of an idle mount, and its start time (warm and with
the page cache dropped) and memory.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import time
from pathlib import Path

from graftfs.share.sample import SampleLayer, digest, publish_sample_image
from graftfs_bench.common import FuseMount, drop_caches, fresh_dir, graftfs_mount, say
from graftfs_bench.trees import build_share


def measure_propagation(m: FuseMount, share: Path, samples: int, tag: str) -> list[float]:
    """Seconds from each image's rename into the share to a successful stat through the mount."""
    base = digest("bench:0:0")
    os.listdir(m.mnt / "overlay-images")  # the reader knows the directory
    out = []
    for k in range(samples):
        lid = digest(f"prop:{tag}:{k}")
        image = digest(f"image:prop/{tag}:{k}")
        target = m.mnt / "overlay-images" / image
        assert not target.exists()  # cached negative entry now
        stage = share / f".graftfs-staging-{tag}-{k}"
        publish_sample_image(str(share), f"prop/{tag}:{k}", [SampleLayer(lid, base, {"x": b"1"})],
                             staging=str(stage) + "-keep")  # staged and renamed, image last
        renamed = time.monotonic()
        deadline = renamed + 10
        while not target.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"image {image[:12]} not visible after 10 s: see {m.log}")
            time.sleep(0.0005)
        out.append(time.monotonic() - renamed)
        shutil.rmtree(str(stage) + "-keep", ignore_errors=True)
        time.sleep(random.uniform(0.05, 1.0))  # never in step with the poll interval
    return out


def cleanup_published(share: Path, tag: str, samples: int) -> None:
    for k in range(samples):
        for managed, eid in (("overlay-images", digest(f"image:prop/{tag}:{k}")),
                             ("overlay-layers", digest(f"prop:{tag}:{k}")), ("overlay", digest(f"prop:{tag}:{k}"))):
            shutil.rmtree(share / managed / eid, ignore_errors=True)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def start_times(work: Path, share: Path, reps: int) -> dict[str, object]:
    """Mount ready time (the mount answers, the catalog loaded) and RSS: warm and cold page
    cache with a new RW tree (every entry checked), and cold with the RW tree of an earlier
    mount (its saved scan: only what changed is checked, graftfs.catalog.scan_cache)."""
    out: dict[str, object] = {}
    for temp in ("warm", "cold", "cold, node mounted before"):
        ready, rss = [], []
        for _ in range(reps):
            rw = work / "start-rw"
            if temp != "cold, node mounted before" or not (rw / ".graftfs" / "scan-cache.json").exists():
                rw = fresh_dir(rw)
            if temp.startswith("cold"):
                drop_caches()
            with graftfs_mount(work / "start-mnt", rw, [share], work / "start.log", layout="isulad") as m:
                ready.append(m.ready_s)
                rss.append(m.rss_mb())
        out[temp] = {"ready_s_min": round(min(ready), 3), "ready_s_median": round(statistics.median(ready), 3),
                     "rss_mb_median": round(statistics.median(rss), 1)}
    return out


def run(work: Path, layers: int, images: int, samples: int, idle: float) -> dict[str, object]:
    share = work / "share"
    say(f"propagation: a share with {layers} layers / {images} images in {share} ...")
    build_share(share, layers, images)
    results: dict[str, object] = {"layers": layers, "images": images, "samples": samples}
    results["start"] = start_times(work, share, 3)
    for variant, options in (("local share, inotify wake-ups", ()), ("polled only (as a network share)",
                                                                      ("share_inotify=0",))):
        tag = "inotify" if not options else "polled"
        say(f"  {variant}")
        cleanup_published(share, tag, samples)
        rw = fresh_dir(work / f"mnt-{tag}-rw")
        with graftfs_mount(work / f"mnt-{tag}", rw, [share], work / f"mnt-{tag}.log", *options,
                           layout="isulad") as m:
            entry: dict[str, object] = {"rss_mb_at_start": round(m.rss_mb(), 1)}
            lat = measure_propagation(m, share, samples, tag)
            entry.update({"p50_ms": round(pct(lat, 0.5) * 1000, 1), "p99_ms": round(pct(lat, 0.99) * 1000, 1),
                          "max_ms": round(max(lat) * 1000, 1), "mean_ms": round(statistics.mean(lat) * 1000, 1)})
            if tag == "inotify":
                time.sleep(3)  # let the last change's hot window pass
                cpu0, t0 = m.cpu_s(), time.monotonic()
                time.sleep(idle)
                entry["idle_cpu_percent"] = round((m.cpu_s() - cpu0) / (time.monotonic() - t0) * 100, 2)
            entry["rss_mb_at_end"] = round(m.rss_mb(), 1)
            results[variant] = entry
        cleanup_published(share, tag, samples)
    print(f"\npropagation: {layers} layers, {images} images, {samples} samples")
    for key, value in results.items():
        if isinstance(value, dict):
            print(f"  {key}:")
            for k, v in value.items():
                print(f"    {k:34} {v}")
    return results
