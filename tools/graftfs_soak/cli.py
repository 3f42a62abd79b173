"""tools/soak: the concurrent runtime load of tests/test_load.py, for as long as asked.

Two graftfs nodes (containers-storage layout, daemons started with `graftfs mount` as an operator
would) over one local share; podman on node A imports, loads, tags, removes, runs and execs in
parallel while node B runs the image A published. Every ``--report`` seconds it prints the
operations done, errors, the maximum latency so far and each daemon's RSS; at the end a summary
per operation, the RSS series, and the residue check (no mount, no process, no temp file left).
Exit status 0 only with zero errors and nothing left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graftfs.node.mounts import read_runtime
from graftfs.share.sample import BUSYBOX, busybox_image_tar
from graftfs_soak.load import Load, Node, Stats, graftfs_cli, rss_kib

REPO = Path(__file__).resolve().parent.parent.parent


def say(text: str) -> None:
    print(text, flush=True)


def _mount(work: Path, name: str, share: str) -> tuple[str, str, int]:
    rw, mnt = work / name / "rw", work / name / "graph"
    rw.mkdir(parents=True)
    mnt.mkdir()
    res = graftfs_cli("mount", "--rw", str(rw), "--ro", share, "--layout", "containers-storage",
                      "--log-file", str(work / f"{name}.log"), str(mnt), timeout=180)
    if res.returncode != 0:
        raise SystemExit(f"graftfs mount of node {name} failed: {res.stderr.strip()}")
    info = read_runtime(str(mnt)) or {}
    pid = info.get("pid")
    if not isinstance(pid, int):
        raise SystemExit(f"no daemon pid recorded for {mnt}")
    return str(rw), str(mnt), pid


def _progress(stats: Stats, elapsed: float, daemons: dict[str, int], rss: list[tuple[float, list[int | None]]]) -> None:
    sample = [rss_kib(pid) for pid in daemons.values()]
    rss.append((elapsed, sample))
    worst = max(stats.max_seconds.values(), default=0.0)
    shown = ", ".join(f"{n} {s / 1024:.1f} MiB" if s is not None else f"{n} gone"
                      for n, s in zip(daemons, sample, strict=True))
    say(f"[{elapsed / 60:5.1f} min] {stats.total} ops, {len(stats.errors)} errors, max latency {worst:.2f} s, "
        f"daemon RSS: {shown}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/soak", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long to run the load (default 10)")
    p.add_argument("--report", type=float, default=30.0, help="seconds between progress lines (default 30)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) at the end")
    p.add_argument("--gluster", action="store_true", help="the share on a GlusterFS replica-3 volume made for the run "
                   "(three bricks on this host, FUSE client) instead of a local directory")
    p.add_argument("--brick-outage", metavar="START:END", default=None,
                   help="with --gluster: kill one brick START minutes after the volume is up, restart it at END")
    args = p.parse_args(argv)
    outage = _outage(args.brick_outage) if args.brick_outage else None
    if outage and not args.gluster:
        raise SystemExit("tools/soak: --brick-outage needs --gluster")
    if os.geteuid() != 0 or not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise SystemExit("tools/soak needs root and /dev/fuse")
    if shutil.which("podman") is None or not os.path.exists(BUSYBOX):
        raise SystemExit("tools/soak needs podman and busybox-static (tools/install --test)")
    sys.path.insert(0, str(REPO / "tests"))
    work = Path(tempfile.mkdtemp(prefix="gfs-soak-", dir="/tmp"))
    with contextlib.ExitStack() as stack:
        if args.gluster:
            from glustershare import gluster_share  # type: ignore[import-not-found]  # tests/glustershare.py

            volume = stack.enter_context(gluster_share(work))
            share = volume.mountpoint
            if outage:
                stack.enter_context(_brick_outage(volume, *outage))
        else:
            share = str(work / "share")
            os.mkdir(share)
        code = _soak(args, work, share)
    if args.gluster and code == 0 and not args.keep:
        shutil.rmtree(work, ignore_errors=True)  # after the volume's teardown, which needs its bricks there
    return code


def _outage(text: str) -> tuple[float, float]:
    start, _, end = text.partition(":")
    try:
        begin, finish = float(start), float(end)
    except ValueError:
        raise SystemExit(f"tools/soak: --brick-outage {text!r} is not START:END in minutes") from None
    if not 0 <= begin < finish:
        raise SystemExit("tools/soak: --brick-outage needs 0 <= START < END")
    return begin, finish


@contextlib.contextmanager
def _brick_outage(volume: Any, start: float, end: float) -> Iterator[None]:
    """Kill one brick ``start`` minutes from now and restart it at ``end`` (a replica lost and
    back), in a thread beside the load; cancelled when the load is over."""
    stop = threading.Event()

    def run() -> None:
        if stop.wait(start * 60):
            return
        say(f"[{start:5.1f} min] killing brick 0 (pid {volume.kill_brick(0)}): two replicas left")
        if stop.wait((end - start) * 60):
            return
        volume.restart_brick()
        say(f"[{end:5.1f} min] brick 0 restarted, the client uses it again")

    thread = threading.Thread(target=run, name="brick-outage", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=120)


def _soak(args: argparse.Namespace, work: Path, share: str) -> int:
    from residue import residue  # type: ignore[import-not-found]  # tests/residue.py, shared with the tests

    where = "a GlusterFS volume" if args.gluster else "a local directory"
    say(f"tools/soak: {args.minutes:g} min of concurrent podman load on two graftfs nodes over {where}; "
        f"work dir {work}")
    mounts: dict[str, tuple[str, str, int]] = {}
    nodes: list[Node] = []
    load: Load | None = None
    stats = Stats()
    rss: list[tuple[float, list[int | None]]] = []
    try:
        for name in ("a", "b"):
            mounts[name] = _mount(work, name, share)
            nodes.append(Node.create(name, mounts[name][1], str(work / name)))
        daemons = {name: m[2] for name, m in mounts.items()}
        load = Load(nodes[0], nodes[1], share, busybox_image_tar(str(work)), str(work), graftfs_cli)
        load.prepare()
        _progress(stats, 0.0, daemons, rss)
        started = time.monotonic()
        running = load
        stats = running.run(args.minutes * 60, lambda t: _progress(running.stats, t, daemons, rss), args.report)
        _progress(stats, time.monotonic() - started, daemons, rss)
    finally:
        if load is not None:
            load.close()
        for rw, mnt, _ in mounts.values():
            trash = Path(rw, ".graftfs", "tmp")
            deadline = time.monotonic() + 60
            while trash.exists() and any(trash.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.2)
            res = graftfs_cli("umount", mnt, timeout=120)
            if res.returncode != 0:
                say(f"graftfs umount {mnt} failed: {res.stderr.strip()}; detaching")
                graftfs_cli("umount", "--lazy", mnt, timeout=120)
    say("\nper operation:\n" + stats.summary())
    say("daemon RSS over time (MiB): " + "; ".join(
        f"{t / 60:.1f} min " + "/".join(f"{s / 1024:.1f}" if s is not None else "-" for s in sample)
        for t, sample in rss))
    # with --gluster the volume (its processes and mount below work/) is torn down after this check
    tops = [str(work / name) for name in mounts] if args.gluster else [str(work)]
    left = residue([*tops, *(n.short for n in nodes)], rw_trees=[m[0] for m in mounts.values()], shares=[share],
                   daemons=[m[2] for m in mounts.values()], mountpoints=[m[1] for m in mounts.values()])
    say(f"operations: {stats.total}, errors: {len(stats.errors)}, max latency: "
        f"{max(stats.max_seconds.values(), default=0.0):.2f} s, left behind: {len(left)}")
    for line in stats.errors[:50] + left:
        say(f"  {line}")
    if args.keep or left:
        say(f"work dir kept: {work}")
    elif not args.gluster:  # with --gluster, removed after the volume's teardown (it needs its bricks)
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not stats.errors and not left else 1
