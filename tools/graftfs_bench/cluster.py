"""Three nodes pulling one image from a registry: graftfs with auto-publish against native podman.

A local registry (graftfs_bench.registry) serves one image per size: busybox plus one layer of
SIZE MiB of random data (nothing compresses away) and a small file, built once on a native graph
and pushed. For each size, side by side:

* native: three plain podman graphs; each pulls the image from the registry and runs
  `podman run --rm IMG cat /hello.txt`;
* graftfs: three graftfs mounts (containers-storage layout, ``-o publish=auto``) over one local
  share, mounted before anything is pulled (a cluster's nodes are up). Node 1 pulls and runs, and
  publishes the image to the share by itself; once the image is listed on nodes 2 and 3, they
  `podman pull` (which then fetches no layer blob) and run.

Measured per node: seconds from the pull's start to the container's output (pull and run apart),
the blobs and bytes the registry served it (its access log), and the disk the image costs it (du
of the native graph, or of the graftfs node's RW tree, before the pull and after the run; the
share's once). For graftfs also: node 1's pull start to the image on the share and listed on node
2, node 1's auto-publish, and node 1's FUSE requests and daemon CPU time during its pull, its run
and until its publish is done (where node 1's time goes).

Nodes pull one after another, the page cache dropped before each, so that each pull's time and
registry traffic are its own (nodes of a real cluster pull at once on their own CPUs and disks,
which two CPUs cannot show). Images up to REPEAT_UP_TO_MIB are measured ``reps`` times, native
and graftfs alternating which goes first; bigger ones once. Everything made here (mounts, the
registry, podman graphs, the share) is removed at the end, also after a failure or Ctrl-C; the
logs stay in WORK/cluster/logs.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from graftfs.cli.status import fetch_status
from graftfs.format.names import IMAGE_RECORD, IMAGES
from graftfs.node.mounts import mount_table
from graftfs_bench.common import FuseMount, Timing, drop_caches, fresh_dir, graftfs_mount, say
from graftfs_bench.registry import (
    REGISTRY_BIN,
    CommandError,
    Image,
    NativePodman,
    Podman,
    Registry,
    build,
    end_processes_naming,
    import_busybox,
    processes_naming,
    push,
)

DEFAULT_SIZES_MIB = (10, 100, 1024)
NODES = ("n1", "n2", "n3")
HELLO = "/hello.txt"
#: Images up to this size are measured ``reps`` times; bigger ones once (their runs last long
#: enough for the machine's drift to matter less, and each costs minutes).
REPEAT_UP_TO_MIB = 1024
#: Bounds on the slow steps; a step past its bound fails the bench (and everything is cleaned up).
PULL_TIMEOUT = 1800.0
BUILD_TIMEOUT = 1800.0
LISTED_TIMEOUT = 900.0
SETTLE_TIMEOUT = 120.0
#: The goals, as ratios: node 1 within 1.3x of a native pull + run; nodes 2..N start a container
#: at least 10x sooner than a native pull + run; a node's disk for a shared image near zero.
GOAL_NODE1_RATIO = 1.3
GOAL_REST_SPEEDUP = 10.0
GOAL_DISK_FRACTION = 0.01
#: Prefix of the short run directories below /tmp (conmon's socket paths must stay short).
SHORT_PREFIX = "gfsbench-"
HEADER = ("\ncluster: 3 nodes pull one image from a local registry and start a container: native podman graphs\n"
          "vs graftfs nodes (publish=auto, one local share; graftfs nodes 2-3 start once node 1's image is listed)")


@dataclass
class BenchImage:
    """One pushed bench image, the token its /hello.txt holds, and its blobs' sizes."""

    size_mib: int
    image: Image
    token: str
    blob_sizes: dict[str, int]

    @property
    def ref(self) -> str:
        return self.image.ref

    @property
    def compressed_bytes(self) -> int:
        return sum(self.blob_sizes.get(d, 0) for d in self.image.layers)


@dataclass
class Pull:
    """One node's `podman pull` and first container, and what the registry served it."""

    started: float  # perf_counter at the pull's start
    pull_s: float
    run_s: float
    blobs: int
    layer_blobs: int
    bytes: int
    layer_bytes: int
    disk_before: int  # bytes the node's graph (graftfs: RW tree) used before the pull
    disk_after: int = 0  # and after the pull and run, once settled

    @property
    def total_s(self) -> float:
        return self.pull_s + self.run_s

    @property
    def disk_bytes(self) -> int:
        """The disk the pulled image costs the node."""
        return self.disk_after - self.disk_before

    def as_dict(self) -> dict[str, object]:
        return {"pull_s": round(self.pull_s, 3), "run_s": round(self.run_s, 3), "total_s": round(self.total_s, 3),
                "blobs": self.blobs, "layer_blobs": self.layer_blobs, "bytes": self.bytes,
                "layer_bytes": self.layer_bytes, "disk_bytes": self.disk_bytes, "disk_before_bytes": self.disk_before,
                "disk_after_bytes": self.disk_after}


class Teardown:
    """Cleanup steps, run last-in first-out, each whatever the others did. SIGINT and SIGTERM are
    ignored meanwhile (every step is bounded in time): a second Ctrl-C must not leave a mount or a
    process behind."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], object]]] = []
        self.problems: list[str] = []

    def add(self, what: str, step: Callable[[], object]) -> None:
        self.steps.append((what, step))

    def run(self) -> list[str]:
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.steps:
                what, step = self.steps.pop()
                try:
                    step()
                except Exception as e:  # one failed step must not keep the others from running
                    self.problems.append(f"cleanup of {what}: {e}")
                    say(f"  cleanup of {what} failed: {e}")
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return self.problems


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the bench as Ctrl-C does (KeyboardInterrupt), so that its cleanup runs."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> float:
    """perf_counter when ``predicate`` first held; SystemExit after ``timeout`` seconds."""
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            raise SystemExit(f"tools/bench cluster: timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.perf_counter()


def du(path: Path) -> int:
    """Bytes of disk ``path`` uses (allocated blocks, one filesystem, hard links once)."""
    res = subprocess.run(["du", "-sxB1", str(path)], capture_output=True, text=True, timeout=600, check=False)
    return int(res.stdout.split()[0]) if res.stdout.strip() else 0


def copy_if_there(src: Path, dst: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.copy2(src, dst)


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


# -- the image -----------------------------------------------------------------------------------


def build_images(data: Path, reg: Registry, sizes: list[int]) -> dict[int, BenchImage]:
    """Build one image per size on a native graph, push it, and remove the graph."""
    builder = NativePodman.native(data / "builder", name="builder", prefix=SHORT_PREFIX)
    try:
        ctx = data / "context"
        import_busybox(builder, ctx)
        out = {}
        for size in sizes:
            say(f"cluster: building and pushing the {size} MiB image ...")
            token = secrets.token_hex(16)
            tag, name = f"localhost/cluster{size}m:1", f"cluster{size}m:1"
            build(builder, ctx, tag, [f"head -c {size << 20} /dev/urandom > /blob && echo {token} > {HELLO}"],
                  timeout=BUILD_TIMEOUT)
            image = push(builder, reg, tag, name, {HELLO: token}, timeout=BUILD_TIMEOUT)
            builder.podman("rmi", tag)  # only the registry needs it now
            out[size] = BenchImage(size, image, token, reg.blob_sizes(name))
        return out
    finally:
        builder.close()
        shutil.rmtree(data / "context", ignore_errors=True)


# -- one node's pull -----------------------------------------------------------------------------


def pull_and_run(podman: Podman, reg: Registry, img: BenchImage, disk: Path,
                 between: Callable[[], object] | None = None) -> Pull:
    """`podman pull` then `podman run --rm IMG cat /hello.txt`, the page cache dropped first;
    ``between`` runs after the pull, outside the timing. ``disk`` is the directory holding what
    the node stores (measured before; the caller measures after, once settled)."""
    disk_before = du(disk)
    mark = reg.mark()
    drop_caches()
    started = time.perf_counter()
    podman.podman("pull", "-q", "--tls-verify=false", img.ref, timeout=PULL_TIMEOUT)
    pulled = time.perf_counter()
    if between is not None:
        between()
    run_started = time.perf_counter()
    out = podman.podman("run", "--rm", img.ref, "cat", HELLO, timeout=PULL_TIMEOUT)
    ran = time.perf_counter()
    if out.strip() != img.token:
        raise SystemExit(f"tools/bench cluster: {podman.name}: a container of {img.ref} shows {out.strip()!r} "
                         f"in {HELLO}, not {img.token!r}")
    fetched = reg.blob_fetches(since=mark)
    layers = set(img.image.layers)
    sizes = [(f.digest, f.size if f.size is not None else img.blob_sizes.get(f.digest, 0)) for f in fetched]
    return Pull(started, pulled - started, ran - run_started, len(sizes), sum(1 for d, _ in sizes if d in layers),
                sum(s for _, s in sizes), sum(s for d, s in sizes if d in layers), disk_before)


# -- native --------------------------------------------------------------------------------------


@dataclass
class NativeTrial:
    nodes: list[Pull]
    problems: list[str]


def trial_native(data: Path, reg: Registry, img: BenchImage) -> NativeTrial:
    """Three native graphs pulling the image one after the other."""
    root = fresh_dir(data / "native")
    td = Teardown()
    pulls = []
    try:
        nodes = []
        for name in NODES:
            p = NativePodman.native(root / name, name=f"native {name}", prefix=SHORT_PREFIX)
            td.add(f"native {name}", p.close)
            p.podman("images", "-q")  # the storage set up (its database, lock files), as on graftfs nodes
            nodes.append(p)
        for name, p in zip(NODES, nodes, strict=True):
            say(f"  native {name}: pull + run")
            pull = pull_and_run(p, reg, img, Path(p.graph))
            pull.disk_after = du(Path(p.graph))
            pulls.append(pull)
    finally:
        problems = td.run()
        problems += sweep(root)
        shutil.rmtree(root, ignore_errors=True)
    return NativeTrial(pulls, problems)


# -- graftfs -------------------------------------------------------------------------------------


@dataclass
class GraftNode:
    """A graftfs mount as podman's graph, and podman pointed at it."""

    name: str
    mount: FuseMount
    podman: Podman
    rw: Path

    def status(self) -> dict[str, object]:
        return fetch_status(str(self.mount.mnt))

    def requests(self) -> dict[str, dict[str, float]]:
        raw = self.status().get("requests", {})
        return raw if isinstance(raw, dict) else {}

    def snapshot(self) -> Snapshot:
        return Snapshot(self.requests(), *daemon_cpu(self.mount.proc.pid))

    def autopublish(self) -> dict[str, object]:
        raw = self.status().get("autopublish", {})
        return raw if isinstance(raw, dict) else {}

    def settle(self) -> None:
        """Wait until layers removed by `podman run --rm` are deleted: graftfs deletes them in
        the background, and neither the deletion nor its writes may be counted as the node's disk."""
        trash = self.rw / ".graftfs" / "tmp"
        wait_until(lambda: not trash.exists() or not any(trash.iterdir()), SETTLE_TIMEOUT,
                   f"{trash} to be emptied", interval=0.1)


@dataclass
class Snapshot:
    """A daemon's request counters (from its status) and CPU seconds at one moment."""

    requests: dict[str, dict[str, float]]
    cpu_s: float  # the daemon's own user + system time
    children_cpu_s: float  # of its reaped children: the auto-publish runs


def daemon_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children's) user + system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def request_delta(before: Snapshot, after: Snapshot) -> dict[str, object]:
    """FUSE requests between two snapshots: their count and handler seconds, per operation (the
    busiest first) and in all; and the daemon's CPU seconds meanwhile (its own, its children's).
    Handler seconds leave out the kernel round trip and pyfuse3's dispatch: the CPU time has them."""
    ops: dict[str, tuple[int, float]] = {}
    for op, now in after.requests.items():
        was = before.requests.get(op, {})
        count = int(now.get("count", 0)) - int(was.get("count", 0))
        seconds = float(now.get("seconds", 0.0)) - float(was.get("seconds", 0.0))
        if count:
            ops[op] = (count, round(seconds, 3))
    busiest = sorted(ops.items(), key=lambda kv: -kv[1][1])
    return {"count": sum(c for c, _ in ops.values()), "seconds": round(sum(s for _, s in ops.values()), 3),
            "daemon_cpu_s": round(after.cpu_s - before.cpu_s, 2),
            "children_cpu_s": round(after.children_cpu_s - before.children_cpu_s, 2),
            "by_op": {op: {"count": c, "seconds": s} for op, (c, s) in busiest}}


def log_problems(log: Path) -> list[str]:
    """What misbehaved, from a graftfs log: its warnings and errors, tracebacks, and libfuse's own
    complaints (lines of its stderr, "fuse: ..."); repeated lines once, with their count."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    counts = collections.Counter(line for line in lines
                                 if " WARNING " in line or " ERROR " in line or line.startswith(("Traceback", "fuse:")))
    return [f"{n} x {line}" if n > 1 else line for line, n in counts.most_common(20)]


@dataclass
class GraftTrial:
    nodes: list[Pull]
    on_share_s: float  # node 1's pull start -> the image on the share
    listed_s: float  # node 1's pull start -> podman on node 2 lists the image
    publish: dict[str, object]  # node 1's auto-publish outcome
    share_disk_bytes: int
    n1_requests: dict[str, dict[str, object]]  # phase -> request_delta
    autopublish: dict[str, dict[str, object]]  # node -> published, failures, gave_up
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"nodes": [p.as_dict() for p in self.nodes], "on_share_s": round(self.on_share_s, 3),
                "listed_on_n2_s": round(self.listed_s, 3), "publish": self.publish,
                "share_disk_bytes": self.share_disk_bytes, "n1_requests": self.n1_requests,
                "autopublish": self.autopublish, "problems": self.problems}


def trial_graftfs(data: Path, logs: Path, reg: Registry, img: BenchImage, tag: str) -> GraftTrial:
    """Three graftfs nodes over one share: node 1 pulls (and publishes), then nodes 2 and 3."""
    root = fresh_dir(data / "graftfs")
    share = fresh_dir(root / "share")
    td = Teardown()
    node_logs = [logs / f"graftfs-{tag}-{name}.log" for name in NODES]
    try:
        nodes: list[GraftNode] = []
        for name, log in zip(NODES, node_logs, strict=True):
            base = fresh_dir(root / name)
            rw = fresh_dir(base / "rw")
            with contextlib.suppress(FileNotFoundError):
                log.unlink()
            mount = graftfs_mount(base / "graph", rw, [share], log, "publish=auto")
            td.add(f"graftfs mount {name}", mount.close)
            podman = Podman.create(base, mount.mnt, name=f"graftfs {name}", prefix=SHORT_PREFIX)
            td.add(f"podman of graftfs {name}", podman.close)
            podman.podman("images", "-q")  # the storage set up (its database, lock files), as a node's is
            nodes.append(GraftNode(name, mount, podman, rw))
        first, rest = nodes[0], nodes[1:]
        snaps = [first.snapshot()]
        say("  graftfs n1: pull + run (publish=auto)")
        pull1 = pull_and_run(first.podman, reg, img, first.rw, between=lambda: snaps.append(first.snapshot()))
        snaps.append(first.snapshot())
        iid = first.podman.image_id(img.ref)
        on_share = wait_until(lambda: (share / IMAGES / iid / IMAGE_RECORD).exists(), LISTED_TIMEOUT,
                              f"node 1's auto-publish of {img.ref} to reach the share")
        wait_until(lambda: (rest[0].mount.mnt / IMAGES / iid).exists(), LISTED_TIMEOUT,
                   f"{img.ref} in node 2's view")
        listed = wait_until(lambda: rest[0].podman.has_image(img.ref), LISTED_TIMEOUT,
                            f"podman on node 2 to list {img.ref}", interval=0.05)
        wait_until(lambda: rest[1].podman.has_image(img.ref), LISTED_TIMEOUT, f"podman on node 3 to list {img.ref}",
                   interval=0.05)
        say(f"  graftfs: on the share {on_share - pull1.started:.1f} s, listed on n2 {listed - pull1.started:.1f} s "
            "after n1's pull started")

        def publish_done() -> bool:
            ap = first.autopublish()
            return ap.get("running") is None and not ap.get("pending")

        wait_until(publish_done, LISTED_TIMEOUT, "node 1's auto-publish to settle", interval=0.2)
        snaps.append(first.snapshot())
        pulls = [pull1]
        for node in rest:
            say(f"  graftfs {node.name}: pull + run")
            pulls.append(pull_and_run(node.podman, reg, img, node.rw))
        for node, pull in zip(nodes, pulls, strict=True):
            node.settle()
            pull.disk_after = du(node.rw)
        recent = first.autopublish().get("recent")
        outcomes = [o for o in recent if isinstance(o, dict) and o.get("id") == iid] if isinstance(recent, list) else []
        outcome = outcomes[-1] if outcomes else {}
        trial = GraftTrial(
            pulls, on_share - pull1.started, listed - pull1.started,
            {k: outcome.get(k) for k in ("result", "seconds", "layers_copied")}, du(share),
            {"pull": request_delta(snaps[0], snaps[1]), "run": request_delta(snaps[1], snaps[2]),
             "until_published": request_delta(snaps[2], snaps[3])},
            {n.name: {k: v for k, v in n.autopublish().items() if k in ("published", "failures", "gave_up")}
             for n in nodes})
    finally:
        problems = td.run()
        problems += sweep(root)
        shutil.rmtree(root, ignore_errors=True)
    trial.problems = problems + [f"{log.name}: {line}" for log in node_logs for line in log_problems(log)]
    return trial


def sweep(top: Path) -> list[str]:
    """After cleanup nothing may remain: end any process naming ``top`` (ours: a daemon, a
    publish child, a conmon) and detach any mount below it; each is reported, as misbehaviour."""
    found = []
    for pid in processes_naming(str(top)):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append(f"process left behind, ended: pid {pid}: {args[:200]}")
    end_processes_naming(str(top), grace=2.0 if found else 0.0)
    for entry in sorted(mount_table(), key=lambda m: -len(m.mountpoint)):
        if entry.mountpoint == str(top) or entry.mountpoint.startswith(f"{top}/"):
            found.append(f"mount left behind, detached: {entry.fstype} at {entry.mountpoint}")
            subprocess.run(["umount", "-l", entry.mountpoint], check=False, timeout=30)
    return found


# -- the figures ---------------------------------------------------------------------------------


def _t(t: Timing) -> str:
    return f"{t.median:.2f} ({t.min:.2f})"


@dataclass
class SizeResult:
    """The trials of one image size: timings over the repetitions (nodes 2 and 3 pooled),
    traffic and disk of the last trial, ratios graftfs/native, and the goals."""

    img: BenchImage
    native: list[NativeTrial]
    graft: list[GraftTrial]
    loads: list[float] = field(default_factory=list)  # 1-minute load average as each trial started

    def rows(self) -> dict[str, dict[str, Timing]]:
        picks: list[tuple[str, Callable[[Pull], float]]] = [
            ("pull + first output", lambda p: p.total_s), ("pull", lambda p: p.pull_s), ("run", lambda p: p.run_s)]
        out: dict[str, dict[str, Timing]] = {}
        for label, which in (("node 1", slice(0, 1)), ("nodes 2-3", slice(1, None))):
            for what, pick in picks:
                out[f"{label}: {what}"] = {
                    "native": Timing([pick(p) for t in self.native for p in t.nodes[which]]),
                    "graftfs": Timing([pick(p) for t in self.graft for p in t.nodes[which]])}
        return out

    def goals(self) -> dict[str, dict[str, object]]:
        rows = self.rows()
        node1 = rows["node 1: pull + first output"]
        others = rows["nodes 2-3: pull + first output"]
        ratio = node1["graftfs"].median / node1["native"].median
        sooner = others["native"].median / others["graftfs"].median
        layer_bytes = max(p.layer_bytes for t in self.graft for p in t.nodes[1:])
        disk = max(p.disk_bytes for p in self.graft[-1].nodes[1:])
        native_disk = min(p.disk_bytes for p in self.native[-1].nodes)
        return {
            "node1_pull_run_within_1.3x_native": {"value": round(ratio, 3), "met": ratio <= GOAL_NODE1_RATIO},
            "nodes2_3_start_10x_sooner_than_native": {"value": round(sooner, 2), "met": sooner >= GOAL_REST_SPEEDUP},
            "nodes2_3_fetch_no_layer_bytes": {"value": layer_bytes, "met": layer_bytes == 0},
            "nodes2_3_disk_near_zero": {"value": disk, "native": native_disk,
                                        "met": native_disk > 0 and disk <= GOAL_DISK_FRACTION * native_disk},
        }

    def as_dict(self) -> dict[str, object]:
        rows = self.rows()
        return {
            "image": {"ref": self.img.ref, "size_mib": self.img.size_mib, "layers": len(self.img.image.layers),
                      "compressed_bytes": self.img.compressed_bytes},
            "timings": {m: {v: t.as_dict() for v, t in variants.items()} for m, variants in rows.items()},
            "ratios_graftfs_to_native": {m: round(v["graftfs"].median / v["native"].median, 3)
                                         for m, v in rows.items() if v["native"].median > 0},
            "graftfs_n1_pull_start_to_on_share_s": Timing([t.on_share_s for t in self.graft]).as_dict(),
            "graftfs_n1_pull_start_to_listed_on_n2_s": Timing([t.listed_s for t in self.graft]).as_dict(),
            "goals": self.goals(),
            "native_runs": [{"nodes": [p.as_dict() for p in t.nodes], "problems": t.problems} for t in self.native],
            "graftfs_runs": [t.as_dict() for t in self.graft],
            "loadavg_1m_at_trial_start": self.loads,
        }

    def print(self) -> None:
        img, rows, goals = self.img, self.rows(), self.goals()
        reps = len(self.graft)
        print(f"\n  image {img.size_mib} MiB ({len(img.image.layers)} layers, {mib(img.compressed_bytes)} MiB "
              f"compressed), {reps} run{'s' if reps > 1 else ''}; seconds: median (min)")
        print(f"    {'measure':38} {'native':>15} {'graftfs':>15} {'graftfs/native':>14}   goal")
        for measure, variants in rows.items():
            n, g = variants["native"], variants["graftfs"]
            ratio = g.median / n.median if n.median > 0 else float("nan")
            note = ""
            if measure == "node 1: pull + first output":
                met = goals["node1_pull_run_within_1.3x_native"]["met"]
                note = f"<= {GOAL_NODE1_RATIO:g}x: {'met' if met else 'NOT met'}"
            elif measure == "nodes 2-3: pull + first output":
                met = goals["nodes2_3_start_10x_sooner_than_native"]["met"]
                note = f"{1 / ratio:.1f}x sooner; >= {GOAL_REST_SPEEDUP:g}x sooner: {'met' if met else 'NOT met'}"
            print(f"    {measure:38} {_t(n):>15} {_t(g):>15} {ratio:14.3f}   {note}")
        last = self.graft[-1]
        on_share = Timing([t.on_share_s for t in self.graft])
        listed = Timing([t.listed_s for t in self.graft])
        pub = last.publish
        secs = pub.get("seconds")
        print(f"    {'n1 pull start -> image on the share':38} {'':>15} {_t(on_share):>15}")
        print(f"    {'n1 pull start -> listed on n2':38} {'':>15} {_t(listed):>15}   auto-publish: "
              f"{pub.get('result')} in {secs if not isinstance(secs, float) else round(secs, 1)} s, "
              f"{pub.get('layers_copied')} layers copied")
        for k, name in enumerate(NODES):
            pn, pg = self.native[-1].nodes[k], last.nodes[k]
            fetched_n, fetched_g = f"{pn.blobs} / {mib(pn.bytes)}", f"{pg.blobs} / {mib(pg.bytes)}"
            note = f"layer MiB: native {mib(pn.layer_bytes)}, graftfs {mib(pg.layer_bytes)}"
            if k:
                note += f"; no layer bytes: {'met' if pg.layer_bytes == 0 else 'NOT met'}"
            print(f"    {name + ': registry blobs / MiB':38} {fetched_n:>15} {fetched_g:>15} {'':14}   {note}")
        for k, name in enumerate(NODES):
            pn, pg = self.native[-1].nodes[k], last.nodes[k]
            ratio = pg.disk_bytes / pn.disk_bytes if pn.disk_bytes else float("nan")
            if k == 0:
                note = "the publishing node keeps its own copy"
            else:
                met = pg.disk_bytes <= GOAL_DISK_FRACTION * pn.disk_bytes
                note = f"near zero (<= {GOAL_DISK_FRACTION:.0%} of native): {'met' if met else 'NOT met'}"
            label = f"{name}: disk MiB for the image"
            print(f"    {label:38} {mib(pn.disk_bytes):>15} {mib(pg.disk_bytes):>15} {ratio:14.4f}   {note}")
        print(f"    {'share: disk MiB':38} {'':>15} {mib(last.share_disk_bytes):>15}")
        print("    n1 FUSE requests, count / handler s / daemon CPU s: " + ", ".join(
            f"{phase} {r['count']} / {r['seconds']} / {r['daemon_cpu_s']}" for phase, r in last.n1_requests.items())
            + f" (publish child CPU {last.n1_requests['until_published']['children_cpu_s']} s)")
        problems = [p for t in self.native for p in t.problems] + [p for t in self.graft for p in t.problems]
        print(f"    load average (1 min) as each trial started: {', '.join(f'{x:.1f}' for x in self.loads)} "
              f"({os.cpu_count()} CPUs; anything else running skews the figures)")
        for p in problems[:20]:
            print(f"    ! {p}")


# -- the bench -----------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    """"10,100,1024" -> [10, 100, 1024] (MiB); SystemExit on anything else."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"tools/bench: --sizes {text!r}: give sizes in MiB, comma separated (10,100,1024)") from None
    if not sizes or any(s < 1 for s in sizes):
        raise SystemExit(f"tools/bench: --sizes {text!r}: give sizes in MiB of at least 1, comma separated")
    return sizes


def run(work: Path, sizes: list[int], reps: int) -> dict[str, object]:
    for tool in (REGISTRY_BIN, "podman", "runc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"tools/bench cluster: {tool} is not installed (tools/install --bench)")
    top = work / "cluster"
    data, logs = top / "data", fresh_dir(top / "logs")
    started = time.monotonic()
    results: list[SizeResult] = []
    td = Teardown()
    build_s = 0.0
    try:
        with sigterm_interrupts():
            fresh_dir(data)
            td.add("the bench's data", lambda: shutil.rmtree(data, ignore_errors=True))
            td.add("the registry's log", lambda: copy_if_there(data / "registry" / "registry.log", logs))
            td.add("what is left below the bench's data", lambda: td.problems.extend(sweep(data)))
            reg = Registry(fresh_dir(data / "registry"))
            td.add("the registry", reg.stop)
            reg.start()
            images = build_images(data, reg, sizes)
            build_s = time.monotonic() - started
            for size in sizes:
                img = images[size]
                n_reps = reps if size <= REPEAT_UP_TO_MIB else 1
                result = SizeResult(img, [], [])
                for rep in range(n_reps):
                    say(f"cluster: {size} MiB image, run {rep + 1} of {n_reps}")
                    for variant in ("native", "graftfs") if rep % 2 == 0 else ("graftfs", "native"):
                        result.loads.append(round(os.getloadavg()[0], 2))
                        if variant == "native":
                            result.native.append(trial_native(data, reg, img))
                        else:
                            result.graft.append(trial_graftfs(data, logs, reg, img, f"{size}m-{rep + 1}"))
                results.append(result)
                if len(results) == 1:
                    print(HEADER)
                results[-1].print()  # now: a later failure leaves the sizes measured so far on screen
    except CommandError as e:
        raise SystemExit(f"tools/bench cluster: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("tools/bench cluster: interrupted (everything it made is removed)") from None
    finally:
        say("cluster: cleaning up ...")
        td.run()
        for p in td.problems:
            say(f"  ! {p}")
    total_s = time.monotonic() - started
    print(f"\n  build + push {build_s:.0f} s; whole bench {total_s:.0f} s; logs in {logs}")
    return {"sizes_mib": sizes, "reps": reps, "reps_up_to_mib": REPEAT_UP_TO_MIB, "build_push_s": round(build_s, 1),
            "total_s": round(total_s, 1), "cleanup_problems": td.problems,
            "per_size": {str(r.img.size_mib): r.as_dict() for r in results}}
