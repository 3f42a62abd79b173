"""Concurrent podman load on two graftfs nodes sharing one share — the seed test report's
"concurrent pull/load/rmi/run/exec" category, with real podman.

Node A imports, loads, removes, runs and execs in parallel workers; node B runs the image A
published to the share. Every operation is timed and checked (exit status and, where there is
one, its output); an operation that fails is an error with its stderr kept. Each worker works on
names of its own (its own tags), so that no error comes from two workers racing for the same
tag — only from the runtime or graftfs failing.

podman is set up as tests/test_podman.py does (DESIGN.md section 5): private storage.conf and
containers.conf, runc, no network, default_ulimits, the run root under /tmp/gfs-* (conmon's
socket paths must stay short), output to files (a pipe makes podman 4.3 wait ~20 s for conmon).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: The image every worker uses: A imports it, publishes it, B runs it from the share.
BASE = "localhost/soak-base:1"
EXEC_CONTAINER = "soak-exec"


@dataclass
class Result:
    code: int
    out: str
    err: str
    seconds: float


@dataclass
class Node:
    """podman pointed at one graftfs graph, with its own configuration and run root."""

    name: str
    graph: str
    env: dict[str, str]
    short: str  # /tmp/gfs-*: run root and tmp dir

    @classmethod
    def create(cls, name: str, graph: str, confdir: str) -> Node:
        short = tempfile.mkdtemp(prefix="gfs-", dir="/tmp")
        run, tmp = os.path.join(short, "run"), os.path.join(short, "tmp")
        os.makedirs(run)
        os.makedirs(tmp)
        os.makedirs(confdir, exist_ok=True)
        storage, containers = os.path.join(confdir, "storage.conf"), os.path.join(confdir, "containers.conf")
        Path(storage).write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{graph}"\nrunroot = "{run}"\n')
        Path(containers).write_text(
            '[containers]\nnetns = "none"\ndefault_ulimits = ["nofile=10000:10000", "nproc=32768:32768"]\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'tmp_dir = "{run}/libpod-tmp"\n')
        env = {**os.environ, "CONTAINERS_STORAGE_CONF": storage, "CONTAINERS_CONF": containers, "TMPDIR": tmp}
        return cls(name, graph, env, short)

    def podman(self, *args: str, timeout: float = 120) -> Result:
        """Run podman, bounded in time (``timeout -k``: a process stuck on a mount ignores TERM)."""
        started = time.monotonic()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            code = subprocess.run(["timeout", "-k", "5", str(timeout), "podman", *args], stdout=out, stderr=err,
                                  env=self.env, timeout=timeout + 15, stdin=subprocess.DEVNULL).returncode
            out.seek(0)
            err.seek(0)
            return Result(code, out.read(), err.read(), time.monotonic() - started)

    def must(self, *args: str, timeout: float = 120) -> str:
        res = self.podman(*args, timeout=timeout)
        if res.code != 0:
            raise RuntimeError(f"podman {' '.join(args)} on {self.name} failed ({res.code}): {res.err[-2000:]}")
        return res.out

    def clean(self) -> None:
        """Remove containers and podman's mounts below the graph; drop the run root."""
        self.podman("rm", "-af", "-t", "0", timeout=60)
        self.podman("unmount", "-a", timeout=60)
        shutil.rmtree(self.short, ignore_errors=True)


@dataclass
class Stats:
    """What the load did: operations and errors per kind, latencies."""

    ops: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    max_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, seconds: float, error: str | None) -> None:
        with self.lock:
            self.ops[kind] = self.ops.get(kind, 0) + 1
            self.max_seconds[kind] = max(self.max_seconds.get(kind, 0.0), seconds)
            self.total_seconds[kind] = self.total_seconds.get(kind, 0.0) + seconds
            if error is not None:
                self.errors.append(f"{kind}: {error}")

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def summary(self) -> str:
        lines = []
        for kind in sorted(self.ops):
            n = self.ops[kind]
            lines.append(f"  {kind:<10} {n:>5} ops, mean {self.total_seconds[kind] / n:6.2f} s, "
                         f"max {self.max_seconds[kind]:6.2f} s")
        return "\n".join(lines)


class Load:
    """The workers, sharing one deadline; ``prepare`` first, ``run``, then ``close``."""

    def __init__(self, a: Node, b: Node, share: str, image_tar: str, workdir: str,
                 graftfs: Callable[..., subprocess.CompletedProcess[str]]) -> None:
        self.a, self.b, self.share, self.image_tar, self.workdir = a, b, share, image_tar, workdir
        self.graftfs = graftfs  # runs the graftfs CLI (this checkout's)
        self.saved = os.path.join(workdir, "soak-base.tar")
        self.stats = Stats()
        self._stop = threading.Event()

    def prepare(self, visible_timeout: float = 30.0) -> None:
        """A imports the base image and publishes it; B sees it; A keeps one container up for exec."""
        self.a.must("import", "-q", self.image_tar, BASE)
        self.a.must("save", "-q", "-o", self.saved, BASE)
        pub = self.graftfs("publish", "--graph", self.a.graph, "--share", self.share, BASE)
        if pub.returncode != 0:
            raise RuntimeError(f"graftfs publish failed: {pub.stderr[-2000:]}")
        deadline = time.monotonic() + visible_timeout
        while BASE not in self.b.must("images", "--format", "{{.Repository}}:{{.Tag}}"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"node B does not list {BASE} {visible_timeout:g} s after the publish")
            time.sleep(0.2)
        self.a.must("run", "-d", "--name", EXEC_CONTAINER, BASE, "sleep", "100000")

    def _op(self, kind: str, node: Node, args: list[str], want: str | None = None) -> bool:
        res = node.podman(*args)
        error = None
        if res.code != 0:
            error = f"podman {' '.join(args)} on {node.name} exited {res.code}: {res.err.strip()[-500:]}"
        elif want is not None and res.out != want:
            error = f"podman {' '.join(args)} on {node.name} printed {res.out[-200:]!r}, not {want!r}"
        self.stats.record(kind, res.seconds, error)
        return error is None

    def _loop(self, body: Callable[[int], None]) -> None:
        i = 0
        while not self._stop.is_set():
            body(i)
            i += 1

    def _import_rmi(self, worker: int) -> Callable[[int], None]:
        rootfs = os.path.join(self.workdir, f"rootfs-{worker}")
        tar = os.path.join(self.workdir, f"import-{worker}.tar")
        if not os.path.isdir(rootfs):
            os.makedirs(rootfs)
            subprocess.run(["tar", "-C", rootfs, "-xf", self.image_tar], check=True, timeout=60)

        def body(i: int) -> None:
            # content of its own each time: imports of identical content share one layer, and
            # podman itself races on it (an rmi deleting the layer another import is committing
            # to: "layer not known", on a plain ext4 graph too), which is not what is tested here
            Path(rootfs, "soak-id").write_text(f"{worker} {i} {time.time_ns()}\n")
            subprocess.run(["tar", "-C", rootfs, "-cf", tar, "."], check=True, timeout=60)
            tag = f"localhost/soak-imp{worker}:{i}"
            if self._op("import", self.a, ["import", "-q", tar, tag]):
                self._op("rmi", self.a, ["rmi", tag])
        return body

    def _load_untag(self, i: int) -> None:
        tag = f"localhost/soak-load:{i}"
        # the archive holds BASE: tag it under a name of this worker's, then remove that name
        if self._op("load", self.a, ["load", "-q", "-i", self.saved]) and self._op("tag", self.a, ["tag", BASE, tag]):
            self._op("rmi", self.a, ["rmi", tag])

    def _run_on(self, node: Node) -> Callable[[int], None]:
        def body(i: int) -> None:
            self._op(f"run-{node.name}", node, ["run", "--rm", BASE, "echo", f"{node.name} {i}"], f"{node.name} {i}\n")
        return body

    def _exec(self, i: int) -> None:
        self._op("exec", self.a, ["exec", EXEC_CONTAINER, "echo", f"exec {i}"], f"exec {i}\n")

    def run(self, seconds: float, on_tick: Callable[[float], None] | None = None, tick: float = 30.0) -> Stats:
        """Run every worker until ``seconds`` have passed (operations under way finish)."""
        self._stop.clear()
        bodies: list[tuple[str, Callable[[int], None]]] = [
            ("import-rmi-0", self._import_rmi(0)), ("import-rmi-1", self._import_rmi(1)),
            ("load", self._load_untag), ("run-a", self._run_on(self.a)), ("exec", self._exec),
            ("run-b", self._run_on(self.b)), ("run-b2", self._run_on(self.b)),
        ]
        failures: list[str] = []

        def guarded(name: str, body: Callable[[int], None]) -> None:
            try:
                self._loop(body)
            except Exception as e:  # a worker that breaks is an error, not a silent stop
                failures.append(f"worker {name} crashed: {e!r}")
                self._stop.set()

        threads = [threading.Thread(target=guarded, args=(n, b), name=n, daemon=True) for n, b in bodies]
        started = time.monotonic()
        for t in threads:
            t.start()
        next_tick = started + tick
        while time.monotonic() - started < seconds and not self._stop.is_set():
            time.sleep(min(0.5, max(0.0, started + seconds - time.monotonic())))
            if on_tick is not None and time.monotonic() >= next_tick:
                on_tick(time.monotonic() - started)
                next_tick += tick
        self._stop.set()
        for t in threads:
            t.join(timeout=300)
        self.stats.errors.extend(failures)
        self.stats.errors.extend(f"worker {t.name} did not stop" for t in threads if t.is_alive())
        return self.stats

    def close(self) -> None:
        for node in (self.a, self.b):
            with contextlib.suppress(Exception):
                node.clean()


def rss_kib(pid: int) -> int | None:
    """A process' resident set size (VmRSS), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def graftfs_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The graftfs CLI with this interpreter (and whatever PYTHONPATH points it at)."""
    return subprocess.run([sys.executable, "-m", "graftfs", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
