"""Leases and intents: what nodes and publishers are using, written into the share for ``gc``.

A *lease* says "this node's containers (or pins) use these shared layers and images". Each
mounted node rewrites its own ``.graftfs-nodes/<node>/lease.json`` when that set changes and at
least every lease period; the file's mtime, stamped by the share's server, is when it was last
renewed, and it counts for the TTL it names. A node that dies stops renewing and its lease lapses:
``gc`` needs no word from it.

An *intent* says "a publisher is about to reference these layers": written before the publisher
looks at what the share already has, renewed while it copies, removed when it is done. ``gc``
re-reads intents after moving entries out of view and puts back anything an intent names, so a
layer found "already published" by a publisher is never deleted under it.

Both are single-writer files placed by rename: nobody ever takes a lock on the share.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from graftfs.format.atomic import write_file_atomically
from graftfs.format.names import (
    CONTAINERS_JSON,
    IMAGES_JSON,
    INTENTS_DIR,
    LAYERS_JSON,
    LEASE_FILE,
    MARKER_NAME,
    NODES_DIR,
    is_id,
)
from graftfs.format.records import MAX_RECORD_BYTES, id_list, parse_json, read_index, read_limited, walk_chain

log = logging.getLogger(__name__)

#: How often a mounted node renews its lease by default (``-o lease=SECONDS``).
DEFAULT_LEASE_PERIOD = 30.0
#: A lease counts for this many periods: a node may miss a few renewals (a slow share) first.
TTL_PERIODS = 4
#: A publisher renews its intent this often, and it counts for INTENT_TTL after the last renewal.
INTENT_RENEW = 10.0
INTENT_TTL = 120.0
#: Node names are file names in the share.
NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NODE_ID_FILE = "node-id"


@dataclass(frozen=True)
class Claim:
    """A lease or an intent as read back: who, when renewed (share clock), for how long, what."""

    kind: str  # "lease", "intent", or "local" (a node's own use, for its pin tree)
    owner: str  # node name, or the intent's id
    path: str
    renewed: float  # mtime of the file
    ttl: float
    layers: frozenset[str]
    images: frozenset[str]
    pins: frozenset[str] = frozenset()
    #: layers the node holds copies of itself that this share holds too (a node that published
    #: them keeps its own): what the share does not save
    held: frozenset[str] = frozenset()
    staging: str = ""  # an intent's staging directory name
    host: str = ""

    def live(self, now: float) -> bool:
        return now - self.renewed <= self.ttl


def node_id(state_dir: str) -> str:
    """This node's name in shares: kept in the RW tree's state dir, made once (host name plus a
    random part, so two graphs on one host, or two hosts with one name, never share a lease)."""
    path = os.path.join(state_dir, NODE_ID_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            name = f.read().strip()
        if NODE_RE.match(name):
            return name
        log.warning("%s holds an unusable node name %r: making a new one", path, name[:80])
    except FileNotFoundError:
        pass
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:100] or "node"
    name = f"{host}-{uuid.uuid4().hex[:8]}"
    write_file_atomically(path, name + "\n")
    return name


class NoMarker(FileNotFoundError):
    """The share has no marker file: nothing was ever published to it, or it is not mounted."""


def write_lease(share: str, node: str, ttl: float, layers: Iterable[str], images: Iterable[str],
                pins: Iterable[str] = (), held: Iterable[str] = ()) -> str:
    """Renew this node's lease in one share (blocking I/O on a share: worker threads only).

    Only into a share whose marker is there: never into the empty directory of an NFS export
    that is not mounted (or a share moved away), which would then look like a share."""
    if not os.path.exists(os.path.join(share, MARKER_NAME)):
        raise NoMarker(errno.ENOENT, f"no {MARKER_NAME} marker (share not mounted?)", share)
    directory = os.path.join(share, NODES_DIR, node)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LEASE_FILE)
    body = {"node": node, "host": socket.gethostname(), "ttl": ttl, "written": time.time(),
            "layers": sorted(layers), "images": sorted(images), "pins": sorted(pins), "held": sorted(held)}
    write_file_atomically(path, json.dumps(body, separators=(",", ":")))
    return path


def _read_claim(kind: str, owner: str, path: str) -> Claim:
    """Parse one lease or intent file; ValueError naming what is wrong."""
    st = os.stat(path)
    data = read_limited(path, MAX_RECORD_BYTES)
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
    body = parse_json(data, os.path.basename(path))
    if not isinstance(body, dict):
        raise ValueError("is not a JSON object")
    ttl = body.get("ttl")
    if not isinstance(ttl, (int, float)) or not 0 < ttl <= 30 * 86400:
        raise ValueError(f"ttl {str(ttl)[:20]!r} is not a number of seconds")
    staging = body.get("staging", "")
    return Claim(kind, owner, path, st.st_mtime, float(ttl), id_list(body.get("layers", [])),
                 id_list(body.get("images", [])), id_list(body.get("pins", [])), id_list(body.get("held", [])),
                 staging if isinstance(staging, str) else "", str(body.get("host", ""))[:200])


def read_claims(share: str) -> tuple[list[Claim], list[str]]:
    """Every lease and intent in a share, and a line per file that could not be used.

    An unreadable claim is reported, never taken as "nothing in use" silently: ``gc`` refuses to
    run while one exists (it might protect what gc would delete)."""
    claims: list[Claim] = []
    problems: list[str] = []
    nodes_dir = os.path.join(share, NODES_DIR)
    for node in _listdir(nodes_dir):
        path = os.path.join(nodes_dir, node, LEASE_FILE)
        if not NODE_RE.match(node) or not os.path.exists(path):
            continue
        try:
            claims.append(_read_claim("lease", node, path))
        except (OSError, ValueError) as e:
            problems.append(f"lease of node {node}: {getattr(e, 'strerror', None) or e}")
    intents_dir = os.path.join(share, INTENTS_DIR)
    for name in _listdir(intents_dir):
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(intents_dir, name)
        try:
            claims.append(_read_claim("intent", name[:-5], path))
        except FileNotFoundError:
            continue  # its publisher finished meanwhile
        except (OSError, ValueError) as e:
            problems.append(f"publish intent {name}: {getattr(e, 'strerror', None) or e}")
    return claims, problems


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


class Intent:
    """A publisher's promise, held for the time it publishes (see the module docstring)."""

    def __init__(self, share: str, layers: Iterable[str], images: Iterable[str], staging: str) -> None:
        os.makedirs(os.path.join(share, INTENTS_DIR), exist_ok=True)
        self.path = os.path.join(share, INTENTS_DIR, f"{uuid.uuid4().hex}.json")
        body = {"host": socket.gethostname(), "pid": os.getpid(), "ttl": INTENT_TTL, "staging": staging,
                "layers": sorted(layers), "images": sorted(images)}
        write_file_atomically(self.path, json.dumps(body))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="graftfs-intent", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(INTENT_RENEW):
            try:
                os.utime(self.path)
            except OSError as e:
                log.warning("cannot renew the publish intent %s: %s", self.path, e.strerror)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@contextlib.contextmanager
def intent(share: str, layers: Iterable[str], images: Iterable[str], staging: str) -> Iterator[Intent]:
    held = Intent(share, layers, images, staging)
    try:
        yield held
    finally:
        held.close()


# -- what a node uses, from the runtime's own state in its RW tree ---------------------------------

def in_use(rw_root: str, shared_parents: Mapping[str, str | None], shared_tops: Mapping[str, str | None],
           pinned: Iterable[str] = ()) -> tuple[set[str], set[str]]:
    """The shared layers and images this node uses: every ancestor of the node's own layers
    (container layers, layers of images built or pulled here), the images its containers were
    made from with their layers, and pinned images. ``shared_parents`` maps each shared layer to
    its parent, ``shared_tops`` each shared image to its top layer. ValueError when one of the
    runtime's files does not parse (the caller keeps the lease it had)."""
    layers = read_index(os.path.join(rw_root, *LAYERS_JSON))
    images = read_index(os.path.join(rw_root, *IMAGES_JSON))
    containers = read_index(os.path.join(rw_root, *CONTAINERS_JSON))
    # what the node holds itself (its own copy of a layer or image it also published) needs no lease
    local_parent = {str(r.get("id")): r.get("parent") for r in layers}
    local_images = {str(i.get("id")) for i in images}
    # a container's image counts even when the share retired it (it is then in no catalog)
    used_images = {str(c.get("image")) for c in containers}
    used_images = {i for i in used_images if is_id(i)}
    used_images |= {i for i in pinned if i in shared_tops}
    used_images -= local_images
    starts: list[object] = [r.get("parent") for r in layers]
    starts += [i.get("layer") for i in images]  # local images on shared layers (pulled or built here)
    starts += [c.get("layer") for c in containers]
    starts += [shared_tops.get(i) for i in used_images]

    def parent_of(lid: str) -> str | None:
        parent = local_parent[lid] if lid in local_parent else shared_parents.get(lid)
        return parent if isinstance(parent, str) else None

    used_layers: set[str] = set()
    for start in starts:
        for lid in walk_chain(start if isinstance(start, str) else None, parent_of):
            if lid in used_layers:
                break  # its ancestors are counted already
            if lid not in local_parent and lid in shared_parents:
                used_layers.add(lid)
    return used_layers, used_images
