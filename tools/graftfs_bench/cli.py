"""The command line of tools/bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from graftfs_bench import cluster, isulad, propagation, runtime, trees

USAGE = """tools/bench [all|runtime|trees|propagation|cluster|isulad] [options]

graftfs measured side by side with native ext4 (the runtime on a plain local disk) and mergerfs,
in one run on the same backing data: several repetitions each, min and median, ratios. Prints
tables and writes WORK/bench.json. Needs root, /dev/fuse, podman, mergerfs (tools/install --bench).

  runtime      podman run, in-container 512 MiB read/write, 20,000 small files (native vs graftfs)
  trees        ls -lR / find over a 2,000-layer graph and a 512 MiB read, cold and warm
               (native vs graftfs vs mergerfs)
  propagation  share change -> visible through the mount (p50/p99), idle CPU, mount time, RSS
               with 10,000 layers / 1,000 images
  cluster      three nodes pull one image (--sizes MiB, default 10,100,1024) from a local registry
               and start a container: native podman graphs vs graftfs nodes with publish=auto over
               one share (node 1 pulls and publishes, nodes 2-3 start from the share); seconds,
               registry blobs and bytes, disk per node. Needs docker-registry (tools/install --test).
               Each size --reps times (sizes above 1 GiB once); ~4 min for the default sizes
  isulad       a container's data path in iSulad's layout: a container layer made and mounted as
               iSulad's overlay2 driver does, on a native graph vs on a graftfs isulad mount
               (direct=1, and direct=0) of the same image on a share; 512 MiB read cold/warm, 512 MiB
               write + fsync
  all          runtime, trees and propagation (default; not cluster, which takes long and needs a
               registry, nor isulad: run them on their own)
"""


def main() -> int:
    p = argparse.ArgumentParser(prog="tools/bench", usage=USAGE)
    p.add_argument("what", nargs="?", default="all",
                   choices=["all", "runtime", "trees", "propagation", "cluster", "isulad"])
    p.add_argument("--reps", type=int, default=3, help="repetitions of each measure (podman run: 10x this)")
    p.add_argument("--against", metavar="REV", default=None,
                   help="runtime: also run podman on a graftfs node served by this git revision's code "
                        "(e.g. the commit before a change), interleaved with the others")
    p.add_argument("--work", default="/var/tmp/graftfs-bench", help="where the test data lives (kept for reuse)")
    p.add_argument("--tree-layers", type=int, default=2000)
    p.add_argument("--tree-files", type=int, default=10, help="files per layer in the tree walks")
    p.add_argument("--layers", type=int, default=10_000, help="layers of the propagation share")
    p.add_argument("--images", type=int, default=1_000, help="images of the propagation share")
    p.add_argument("--samples", type=int, default=100, help="propagation samples")
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    p.add_argument("--sizes", default=",".join(map(str, cluster.DEFAULT_SIZES_MIB)),
                   help="cluster: image sizes in MiB, comma separated")
    p.add_argument("--json", default=None, help="write results here (default WORK/bench.json)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("tools/bench: needs root (FUSE mounts, dropping the page cache)", file=sys.stderr)
        return 1
    if args.reps < 1:
        print("tools/bench: --reps must be at least 1", file=sys.stderr)
        return 2
    if args.against is not None and args.what not in ("all", "runtime"):
        print("tools/bench: --against applies to the runtime benchmark only", file=sys.stderr)
        return 2
    sizes = cluster.parse_sizes(args.sizes) if args.what == "cluster" else []
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "reps": args.reps,
                                  "cpus": os.cpu_count(), "kernel": os.uname().release}
    if args.what in ("all", "runtime"):
        results["runtime"] = runtime.run(work, args.reps, args.against)
    if args.what in ("all", "trees"):
        results["trees"] = trees.run(work, args.tree_layers, args.tree_files, args.reps)
    if args.what in ("all", "propagation"):
        results["propagation"] = propagation.run(work, args.layers, args.images, args.samples, args.idle)
    if args.what == "cluster":
        results["cluster"] = cluster.run(work, sizes, args.reps)
    if args.what == "isulad":
        results["isulad"] = isulad.run(work, args.reps)
    out = Path(args.json or work / "bench.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"\n(JSON in {out})")
    return 0
