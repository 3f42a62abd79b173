"""A real image registry for pull tests, and test images built and pushed to it.

The registry is distribution's `docker-registry serve` on a free 127.0.0.1 port, storing blobs in
the test's temp dir. Reuse of layers by a pulling node is judged only from the registry's access
log (podman prints "Copying blob" for reused blobs too): every blob served counts as one
`"GET /v2/<repo>/blobs/<digest> HTTP/1.1" 200` line.

Images are built on a native podman graph (a plain directory, not graftfs) so that what a graftfs
node pulls was never near graftfs before. Every image but the busybox base adds layers of fresh
random data, so their digests are new to every test session.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import secrets
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

import pytest

from graftfs.linux import MNT_DETACH, umount
from graftfs.node.mounts import mount_table
from graftfs.share.sample import BUSYBOX, busybox_image_tar

REGISTRY_BIN = "docker-registry"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
BIG_BYTES = 200 << 20

#: One access-log line (combined log format) for a blob download.
BLOB_GET = re.compile(r'"GET /v2/(?P<repo>\S+)/blobs/(?P<digest>sha256:[0-9a-f]{64}) HTTP/[0-9.]+" (?P<status>\d{3}) ')
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"


#: The registry and image builds get SIGTERM if pytest dies without teardown (a timeout ends it
#: with os._exit); `timeout` passes it on to podman.
_DIE_WITH_US = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ref(self, name: str) -> str:
        return f"127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        # another server may take the free port between our probe and the registry's bind: retry
        for _ in range(3):
            self.port = _free_port()
            config = self.root / "config.yml"
            config.write_text(f"version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n"
                              f"    rootdirectory: {self.root / 'data'}\nhttp:\n  addr: 127.0.0.1:{self.port}\n")
            with open(self.log, "ab") as log:  # access log on stdout, the rest on stderr: one file
                offset = log.tell()
                self.proc = subprocess.Popen([*_DIE_WITH_US, REGISTRY_BIN, "serve", str(config)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            if self._wait_ready():
                return
            self.stop()
            with open(self.log, "rb") as log:
                log.seek(offset)
                if b"address already in use" not in log.read():
                    break
        raise AssertionError(f"the registry did not answer on {self.url}/v2/ within {READY_TIMEOUT:g} s:\n"
                             f"{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
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
            assert resp.status == 200
        deadline = time.monotonic() + 10
        while marker not in self.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"the registry never logged request {marker}:\n{self.log_tail()}"
            time.sleep(0.02)

    def blob_gets(self, since: int = 0) -> collections.Counter[str]:
        """Digest -> how many times its blob was served (status 200) after ``since``."""
        self.sync()
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return collections.Counter(m["digest"] for m in BLOB_GET.finditer(text) if m["status"] == "200")

    def manifest(self, name: str) -> dict[str, object]:
        repo, _, tag = name.rpartition(":")
        req = urllib.request.Request(f"{self.url}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def layers(self, name: str) -> list[str]:
        """The (compressed) layer blob digests of ``name`` ("repo:tag"), bottom first."""
        return [la["digest"] for la in self.manifest(name)["layers"]]  # type: ignore[attr-defined]

    def config(self, name: str) -> str:
        """The blob digest of the image config of ``name``: every pull fetches it."""
        return self.manifest(name)["config"]["digest"]  # type: ignore[index]


def start_registry(root: Path) -> Iterator[Registry]:
    """A started registry, stopped when the generator is closed, even after a failure."""
    if shutil.which(REGISTRY_BIN) is None:
        pytest.skip("docker-registry (distribution) is not installed")
    root.mkdir(parents=True, exist_ok=True)
    reg = Registry(root)
    try:
        reg.start()
        yield reg
    finally:
        reg.stop()
        shutil.rmtree(root / "data", ignore_errors=True)  # the blobs (over 200 MiB); the log stays


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry for the module: it lives as long as the images pushed to it. Tests count what
    they pulled with ``registry.mark()`` / ``registry.blob_gets(since=...)``."""
    yield from start_registry(tmp_path_factory.mktemp("registry"))


@dataclass
class NativePodman:
    """podman on a plain graph directory, with the same engine settings as the test nodes."""

    env: dict[str, str]
    graph: str
    short: str  # runroot and TMPDIR: conmon's socket paths must stay short

    @classmethod
    def create(cls, base: Path) -> NativePodman:
        short = tempfile.mkdtemp(prefix="gfsreg-", dir="/tmp")
        graph, run, tmp = base / "graph", Path(short) / "run", Path(short) / "tmp"
        for d in (graph, run, tmp):
            d.mkdir(parents=True, exist_ok=True)
        (base / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{graph}"\nrunroot = "{run}"\n')
        (base / "containers.conf").write_text(
            '[containers]\nnetns = "none"\ndefault_ulimits = ["nofile=10000:10000", "nproc=32768:32768"]\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'tmp_dir = "{run}/libpod-tmp"\n')
        env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
               "CONTAINERS_CONF": str(base / "containers.conf"), "TMPDIR": str(tmp)}
        return cls(env, str(graph), short)

    def podman(self, *args: str, timeout: float = 120) -> str:
        # output to files, not pipes: with a pipe, podman waits for conmon at exit
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            code = subprocess.run([*_DIE_WITH_US, "timeout", "-k", "5", str(timeout), "podman", *args], stdout=out,
                                  stderr=err, env=self.env, timeout=timeout + 15, stdin=subprocess.DEVNULL).returncode
            out.seek(0)
            err.seek(0)
            assert code == 0, f"podman {' '.join(args)} (native graph): exit {code}\n{err.read()[-2000:]}"
            return out.read()

    def close(self) -> None:
        """Remove everything: containers, mounts the overlay driver left, the graph's data."""
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.podman("rm", "-af", "-t", "0", timeout=60)
        for top in (self.graph, self.short):
            for entry in sorted(mount_table(), key=lambda m: -len(m.mountpoint)):
                if entry.mountpoint == top or entry.mountpoint.startswith(top + "/"):
                    with contextlib.suppress(OSError):
                        umount(entry.mountpoint, MNT_DETACH)
        shutil.rmtree(self.graph, ignore_errors=True)
        shutil.rmtree(self.short, ignore_errors=True)


@dataclass
class Image:
    """One pushed test image: its reference, its layers' blob digests as the registry serves
    them (bottom first) and files with the content a container of it must show."""

    ref: str
    layers: list[str]
    config: str  # the image config's blob digest
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class Images:
    base: Image  # busybox: one layer, the bottom of every other image
    app: Image  # base + 1 layer
    multi: Image  # base + 3 layers
    tool: Image  # base + 1 layer
    big: Image  # base + one 200 MiB layer of random data; files: {"/big": its sha256}


def _build(builder: NativePodman, ctx: Path, tag: str, steps: list[str]) -> None:
    containerfile = ctx / f"Containerfile.{tag.replace('/', '_').replace(':', '_')}"
    containerfile.write_text("FROM localhost/base:1\n" + "".join(f"RUN {s}\n" for s in steps))
    # one layer per RUN step (podman's default --layers=true; without it the steps make one layer)
    builder.podman("build", "--network=none", "-q", "-f", str(containerfile), "-t", tag, str(ctx), timeout=180)


def build_and_push(registry: Registry, workdir: Path) -> Images:
    """Build the test images on a native graph under ``workdir`` and push them to ``registry``.

    Each image records the files a container of it shows (random text, new every build), so a
    pull that mixed up or corrupted layers shows in the content."""
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    builder = NativePodman.create(workdir / "native")
    try:
        ctx = workdir / "context"
        ctx.mkdir()
        tar = busybox_image_tar(str(ctx))
        builder.podman("import", tar, "localhost/base:1")
        os.unlink(tar)
        shutil.rmtree(ctx / "rootfs")  # keep the build context small
        files: dict[str, dict[str, str]] = {"base": {}}
        files["app"] = {"/app.txt": secrets.token_hex(16)}
        _build(builder, ctx, "localhost/app:1", [f"echo {files['app']['/app.txt']} > /app.txt"])
        files["multi"] = {f"/m{k}.txt": secrets.token_hex(16) for k in (1, 2, 3)}
        _build(builder, ctx, "localhost/multi:1",
               [f"echo {v} > {p} && head -c {k * 65536} /dev/urandom > {p}.bin"
                for k, (p, v) in enumerate(files["multi"].items(), 1)])
        files["tool"] = {"/tool.txt": secrets.token_hex(16)}
        _build(builder, ctx, "localhost/tool:1", [f"echo {files['tool']['/tool.txt']} > /tool.txt"])
        _build(builder, ctx, "localhost/big:1", [f"head -c {BIG_BYTES} /dev/urandom > /big"])
        files["big"] = {"/big": builder.podman("run", "--rm", "localhost/big:1", "sha256sum", "/big").split()[0]}
        built = {}
        for name in ("base", "app", "multi", "tool", "big"):  # the base first: the others reuse its blob
            builder.podman("push", "-q", "--tls-verify=false", f"localhost/{name}:1", registry.ref(f"{name}:1"),
                           timeout=180)
            built[name] = Image(registry.ref(f"{name}:1"), registry.layers(f"{name}:1"), registry.config(f"{name}:1"),
                                files[name])
    finally:
        builder.close()
    images = Images(**built)
    base = images.base.layers
    assert len(base) == 1, base
    for image, count in ((images.app, 2), (images.multi, 4), (images.tool, 2), (images.big, 2)):
        # every image must share the base's very blob, or no pull could reuse it
        assert len(image.layers) == count and image.layers[0] == base[0], (image, base)
    return images


@pytest.fixture(scope="module")
def pushed_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Images:
    """The test images, built once per module and pushed to the module's registry."""
    return build_and_push(registry, tmp_path_factory.mktemp("images"))
