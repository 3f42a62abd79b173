"""The last scan of each shared tree, kept in the node's state dir between mounts.

A first scan checks every entry of a share: with 10,000 layers and a cold page cache that is
~40,000 inodes and files read, ~4-6 s on a local disk and more over NFS. With the scan saved at
unmount, the next mount lists the share's three managed directories and checks only what is new
or moved since, exactly as the watcher does while mounted; entries that vanished drop out, and
the rotating sweep re-checks the known ones' record files over time. An unreadable or foreign
snapshot is ignored (the mount then scans in full), so it never decides what is shown by itself.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from graftfs.catalog.scan import Sig, TreeScan
from graftfs.format.atomic import read_json_state, write_file_atomically
from graftfs.format.names import MANAGED_DIRS, is_id
from graftfs.format.records import ImageEntry, LayerEntry, Problem

log = logging.getLogger(__name__)

FILE_NAME = "scan-cache.json"
VERSION = 4  # 2: signatures hold the attributes too; 3: a layer's also its overlay directory; 4: its record dir


def _layer(e: LayerEntry) -> list[Any]:
    return [e.id, e.parent, e.short, e.overlay_dir, e.record_dir, e.mtime_ns, e.record]


def _image(e: ImageEntry) -> list[Any]:
    return [e.id, e.top_layer, list(e.names), e.record_dir, e.record]


def scan_to_json(scan: TreeScan) -> dict[str, Any]:
    return {
        "layers": [_layer(e) for e in scan.layers.values()],
        "images": [_image(e) for e in scan.images.values()],
        "broken": [[p.kind, p.id, p.reason] for p in scan.broken.values()],
        "remote_ro": scan.remote_ro,
        "overlay_dirs": scan.overlay_dirs,
        "record_dirs": scan.record_dirs,
        "image_dirs": scan.image_dirs,
        "sigs": [[kind, eid, [list(s) if s is not None else None for s in sig]]
                 for (kind, eid), sig in scan.sigs.items()],
    }


def _within(root: str, path: object) -> str:
    """A backing path from the snapshot: inside its tree, below a managed directory."""
    if not isinstance(path, str) or os.path.normpath(path) != path or not path.startswith(root + "/") \
            or path[len(root) + 1:].split("/")[0] not in MANAGED_DIRS:
        raise ValueError(f"path {str(path)[:80]!r} is not an entry of {root}")
    return path


def _id(value: object) -> str:
    if not isinstance(value, str) or not is_id(value):
        raise ValueError(f"{str(value)[:80]!r} is not an id")
    return value


def _dirs(root: str, data: object) -> dict[str, str]:
    if not isinstance(data, dict):
        raise ValueError("directory map is not an object")
    return {_id(k): _within(root, v) for k, v in data.items()}


def _sig(value: object) -> Sig | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 8 or not all(isinstance(v, int) for v in value):
        raise ValueError("bad signature")
    return (value[0], value[1], value[2], value[3], value[4], value[5], value[6], value[7])


def scan_from_json(root: str, data: dict[str, Any]) -> TreeScan:
    """Rebuild a TreeScan; ValueError/TypeError/KeyError on anything malformed."""
    layers = {}
    for lid, parent, short, odir, rdir, mtime, record in data["layers"]:
        if parent is not None:
            _id(parent)
        if not isinstance(short, str) or not isinstance(mtime, int) or not isinstance(record, (dict, type(None))):
            raise ValueError("bad layer entry")
        layers[_id(lid)] = LayerEntry(lid, parent, short, _within(root, odir), _within(root, rdir), mtime, record)
    images = {}
    for iid, top, names, rdir, record in data["images"]:
        if top is not None:
            _id(top)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("bad image names")
        if not isinstance(record, (dict, type(None))):
            raise ValueError("bad image record")
        images[_id(iid)] = ImageEntry(iid, top, tuple(names), _within(root, rdir), record)
    broken = {}
    for kind, eid, reason in data["broken"]:
        if kind not in ("layer", "image") or not isinstance(reason, str):
            raise ValueError("bad problem entry")
        broken[(kind, _id(eid))] = Problem(root, kind, eid, reason)
    sigs = {}
    for kind, eid, sig in data["sigs"]:
        if kind not in ("layer", "image") or not isinstance(sig, list):
            raise ValueError("bad signature entry")
        sigs[(kind, _id(eid))] = tuple(_sig(s) for s in sig)
    # retired ids are not saved: the first poll lists them (graftfs.share)
    return TreeScan(root, layers, images, broken, bool(data["remote_ro"]), frozenset(),
                    _dirs(root, data["overlay_dirs"]), _dirs(root, data["record_dirs"]),
                    _dirs(root, data["image_dirs"]), sigs)


def save(state_dir: str, scans: list[TreeScan]) -> None:
    """Write the snapshot atomically (a crash leaves the previous one or none)."""
    path = os.path.join(state_dir, FILE_NAME)
    body = {"version": VERSION, "trees": {s.root: scan_to_json(s) for s in scans}}
    write_file_atomically(path, json.dumps(body, separators=(",", ":")), mode=0o600)


def load(state_dir: str, roots: list[str]) -> dict[str, TreeScan]:
    """The saved scans of these trees; {} (a full scan) when missing or unusable."""
    path = os.path.join(state_dir, FILE_NAME)
    body = read_json_state(path, "scanning the shares in full")
    if not isinstance(body, dict):
        return {}
    out = {}
    try:
        if body.get("version") != VERSION:
            return {}
        trees = body["trees"]
        for root in roots:
            if root in trees:
                out[root] = scan_from_json(root, trees[root])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning("%s is damaged (%s): scanning the shares in full", path, e)
        return {}
    return out
