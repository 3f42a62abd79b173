"""podman on graftfs against podman on native ext4, side by side in one run.

The native graph holds a test image (busybox plus a layer with a 512 MiB file); it is published
to a share with `graftfs publish`, and a second graph is a graftfs mount of an empty RW tree
over that share, as a node of the cluster would have it. Measured on both: `podman run --rm IMG
true`, and inside a container (timed in the container by busybox `time`): reading the image's
512 MiB file cold and warm, writing 512 MiB (fsync'ed) and creating 20,000 small files.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from graftfs.share.sample import busybox_image_tar
from graftfs_bench import fusetrace
from graftfs_bench.common import (
    GRAFTFS_ENV,
    VENV_PY,
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
    source_at,
)

IMAGE = "localhost/bench:1"
#: `podman run` repetitions per --reps: its times move in ~50 ms steps, so means need many runs
RUNS_PER_REP = 10
IN_CONTAINER = {
    "read 512 MiB image file (cold)": ("dd if=/data/big of=/dev/null bs=1M 2>/dev/null", True),
    "read 512 MiB image file (warm)": ("dd if=/data/big of=/dev/null bs=1M 2>/dev/null", False),
    "write 512 MiB + fsync": ("dd if=/dev/zero of=/w bs=1M count=512 conv=fsync 2>/dev/null", False),
    "create 20,000 small files": ("mkdir /s && cd /s && seq 20000 | xargs touch", False),
}


class Podman:
    """podman with a private graph, run root, and configuration (never the machine's)."""

    def __init__(self, base: Path, graph: Path, trash: Path | None = None) -> None:
        short = Path(tempfile.mkdtemp(prefix="gfs-bench-", dir="/tmp"))  # conmon's socket paths stay short
        run = short / "run"
        run.mkdir()
        (base / "storage.conf").write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{graph}"\nrunroot = "{run}"\n')
        (base / "containers.conf").write_text(
            '[containers]\nnetns = "none"\ndefault_ulimits = ["nofile=10000:10000", "nproc=32768:32768"]\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'tmp_dir = "{run}/libpod-tmp"\n')
        self.short = short
        self.graph = graph
        self.trash = trash  # graftfs deletes removed layers in the background, here
        self.env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
                    "CONTAINERS_CONF": str(base / "containers.conf"), "TMPDIR": str(short)}

    def __call__(self, *args: str, timeout: float = 600) -> str:
        """Run podman; returns stdout + stderr (files, not pipes: podman 4.3 waits for conmon on a pipe)."""
        with tempfile.TemporaryFile("w+") as out:
            code = subprocess.run(["podman", *args], stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                  timeout=timeout, stdin=subprocess.DEVNULL).returncode
            out.seek(0)
            text = out.read()
        if code != 0:
            raise SystemExit(f"podman {' '.join(args)} failed: {text[-2000:]}")
        return text

    def close(self) -> None:
        """Remove the containers and this podman's short-lived run directory."""
        self.reset()
        shutil.rmtree(self.short, ignore_errors=True)

    def reset(self) -> None:
        subprocess.run(["podman", "rm", "-af", "-t", "0"], env=self.env, capture_output=True, check=False, timeout=120)
        subprocess.run(["podman", "unmount", "-a"], env=self.env, capture_output=True, check=False, timeout=120)

    def timed_run(self) -> float:
        started = time.perf_counter()
        self("run", "--rm", IMAGE, "true")
        return time.perf_counter() - started

    def settle(self) -> None:
        """Wait until the last removed container's layer is deleted and written out: native podman
        deletes it before `podman run --rm` returns, graftfs after (in the background), and
        neither deletion nor its journal writes may run during the next measurement."""
        deadline = time.monotonic() + 120
        while self.trash is not None and self.trash.exists() and any(self.trash.iterdir()):
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.trash} still holds deleted layers after 120 s")
            time.sleep(0.05)
        os.sync()

    def in_container(self, script: str, cold: bool) -> float:
        """Seconds ``script`` takes in a fresh container, timed inside it."""
        self.settle()
        if cold:
            drop_caches()
        text = self("run", "--rm", IMAGE, "time", "-p", "sh", "-c", script)
        found = re.search(r"^real\s+([0-9.]+)", text, re.M)
        if found is None:
            raise SystemExit(f"no timing in the container's output: {text[-500:]}")
        return float(found.group(1))


def each(variants: dict[str, Podman], measure: Callable[[Podman], float]) -> dict[str, Callable[[], float]]:
    """``measure`` of each variant, as common.interleaved takes them."""
    return {name: functools.partial(measure, podman) for name, podman in variants.items()}


def build_image(native: Podman, work: Path) -> None:
    if IMAGE in native("images", "--format", "{{.Repository}}:{{.Tag}}"):
        return
    say("runtime: building the test image (busybox + a 512 MiB layer) in the native graph ...")
    tar = busybox_image_tar(str(fresh_dir(work / "image")))
    native("import", tar, "localhost/bench:base")
    native("run", "--name", "mk", "localhost/bench:base", "sh", "-c",
           "mkdir /data && dd if=/dev/urandom of=/data/big bs=1M count=512 2>/dev/null")
    native("commit", "-q", "mk", IMAGE)
    native("rm", "mk")


RUN = "podman run --rm IMG true"


@dataclass
class GraftNode:
    """One graftfs graph under test: its mount and its podman."""

    mount: FuseMount
    podman: Podman

    def close(self) -> None:
        self.podman.close()
        self.mount.close()


def _graft_node(base: Path, share: Path, src: Path | None) -> GraftNode:
    """A node's graph: an empty RW tree over the share, mounted by this checkout's code or the
    code in ``src``."""
    rw = fresh_dir(base / "rw")
    mount = graftfs_mount(base / "graph", rw, [share], base / "graftfs.log", src=src)
    try:
        podman = Podman(base, mount.mnt, rw / ".graftfs" / "tmp")
        if IMAGE not in podman("images", "--format", "{{.Repository}}:{{.Tag}}"):
            raise SystemExit("the published image does not show on the graftfs graph")
    except BaseException:
        mount.close()
        raise
    return GraftNode(mount, podman)


def run(work: Path, reps: int, against: str | None = None) -> dict[str, object]:
    """The measures, on native and on graftfs; with ``against`` (a git revision) also
    `podman run` on a second graftfs node served by that revision's code, interleaved."""
    base_native = work / "podman-native"
    base_native.mkdir(parents=True, exist_ok=True)
    native = Podman(base_native, base_native / "graph")
    native.reset()
    build_image(native, work)
    share = fresh_dir(work / "podman-share")
    subprocess.run([str(VENV_PY), "-m", "graftfs", "publish", "--graph", str(native.graph), "--share", str(share),
                    IMAGE], check=True, stdout=subprocess.DEVNULL, timeout=600, env=GRAFTFS_ENV)
    sources: dict[str, Path | None] = {"graftfs": None}
    if against is not None:
        sources[f"graftfs@{against}"] = source_at(against, work)
    grafts: dict[str, GraftNode] = {}
    rows: dict[str, dict[str, Timing]] = {}
    runs = reps * RUNS_PER_REP
    try:
        for i, (name, src) in enumerate(sources.items()):
            grafts[name] = _graft_node(fresh_dir(work / f"podman-graftfs{'-against' if i else ''}"), share, src)
        say(f"  {RUN}")
        before = {name: _requests(g.mount)["requests"] for name, g in grafts.items()}
        why_not = fusetrace.available()
        trace = fusetrace.FuseTrace({name: g.mount.mnt for name, g in grafts.items()}) if why_not is None else None
        if trace is not None:
            trace.start()
        try:
            variants = {"native": native, **{name: g.podman for name, g in grafts.items()}}
            rows[RUN] = interleaved(each(variants, Podman.timed_run), runs)
        finally:
            waited = trace.stop() if trace is not None else {}
        per_run = {name: _per_run(before[name], _requests(g.mount)["requests"], runs + 1)  # + the unmeasured round
                   for name, g in grafts.items()}
        for measure, (script, cold) in IN_CONTAINER.items():
            say(f"  {measure}")
            in_container = functools.partial(Podman.in_container, script=script, cold=cold)
            rows[measure] = interleaved(each({"native": native, "graftfs": grafts["graftfs"].podman}, in_container),
                                        reps)
        requests = _requests(grafts["graftfs"].mount)
    finally:
        native.close()
        for g in grafts.values():
            g.close()
    print_section("podman: graph on native ext4 vs on graftfs (empty RW + the image on a share)", rows)
    out: dict[str, object] = {"rows": section_json(rows), "graftfs_requests": requests}
    for name in grafts:
        out[name] = _report(name, rows[RUN], per_run[name], waited.get(name), runs, why_not)
    print(f"  graftfs FUSE requests during all the runs: {requests}")
    return out


def _report(name: str, run_rows: dict[str, Timing], per_run: dict[str, float],
            waited: fusetrace.RequestLatency | None, runs: int, why_not: str | None) -> dict[str, object]:
    """Print one graftfs variant's podman-run figures; returns them for the JSON."""
    native_mean, graft_mean = run_rows["native"].mean, run_rows[name].mean
    print(f"  {name}: podman run, mean of {len(run_rows[name].values)} runs: {graft_mean * 1000:.1f} ms vs native "
          f"{native_mean * 1000:.1f} ms = {graft_mean / native_mean:.2f} x native (podman's own run times move in "
          "~50 ms steps, so the median flips between them; the mean does not)")
    print(f"  {name}: FUSE requests per run: {sum(per_run.values()):.0f} "
          f"({', '.join(f'{op} {n:g}' for op, n in per_run.items())})")
    out: dict[str, object] = {"mean_ratio": round(graft_mean / native_mean, 3), "requests_per_run": per_run}
    if waited is None:
        print(f"  {name}: time podman waited on FUSE requests: not measured ({why_not})")
        return out
    by_op = waited.per_run(runs)
    top = ", ".join(f"{op} {v['ms']:g}" for op, v in list(by_op.items())[:10])
    print(f"  {name}: time podman waited on FUSE requests per run (kernel tracepoints): "
          f"{waited.total_seconds * 1000 / runs:.1f} ms ({top}, ...; releases, sent in the background: "
          f"{waited.background_seconds * 1000 / runs:.2f} ms of the daemon's time)")
    out["fuse_wait_ms_per_run"] = round(waited.total_seconds * 1000 / runs, 2)
    out["fuse_wait_per_run_by_opcode"] = by_op
    out["fuse_background_per_run_by_opcode"] = waited.per_run(runs, waited=False)
    return out


def _per_run(before: object, after: object, runs: int) -> dict[str, float]:
    """FUSE requests per run, by handler, most first, from two status snapshots."""
    assert isinstance(before, dict) and isinstance(after, dict)
    per = {op: (int(v["count"]) - int(before.get(op, {"count": 0})["count"])) / runs for op, v in after.items()}
    return {op: round(n, 1) for op, n in sorted(per.items(), key=lambda kv: -kv[1]) if n}


def _requests(mount: FuseMount) -> dict[str, object]:
    """The requests served and the bytes through FUSE so far (the mount's status)."""
    st = mount_status(mount)
    return {"requests": st.get("requests", {}), "bytes_read": st.get("bytes_read"),
            "bytes_written": st.get("bytes_written")}
