"""A real image registry, podman on private graphs, and images built and pushed: what the pull
tests (tests/registry.py) and `tools/bench cluster` share.

The registry is distribution's `docker-registry serve` on a free 127.0.0.1 port, storing blobs
below a given directory. What a pulling node fetched is judged only from the registry's access
log (podman prints "Copying blob" for reused blobs too): every blob served is one
`"GET /v2/<repo>/blobs/<digest> HTTP/1.1" 200 <bytes>` line.

Images are built on a native podman graph (a plain directory, not graftfs), so that what a graftfs
node pulls was never near graftfs before.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from graftfs.linux import MNT_DETACH, umount
from graftfs.node.mounts import mount_table
from graftfs.share.sample import busybox_image_tar

REGISTRY_BIN = "docker-registry"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
#: After SIGTERM, how long a podman gets before its process group is killed.
KILL_GRACE = 5.0

#: One access-log line (combined log format) for a blob download; the size is the bytes sent
#: ("-" when nothing was).
BLOB_GET = re.compile(r'"GET /v2/(?P<repo>\S+)/blobs/(?P<digest>sha256:[0-9a-f]{64}) HTTP/[0-9.]+" '
                      r'(?P<status>\d{3}) (?P<size>\d+|-)')
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"

#: The registry and podman get SIGTERM if the process that started them dies without cleaning up
#: (a pytest timeout ends with os._exit; a bench may be SIGKILLed).
DIE_WITH_US = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []

#: The engine settings of every podman here: no network, runc, no systemd, events in a file,
#: limits that do not depend on the caller's.
CONTAINERS_CONF = ('[containers]\nnetns = "none"\ndefault_ulimits = ["nofile=10000:10000", "nproc=32768:32768"]\n'
                   '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
                   'tmp_dir = "{run}/libpod-tmp"\n')


class CommandError(AssertionError):
    """A registry or podman command did not do what it must. An AssertionError, so that a test
    reports it as a failed check with its message."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class BlobFetch:
    """One blob the registry served: its digest and the bytes sent (None when the log has no size)."""

    digest: str
    size: int | None


@dataclass
class Registry:
    """One `docker-registry serve` process, its storage and its log, all below ``root``."""

    root: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ref(self, name: str) -> str:
        return f"127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        # another server may take the free port between our probe and the registry's bind: retry
        for _ in range(3):
            self.port = free_port()
            config = self.root / "config.yml"
            config.write_text(f"version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n"
                              f"    rootdirectory: {self.data}\nhttp:\n  addr: 127.0.0.1:{self.port}\n")
            with open(self.log, "ab") as log:  # access log on stdout, the rest on stderr: one file
                offset = log.tell()
                self.proc = subprocess.Popen([*DIE_WITH_US, REGISTRY_BIN, "serve", str(config)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            if self._wait_ready():
                return
            self.stop()
            with open(self.log, "rb") as log:
                log.seek(offset)
                if b"address already in use" not in log.read():
                    break
        raise CommandError(f"the registry did not answer on {self.url}/v2/ within {READY_TIMEOUT:g} s:\n"
                           f"{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = None
                return False
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as resp:
                if resp.status == 200:
                    return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a bound; the process group goes, whatever happened before."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """A position in the access log: ``blob_gets(since=mark)`` counts only what came after."""
        self.sync()
        return self.log.stat().st_size

    def sync(self) -> None:
        """Wait until the log holds the requests answered so far. A request's line is written just
        after its response, so a client may be done before its last line is: wait for the line
        of a marker request sent now, after the client finished (and so after those lines)."""
        marker = uuid.uuid4().hex
        with urllib.request.urlopen(f"{self.url}/v2/?sync={marker}", timeout=10) as resp:
            if resp.status != 200:
                raise CommandError(f"the registry answered {resp.status} to {self.url}/v2/")
        deadline = time.monotonic() + 10
        while marker not in self.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise CommandError(f"the registry never logged request {marker}:\n{self.log_tail()}")
            time.sleep(0.02)

    def blob_fetches(self, since: int = 0) -> list[BlobFetch]:
        """Every blob served whole (status 200) after ``since``, in the log's order."""
        self.sync()
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return [BlobFetch(m["digest"], None if m["size"] == "-" else int(m["size"]))
                for m in BLOB_GET.finditer(text) if m["status"] == "200"]

    def blob_gets(self, since: int = 0) -> collections.Counter[str]:
        """Digest -> how many times its blob was served (status 200) after ``since``."""
        return collections.Counter(f.digest for f in self.blob_fetches(since))

    def manifest(self, name: str) -> dict[str, object]:
        repo, _, tag = name.rpartition(":")
        req = urllib.request.Request(f"{self.url}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body: dict[str, object] = json.loads(resp.read())
            return body

    def layers(self, name: str) -> list[str]:
        """The (compressed) layer blob digests of ``name`` ("repo:tag"), bottom first."""
        return [la["digest"] for la in self.manifest(name)["layers"]]  # type: ignore[attr-defined]

    def config(self, name: str) -> str:
        """The blob digest of the image config of ``name``: every pull fetches it."""
        return self.manifest(name)["config"]["digest"]  # type: ignore[index]

    def blob_sizes(self, name: str) -> dict[str, int]:
        """Digest -> size in bytes of every blob of ``name`` (config and layers), per its manifest."""
        doc = self.manifest(name)
        blobs = [doc["config"], *doc["layers"]]  # type: ignore[misc]
        return {b["digest"]: int(b["size"]) for b in blobs}


@contextlib.contextmanager
def running_registry(root: Path) -> Iterator[Registry]:
    """A started registry below ``root``, stopped on leaving (even after a failure or Ctrl-C),
    its blobs deleted; the log stays."""
    root.mkdir(parents=True, exist_ok=True)
    reg = Registry(root)
    try:
        reg.start()
        yield reg
    finally:
        reg.stop()
        shutil.rmtree(reg.data, ignore_errors=True)


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group of ``proc`` (its own session), SIGKILL after KILL_GRACE; the
    waits are bounded even for a process stuck in the kernel."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, STOP_TIMEOUT)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_bounded(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in its own session, its output in files (podman 4.3 waits for conmon at exit
    when its output is a pipe). Past ``timeout``, or when the caller is interrupted (Ctrl-C), the
    whole process group is ended; a timeout gives return code 124, as timeout(1) does."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*DIE_WITH_US, *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            code = 124
        except BaseException:
            _end_group(proc)
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, code, out.read(), err.read())


def processes_naming(path: str) -> list[int]:
    """Live processes (not zombies) other than this one whose command line names ``path``."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if int(pid) != os.getpid() and state != "Z" and os.fsencode(path) in args:
            out.append(int(pid))
    return out


def end_processes_naming(path: str, grace: float = 10.0) -> list[int]:
    """Wait up to ``grace`` seconds for the processes naming ``path`` to exit, then SIGKILL
    them; returns the pids that had to be killed."""
    deadline = time.monotonic() + grace
    while (pids := processes_naming(path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def unmount_below(top: str) -> None:
    """Detach every mount at or below ``top``, deepest first (what podman's overlay driver left)."""
    for entry in sorted(mount_table(), key=lambda m: -len(m.mountpoint)):
        if entry.mountpoint == top or entry.mountpoint.startswith(top + "/"):
            with contextlib.suppress(OSError):
                umount(entry.mountpoint, MNT_DETACH)


@dataclass
class Podman:
    """podman on graph ``graph`` with its own storage.conf/containers.conf (never the machine's):
    the overlay driver, runc, no network; runroot and TMPDIR in a short directory below /tmp
    (conmon's socket paths must stay short)."""

    env: dict[str, str]
    graph: str
    short: str
    name: str = "podman"

    @classmethod
    def create(cls, base: Path, graph: Path, name: str = "podman", prefix: str = "gfsreg-") -> Podman:
        short = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        run, tmp = Path(short) / "run", Path(short) / "tmp"
        for d in (base, graph, run, tmp):
            d.mkdir(parents=True, exist_ok=True)
        (base / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{graph}"\nrunroot = "{run}"\n')
        (base / "containers.conf").write_text(CONTAINERS_CONF.format(run=run))
        env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
               "CONTAINERS_CONF": str(base / "containers.conf"), "TMPDIR": str(tmp)}
        return cls(env, str(graph), short, name)

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """podman ``args``, whatever its exit status."""
        return run_bounded(["podman", *args], self.env, timeout)

    def podman(self, *args: str, timeout: float = 120) -> str:
        """podman ``args``, which must succeed; its standard output."""
        res = self.run(*args, timeout=timeout)
        if res.returncode != 0:
            why = f"killed after {timeout:g} s" if res.returncode == 124 else f"exit {res.returncode}"
            raise CommandError(f"podman {' '.join(args)} ({self.name}): {why}\n{res.stderr[-2000:]}")
        return res.stdout

    def image_id(self, ref: str) -> str:
        return self.podman("image", "inspect", "--format", "{{.Id}}", ref).strip()

    def has_image(self, ref: str) -> bool:
        return self.run("image", "exists", ref, timeout=60).returncode == 0

    def stop_containers(self) -> None:
        """Remove every container and detach what the overlay driver left mounted (graph and run
        root); bounded in time, and quiet: this is cleanup."""
        for args in (("rm", "-af", "-t", "0"), ("unmount", "-a")):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.run(*args, timeout=60)
        for top in (self.graph, self.short):
            for entry in sorted(mount_table(), key=lambda m: -len(m.mountpoint)):
                if entry.mountpoint.startswith(top + "/"):
                    with contextlib.suppress(OSError):
                        umount(entry.mountpoint, MNT_DETACH)

    def close(self) -> None:
        """Stop the containers and remove the short run directory; the graph is left as it is
        (it may be a mount: its owner takes it down). A conmon outlives a killed `podman run`
        and, once its container is gone, starts `podman container cleanup`, which would make the
        run directory again: both are waited for (bounded) before it is removed."""
        self.stop_containers()
        end_processes_naming(self.short)
        unmount_below(self.short)
        shutil.rmtree(self.short, ignore_errors=True)


@dataclass
class NativePodman(Podman):
    """podman on a plain graph directory ``base``/graph, removed with all its data by close()."""

    @classmethod
    def native(cls, base: Path, name: str = "native", prefix: str = "gfsreg-") -> NativePodman:
        p = Podman.create(base, base / "graph", name, prefix)
        return cls(p.env, p.graph, p.short, p.name)

    def close(self) -> None:
        """Remove everything: containers, mounts the overlay driver left, the graph's data."""
        super().close()
        unmount_below(self.graph)
        shutil.rmtree(self.graph, ignore_errors=True)


@dataclass
class Image:
    """One pushed image: its reference, its layers' blob digests as the registry serves them
    (bottom first), its config's blob digest, and files with the content a container of it
    must show (path -> content)."""

    ref: str
    layers: list[str]
    config: str
    files: dict[str, str] = field(default_factory=dict)


def import_busybox(builder: Podman, ctx: Path, tag: str = "localhost/base:1") -> None:
    """Import a busybox-static rootfs as image ``tag`` (one layer); ``ctx`` is left holding
    only what a build context needs."""
    ctx.mkdir(parents=True, exist_ok=True)
    tar = busybox_image_tar(str(ctx))
    builder.podman("import", tar, tag)
    os.unlink(tar)
    shutil.rmtree(ctx / "rootfs")  # keep the build context small


def build(builder: Podman, ctx: Path, tag: str, steps: list[str], base: str = "localhost/base:1",
          timeout: float = 180) -> None:
    """Build ``tag`` from ``base``: one layer per RUN step (podman's default --layers=true;
    without it the steps make one layer)."""
    containerfile = ctx / f"Containerfile.{tag.replace('/', '_').replace(':', '_')}"
    containerfile.write_text(f"FROM {base}\n" + "".join(f"RUN {s}\n" for s in steps))
    builder.podman("build", "--network=none", "-q", "-f", str(containerfile), "-t", tag, str(ctx), timeout=timeout)


def push(builder: Podman, registry: Registry, local: str, name: str, files: dict[str, str] | None = None,
         timeout: float = 180) -> Image:
    """Push ``local`` to ``registry`` as ``name`` ("repo:tag"); the image as the registry serves it."""
    builder.podman("push", "-q", "--tls-verify=false", local, registry.ref(name), timeout=timeout)
    return Image(registry.ref(name), registry.layers(name), registry.config(name), dict(files or {}))
