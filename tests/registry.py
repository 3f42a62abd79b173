"""The pull tests' registry and images: pytest fixtures over tools/graftfs_bench/registry.py.

The registry (distribution's `docker-registry serve` on a free 127.0.0.1 port, blobs in the
test's temp dir), podman on native graphs and the build helpers live in
tools/graftfs_bench/registry.py, shared with `tools/bench cluster`; reuse of layers is judged
only from the registry's access log (see there). Here: the module-scoped fixtures and the test
image set. Images are built on a native podman graph, so that what a graftfs node pulls was never
near graftfs before; every image but the busybox base adds layers of fresh random data, so their
digests are new to every test session.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO
from graftfs.share.sample import BUSYBOX

sys.path.insert(0, str(REPO / "tools"))
from graftfs_bench.registry import (
    REGISTRY_BIN,
    Image,
    NativePodman,
    Registry,
    build,
    import_busybox,
    push,
    running_registry,
)

__all__ = ["BIG_BYTES", "REGISTRY_BIN", "Image", "Images", "Registry", "pushed_images", "registry"]

BIG_BYTES = 200 << 20


def start_registry(root: Path) -> Iterator[Registry]:
    """A started registry, stopped when the generator is closed, even after a failure."""
    if shutil.which(REGISTRY_BIN) is None:
        pytest.skip("docker-registry (distribution) is not installed")
    with running_registry(root) as reg:
        yield reg


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry for the module: it lives as long as the images pushed to it. Tests count what
    they pulled with ``registry.mark()`` / ``registry.blob_gets(since=...)``."""
    yield from start_registry(tmp_path_factory.mktemp("registry"))


@dataclass
class Images:
    base: Image  # busybox: one layer, the bottom of every other image
    app: Image  # base + 1 layer
    multi: Image  # base + 3 layers
    tool: Image  # base + 1 layer
    big: Image  # base + one 200 MiB layer of random data; files: {"/big": its sha256}


def build_and_push(registry: Registry, workdir: Path) -> Images:
    """Build the test images on a native graph under ``workdir`` and push them to ``registry``.

    Each image records the files a container of it shows (random text, new every build), so a
    pull that mixed up or corrupted layers shows in the content."""
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    builder = NativePodman.native(workdir / "native")
    try:
        ctx = workdir / "context"
        import_busybox(builder, ctx, "localhost/base:1")
        files: dict[str, dict[str, str]] = {"base": {}}
        files["app"] = {"/app.txt": secrets.token_hex(16)}
        build(builder, ctx, "localhost/app:1", [f"echo {files['app']['/app.txt']} > /app.txt"])
        files["multi"] = {f"/m{k}.txt": secrets.token_hex(16) for k in (1, 2, 3)}
        build(builder, ctx, "localhost/multi:1",
              [f"echo {v} > {p} && head -c {k * 65536} /dev/urandom > {p}.bin"
               for k, (p, v) in enumerate(files["multi"].items(), 1)])
        files["tool"] = {"/tool.txt": secrets.token_hex(16)}
        build(builder, ctx, "localhost/tool:1", [f"echo {files['tool']['/tool.txt']} > /tool.txt"])
        build(builder, ctx, "localhost/big:1", [f"head -c {BIG_BYTES} /dev/urandom > /big"])
        files["big"] = {"/big": builder.podman("run", "--rm", "localhost/big:1", "sha256sum", "/big").split()[0]}
        built = {}
        for name in ("base", "app", "multi", "tool", "big"):  # the base first: the others reuse its blob
            built[name] = push(builder, registry, f"localhost/{name}:1", f"{name}:1", files[name])
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
