"""Small graph trees in the iSulad layout, built from scratch (for the demo and the tests).

Entries are written the way iSulad writes them: ``overlay/<id>/{diff,link,lower,work}``,
``overlay/l/<short>`` symlinks, ``overlay-layers/<id>/layer.json`` and
``overlay-images/<id>/{images.json,manifest,=<base64 key>}``; ``remote_ro=True`` puts layers in
the ``RO/`` subdirectories of an iSulad remote-RO share instead, with iSulad's symlinks beside.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass

from graftfs.format.names import IMAGE_RECORD, IMAGES, LAYER_RECORD, LAYERS, OVERLAY, REMOTE_RO_DIR, SHORT_DIR


def digest(text: str) -> str:
    """A stable 64-hex id for a sample entry."""
    return hashlib.sha256(text.encode()).hexdigest()


def short_name(layer_id: str) -> str:
    """A 26-character short link name, as the runtime generates (deterministic here)."""
    return base64.b32encode(bytes.fromhex(layer_id)).decode()[:26]


@dataclass
class SampleLayer:
    id: str
    parent: str | None
    files: dict[str, bytes]


def write_layer(root: str, layer: SampleLayer, *, remote_ro: bool = False, with_link: bool = True,
                record: bytes | None = None) -> None:
    """Write one layer entry; ``with_link=False`` or a bad ``record`` makes it incomplete."""
    sub = (REMOTE_RO_DIR,) if remote_ro else ()
    odir = os.path.join(root, OVERLAY, *sub, layer.id)
    ldir = os.path.join(root, LAYERS, *sub, layer.id)
    os.makedirs(os.path.join(odir, "diff"), exist_ok=True)
    os.makedirs(os.path.join(odir, "work"), exist_ok=True)
    os.makedirs(ldir, exist_ok=True)
    for rel, data in layer.files.items():
        path = os.path.join(odir, "diff", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    short = short_name(layer.id)
    if with_link:
        with open(os.path.join(odir, "link"), "w") as f:
            f.write(short)
    if layer.parent:
        with open(os.path.join(odir, "lower"), "w") as f:
            f.write(f"l/{short_name(layer.parent)}")
    if record is None:
        size = sum(len(d) for d in layer.files.values())
        record = json.dumps({
            "id": layer.id, "parent": layer.parent or "", "names": [],
            "created": "2026-11-01T00:00:00Z", "diff-digest": f"sha256:{digest('diff' + layer.id)}",
            "diff-size": size, "compressed-diff-digest": f"sha256:{digest('tgz' + layer.id)}",
            "compressed-size": size, "compression": 2,
        }).encode()
    with open(os.path.join(ldir, LAYER_RECORD), "wb") as f:
        f.write(record)
    if not remote_ro:
        links = os.path.join(root, OVERLAY, SHORT_DIR)
        os.makedirs(links, exist_ok=True)
        link = os.path.join(links, short)
        if not os.path.lexists(link):
            os.symlink(f"../{layer.id}/diff", link)
    else:
        # iSulad keeps real symlinks next to RO/; graftfs must ignore them
        for managed in (OVERLAY, LAYERS):
            link = os.path.join(root, managed, layer.id)
            if not os.path.lexists(link):
                os.symlink(f"{REMOTE_RO_DIR}/{layer.id}", link)


def write_image(root: str, image_id: str, top_layer: str, names: list[str],
                record: bytes | None = None) -> None:
    """Write one image entry (record, manifest and config big-data files)."""
    idir = os.path.join(root, IMAGES, image_id)
    os.makedirs(idir, exist_ok=True)
    config_key = f"sha256:{image_id}"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_key},
        "layers": [],
    }).encode()
    if record is None:
        record = json.dumps({
            "id": image_id, "digest": f"sha256:{digest(image_id)}", "names": names, "layer": top_layer,
            "metadata": "{}", "big-data-names": ["manifest", config_key],
            "created": "2026-11-01T00:00:00Z", "loaded": "2026-11-01T00:00:00Z",
        }).encode()
    with open(os.path.join(idir, IMAGE_RECORD), "wb") as f:
        f.write(record)
    with open(os.path.join(idir, "manifest"), "wb") as f:
        f.write(manifest)
    key_file = "=" + base64.b64encode(config_key.encode()).decode()
    with open(os.path.join(idir, key_file), "wb") as f:
        f.write(json.dumps({"architecture": "amd64", "os": "linux"}).encode())


@dataclass
class DemoIds:
    base: str
    app: str
    web: str
    broken: str
    local: str
    image_app: str
    image_web: str
    image_broken: str


def build_demo(share: str, rw: str) -> DemoIds:
    """The demo's trees: a share with two complete images and one incomplete layer, and a node."""
    ids = DemoIds(
        base=digest("layer:base"), app=digest("layer:app"), web=digest("layer:web"),
        broken=digest("layer:broken"), local=digest("layer:local"),
        image_app=digest("image:app"), image_web=digest("image:web"), image_broken=digest("image:broken"),
    )
    os.makedirs(share, exist_ok=True)
    with open(os.path.join(share, ".graftfs-share"), "w") as f:
        f.write("graftfs share v1\n")
    write_layer(share, SampleLayer(ids.base, None, {"etc/os-release": b"NAME=demo\n", "bin/hello": b"hi\n"}))
    write_layer(share, SampleLayer(ids.app, ids.base, {"app/data.txt": b"application data\n"}))
    write_layer(share, SampleLayer(ids.web, ids.base, {"srv/index.html": b"<h1>web</h1>\n"}))
    # published half-way: files are there, the link file is not yet
    write_layer(share, SampleLayer(ids.broken, ids.base, {"half/written": b"x"}), with_link=False)
    write_image(share, ids.image_app, ids.app, ["demo/app:1"])
    write_image(share, ids.image_web, ids.web, ["demo/web:1"])
    write_image(share, ids.image_broken, ids.broken, ["demo/broken:1"])
    # the node's own data: a container layer on top of the app image, and its mount dirs
    os.makedirs(rw, exist_ok=True)
    write_layer(rw, SampleLayer(ids.local, ids.app, {"tmp/container-output.log": b"written by a container\n"}))
    os.makedirs(os.path.join(rw, OVERLAY, ids.app, "merged"), exist_ok=True)
    return ids


STAGING_PREFIX = ".graftfs-staging"


def publish_sample_image(share: str, tag: str, layers: list[SampleLayer], *, staging: str | None = None) -> str:
    """Publish an image into a share the way a writer must: each entry is written in a staging
    directory on the share, then renamed into place, layers bottom-up and the image record last.
    Returns the image id."""
    image_id = digest(f"image:{tag}")
    stage = staging or os.path.join(share, f"{STAGING_PREFIX}-{image_id[:16]}")
    for layer in layers:
        write_layer(stage, layer)
    write_image(stage, image_id, layers[-1].id, [tag])
    for managed in (OVERLAY, LAYERS, IMAGES):
        os.makedirs(os.path.join(share, managed), exist_ok=True)
    for layer in layers:
        for managed in (OVERLAY, LAYERS):
            dst = os.path.join(share, managed, layer.id)
            if not os.path.exists(dst):
                os.rename(os.path.join(stage, managed, layer.id), dst)
    os.rename(os.path.join(stage, IMAGES, image_id), os.path.join(share, IMAGES, image_id))
    if staging is None:
        shutil.rmtree(stage)
    return image_id


def chain(tag: str, count: int, parent: str | None = None, size: int = 16) -> list[SampleLayer]:
    """``count`` small layers stacked on ``parent`` (ids derived from ``tag``)."""
    out = []
    for i in range(count):
        lid = digest(f"layer:{tag}:{i}")
        out.append(SampleLayer(lid, parent, {f"{tag}/{i}.txt": (f"{tag} {i}\n" * size).encode()}))
        parent = lid
    return out


#: Where Debian's busybox-static puts the binary the sample container images are made of.
BUSYBOX = "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "echo", "cat", "ls", "rm", "touch", "dd", "sha256sum", "sleep", "mkdir", "head",
                   "seq", "xargs", "time", "sync", "true")


def busybox_image_tar(workdir: str) -> str:
    """A tiny container image without a registry: a busybox-static rootfs tarred for
    ``podman import`` (a registry is not needed). Returns the tar's path inside ``workdir``."""
    root = os.path.join(workdir, "rootfs")
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy(BUSYBOX, os.path.join(root, "bin", "busybox"))
    for applet in BUSYBOX_APPLETS:
        os.symlink("busybox", os.path.join(root, "bin", applet))
    for d in ("etc", "proc", "sys", "dev", "tmp"):
        os.mkdir(os.path.join(root, d))
    tar = os.path.join(workdir, "busybox.tar")
    subprocess.run(["tar", "-C", root, "-cf", tar, "."], check=True, timeout=60)
    return tar
