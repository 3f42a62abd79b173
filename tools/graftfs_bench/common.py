"""What every benchmark needs: the mounts under test, timing with repetitions, dropping the
page cache between cold runs, and the table of ratios."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graftfs.node.mounts import find_mount

REPO = Path(__file__).resolve().parent.parent.parent
VENV_PY = REPO / ".venv" / "bin" / "python"
#: graftfs processes the bench starts run this checkout's code (not whatever the venv installed)
GRAFTFS_ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}

#: mergerfs as its documentation recommends it (page cache on, newest-free-space creation).
MERGERFS_OPTIONS = "allow_other,use_ino,cache.files=partial,dropcacheonclose=true,category.create=mfs"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def drop_caches() -> None:
    """Empty the page, dentry and inode caches: the next access reads the disk (a cold run)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@dataclass
class Timing:
    """Seconds of several repetitions of one measure."""

    values: list[float] = field(default_factory=list)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    def as_dict(self) -> dict[str, object]:
        return {"min_s": round(self.min, 4), "median_s": round(self.median, 4), "mean_s": round(self.mean, 4),
                "runs_s": [round(v, 4) for v in self.values]}


def repeat(action: Callable[[], object], reps: int, cold: bool) -> Timing:
    """Time ``action`` ``reps`` times; cold: caches dropped before each run, warm: one unmeasured
    run first."""
    out = Timing()
    if not cold:
        action()
    for _ in range(reps):
        if cold:
            drop_caches()
        started = time.perf_counter()
        action()
        out.values.append(time.perf_counter() - started)
    return out


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


class FuseMount:
    """A FUSE filesystem under test, served by a child process and unmounted by close()."""

    def __init__(self, mnt: Path, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.mnt = mnt
        self.log = log
        if find_mount(str(mnt)) is not None:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         env=GRAFTFS_ENV if env is None else env)
        while find_mount(str(mnt)) is None:
            if self.proc.poll() is not None or time.monotonic() - started > 300:
                self.close()
                raise SystemExit(f"{argv[0]} did not mount {mnt}: see {log}")
            time.sleep(0.005)
        self.ready_s = time.monotonic() - started

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if find_mount(str(self.mnt)) is not None:
            subprocess.run(["umount", str(self.mnt)], check=False, stderr=subprocess.DEVNULL)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if find_mount(str(self.mnt)) is not None:
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)

    def __enter__(self) -> FuseMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def graftfs_mount(mnt: Path, rw: Path, shares: list[Path], log: Path, *options: str,
                  layout: str = "containers-storage", src: Path | None = None) -> FuseMount:
    """A graftfs mount served by this checkout's code, or by the package sources in ``src``
    (another revision's, see source_at)."""
    argv = [str(VENV_PY), "-m", "graftfs", "mount", "--foreground", "--rw", str(rw), "--layout", layout,
            "--log-file", str(log)]
    for share in shares:
        argv += ["--ro", str(share)]
    if options:
        argv += ["-o", ",".join(options)]
    env = None if src is None else {**GRAFTFS_ENV, "PYTHONPATH": str(src)}
    return FuseMount(mnt, [*argv, str(mnt)], log, env)


def source_at(rev: str, work: Path) -> Path:
    """graftfs' package sources as of git revision ``rev`` of this checkout, extracted under
    ``work`` (for measuring a change against the code before it, side by side)."""
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           capture_output=True, text=True, timeout=60, check=False)
    if found.returncode != 0:
        raise SystemExit(f"tools/bench: --against {rev}: no such revision in {REPO}")
    commit = found.stdout.strip()
    dest = work / f"src-{commit[:12]}"
    if not (dest / "src" / "graftfs").is_dir():
        fresh_dir(dest)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"], capture_output=True,
                                 timeout=120, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, timeout=120, check=True)
    return dest / "src"


def mergerfs_mount(mnt: Path, rw: Path, shares: list[Path], log: Path) -> FuseMount:
    if shutil.which("mergerfs") is None:
        raise SystemExit("tools/bench: mergerfs is not installed (tools/install --bench installs it)")
    branches = ":".join([f"{rw}=RW", *(f"{s}=RO" for s in shares)])
    return FuseMount(mnt, ["mergerfs", "-f", "-o", MERGERFS_OPTIONS, branches, str(mnt)], log)


def print_section(title: str, rows: dict[str, dict[str, Timing]], baseline: str = "native",
                  other: str = "mergerfs") -> None:
    """One table: a row per measure and variant, median and min seconds, and the median's
    ratio to the baseline (native) and to the other contender (mergerfs) measured in the same run."""
    print(f"\n{title}")
    print(f"  {'measure':34} {'variant':24} {'median s':>9} {'min s':>9} {'x native':>9} {'x mergerfs':>10}")
    for measure, variants in rows.items():
        base = variants.get(baseline)
        comp = variants.get(other)
        for variant, t in variants.items():
            ratio = f"{t.median / base.median:9.2f}" if base and base.median > 0 else f"{'':9}"
            vs = f"{t.median / comp.median:10.2f}" if comp and comp.median > 0 else f"{'':10}"
            print(f"  {measure:34} {variant:24} {t.median:9.3f} {t.min:9.3f} {ratio} {vs}")


def section_json(rows: dict[str, dict[str, Timing]], baseline: str = "native") -> dict[str, object]:
    out: dict[str, object] = {}
    for measure, variants in rows.items():
        base = variants.get(baseline)
        entry: dict[str, object] = {}
        for variant, t in variants.items():
            d = t.as_dict()
            if base and base.median > 0:
                d["ratio_to_native"] = round(t.median / base.median, 3)
            entry[variant] = d
        out[measure] = entry
    return out


def interleaved(variants: dict[str, Callable[[], float]], reps: int) -> dict[str, Timing]:
    """Each repetition measures every variant in turn (after one unmeasured round): this
    machine's speed drifts by tens of percent over minutes, which would otherwise land on one
    variant's runs only."""
    for measure in variants.values():
        measure()
    out = {name: Timing() for name in variants}
    for _ in range(reps):
        for name, measure in variants.items():
            out[name].values.append(measure())
    return out


def mount_status(mount: FuseMount) -> dict[str, Any]:
    """A graftfs mount's status, as `graftfs status --json` prints it."""
    out = subprocess.run([str(VENV_PY), "-m", "graftfs", "status", "--json", str(mount.mnt)],
                         capture_output=True, text=True, check=True, timeout=30, env=GRAFTFS_ENV).stdout
    st = json.loads(out)
    assert isinstance(st, dict)
    return st
