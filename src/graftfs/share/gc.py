"""Retiring images and collecting what nothing uses any more, without ever pulling a layer out
from under a running container or a publisher.

``unpublish`` only writes a marker (``.graftfs-retired/<id>``): mounted nodes stop showing the
image within their watcher's latency, and nothing is deleted. ``collect`` (``graftfs gc``) then
deletes a retired image, and the layers no published image needs, only when

* no live lease names them (a node's running container, a local image built on them, a pin),
* no live publish intent names them (a publisher that found them "already published"),
* the retirement is older than the longest live lease TTL (every node has renewed its lease
  since it stopped showing the image, so a container made just before counts).

Each entry is moved out of view by renames into ``.graftfs-trash/<run>/`` (record first, so a
reader sees it incomplete, never half-deleted), then claims are read *again* and anything a
claim now names is put back; only then is the trash deleted. Entries left by killed publishers
(incomplete entries, layers no image references, staging directories) are collected once older
than a grace period, under the same rules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from graftfs.format.atomic import write_file_atomically
from graftfs.format.names import RETIRED_DIR, STAGING_DIR, TRASH_DIR
from graftfs.format.records import walk_chain
from graftfs.share.state import ShareError, ShareState

log = logging.getLogger(__name__)

#: Debris (staging dirs, incomplete or unreferenced entries) younger than this is left alone.
DEFAULT_GRACE = 3600.0


@dataclass
class Retired:
    id: str
    names: list[str]
    status: str  # "retired" or "already retired"


def unpublish(share: str, refs: list[str]) -> list[Retired]:
    """Retire images (by id, unique prefix or name); ShareError when a ref matches none or several."""
    state = ShareState.read(share)
    chosen: list[str] = []
    for ref in refs:
        found = state.find_images(ref)
        if not found:
            raise ShareError(f"no image {ref!r} in {share}")
        if len(found) > 1:
            raise ShareError(f"{ref!r} matches {len(found)} images in {share}; give the full id")
        chosen.append(found[0])
    os.makedirs(os.path.join(share, RETIRED_DIR), exist_ok=True)
    out = []
    for iid in dict.fromkeys(chosen):
        names = state.names_of(iid)
        if iid in state.scan.retired:
            out.append(Retired(iid, names, "already retired"))
            continue
        body = {"id": iid, "names": names, "retired": time.time(), "host": socket.gethostname()}
        write_file_atomically(os.path.join(share, RETIRED_DIR, iid), json.dumps(body) + "\n")
        out.append(Retired(iid, names, "retired"))
    return out


def reinstate(share: str, iid: str) -> bool:
    """Publishing a retired image again takes its retirement back; True when there was one."""
    try:
        os.unlink(os.path.join(share, RETIRED_DIR, iid))
    except FileNotFoundError:
        return False
    return True


@dataclass(frozen=True, order=True)
class Ref:
    """An entry gc talks about: ``layer``, ``image`` or ``staging``, and its id or name."""

    kind: str
    id: str

    def __str__(self) -> str:
        return f"{self.kind} {self.id}"

    def short(self) -> str:
        """As a person reads it in a list: the kind and the id's first 12 characters."""
        return f"{self.kind} {self.id[:12]}"


@dataclass
class Plan:
    """What one gc run deletes, and why the retired things it keeps are kept."""

    images: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # children before parents
    debris: list[Ref] = field(default_factory=list)  # entries left by killed publishers
    staging: list[str] = field(default_factory=list)
    old_trash: list[str] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)  # retirements of images no longer in the share
    kept: dict[Ref, str] = field(default_factory=dict)  # retired entries that stay -> why
    bytes: int = 0
    restored: list[Ref] = field(default_factory=list)  # moved out, then put back: claimed meanwhile

    def as_dict(self) -> dict[str, object]:
        """The plan as ``graftfs gc --json`` prints it (entries as "kind id")."""
        return {"images": self.images, "layers": self.layers, "debris": [str(r) for r in self.debris],
                "staging": self.staging, "old_trash": self.old_trash, "markers": self.markers,
                "kept": {str(r): why for r, why in self.kept.items()}, "bytes": self.bytes,
                "restored": [str(r) for r in self.restored]}

    def deletes(self) -> list[Ref]:
        """Every entry this plan deletes (after a run: that were not put back), each once."""
        refs = [Ref("image", i) for i in self.images] + [Ref("layer", lid) for lid in self.layers]
        refs += [r for r in self.debris if r not in refs]
        return [r for r in refs if r not in self.restored]


def _claimed(state: ShareState) -> tuple[set[str], set[str], dict[str, str], set[str]]:
    """Layers and images named by live claims (with who claims each), and live staging dirs."""
    layers: set[str] = set()
    images: set[str] = set()
    who: dict[str, str] = {}
    staging: set[str] = set()
    for c in state.live_claims():
        label = {"lease": f"leased by node {c.owner}", "local": "used by this node's containers"}.get(
            c.kind, f"named by a running publish ({c.owner[:8]})")
        for iid in c.images | c.pins:
            images.add(iid)
            who.setdefault(iid, label)
        for lid in c.layers | state.layers_of(c.images | c.pins):
            for anc in state.chain(lid) or [lid]:
                layers.add(anc)
                who.setdefault(anc, label)
        if c.staging:
            staging.add(c.staging)
    return layers, images, who, staging


def plan(state: ShareState, grace: float = DEFAULT_GRACE, settle: float | None = None) -> Plan:
    """Decide what a gc run deletes (no I/O beyond what ``state`` holds). ``settle``: how old a
    retirement must be (default: the longest live lease TTL, see the module docstring)."""
    out = Plan()
    claimed_layers, claimed_images, who, live_staging = _claimed(state)
    if settle is None:
        settle = max((c.ttl for c in state.live_claims() if c.kind == "lease"), default=0.0)
    out.images = _doomed_images(state, claimed_images, who, settle, out.kept)
    candidates = _retired_layers(state, out.images, claimed_layers, who, out.kept)
    candidates |= _debris(state, claimed_layers, claimed_images, grace, out.debris)
    depth = {lid: len(state.chain(lid)) for lid in candidates}
    out.layers = sorted(candidates, key=lambda lid: -depth[lid])
    out.bytes = sum(state.layer_bytes(lid) for lid in out.layers)
    out.staging = [n for n, mtime in state.staging.items() if n not in live_staging and state.now - mtime > grace]
    out.old_trash = [n for n, mtime in state.trash.items() if state.now - mtime > grace]
    out.markers = [i for i in state.retired_at if i not in state.scan.images or i in out.images]
    return out


def _doomed_images(state: ShareState, claimed: set[str], who: dict[str, str], settle: float,
                   kept: dict[Ref, str]) -> list[str]:
    """Retired images no claim names, retired long enough ago; ``kept`` says why the rest stay."""
    doomed = []
    for iid in state.scan.images.keys() & state.scan.retired:
        age = state.now - state.retired_at.get(iid, state.now)
        if iid in claimed:
            kept[Ref("image", iid)] = who[iid]
        elif age < settle:
            kept[Ref("image", iid)] = f"retired {age:.0f} s ago; nodes renew leases within {settle:.0f} s"
        else:
            doomed.append(iid)
    return sorted(doomed)


def _retired_layers(state: ShareState, doomed: list[str], claimed: set[str], who: dict[str, str],
                    kept: dict[Ref, str]) -> set[str]:
    """The doomed images' layers that no other image and no claim needs."""
    needed = state.layers_of(i for i in state.scan.images if i not in doomed) | claimed
    candidates = state.layers_of(doomed) - needed
    published = state.layers_of(state.published())
    for lid in state.layers_of(state.scan.images.keys() & state.scan.retired) - candidates:
        if lid in claimed:
            kept[Ref("layer", lid)] = who[lid]
        elif lid in published:
            kept[Ref("layer", lid)] = "used by a published image"
    return candidates


def _debris(state: ShareState, claimed_layers: set[str], claimed_images: set[str], grace: float,
            debris: list[Ref]) -> set[str]:
    """What killed publishers left: complete layers no image references (returned, to delete
    with the others) and incomplete entries (listed in ``debris``), older than ``grace``. An
    entry placed in the very clock tick the share's time was read in is never old enough."""
    scan = state.scan
    referenced = state.layers_of(scan.images)
    orphans = {lid for lid in scan.layers
               if lid not in referenced and lid not in claimed_layers and state.entry_age("layer", lid) > grace}
    debris.extend(Ref("layer", lid) for lid in sorted(orphans))
    for kind, eid in sorted(scan.broken):
        if (kind == "layer" and eid in claimed_layers) or (kind == "image" and eid in claimed_images):
            continue
        if state.entry_age(kind, eid) > grace:
            debris.append(Ref(kind, eid))
    return orphans


class Collector:
    """Carries out a plan: move out of view, re-check the claims, put back, delete."""

    def __init__(self, state: ShareState, say: Callable[[str], None],
                 settled: Callable[[list[str]], None] | None = None) -> None:
        self.state = state
        self.say = say
        #: called with the layer ids once their records are out of view, before their files go:
        #: a mount whose view falls back to another copy (an unpinned layer) waits for it there
        self.settled = settled
        self.run_dir = os.path.join(state.root, TRASH_DIR, f"gc-{uuid.uuid4().hex}")
        self.moved: list[tuple[Ref, str, str]] = []  # (entry, original path, trash path)
        self.doomed: set[str] = set()

    def run(self, p: Plan) -> None:
        self.doomed = set(p.images)
        os.makedirs(self.run_dir)
        entries = [(ref, self.state.entry_paths(ref.kind, ref.id)) for ref in p.deletes()]
        entries += [(Ref("staging", name), [os.path.join(self.state.root, STAGING_DIR, name)]) for name in p.staging]
        try:
            # first what makes each entry invisible (image dirs, layer records), then the rest
            for what, paths in entries:
                self._move(what, paths[:1])
            if self.settled is not None and p.layers:
                self.settled(p.layers)
            for what, paths in entries:
                self._move(what, paths[1:])
            p.restored = self._put_back_claimed()
            for name in p.old_trash:
                shutil.rmtree(os.path.join(self.state.root, TRASH_DIR, name), ignore_errors=True)
            for iid in p.markers:
                if Ref("image", iid) not in p.restored:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.state.root, RETIRED_DIR, iid))
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _move(self, what: Ref, paths: list[str]) -> None:
        for path in paths:
            label = f"{os.path.basename(os.path.dirname(path))}-{os.path.basename(path)[:12]}"
            dst = os.path.join(self.run_dir, f"{len(self.moved)}-{label}")
            try:
                os.rename(path, dst)
            except FileNotFoundError:
                continue  # already gone (another gc, or never there)
            self.moved.append((what, path, dst))

    def _put_back_claimed(self) -> list[Ref]:
        """Put back (parents first) what was claimed, or placed as an image, while entries moved:
        a publisher that found a layer "already published" may have finished, intent gone, by
        now; its image record, placed last, then names the layer instead."""
        fresh = ShareState.read(self.state.root, writable=True)
        layers, images, _, _ = _claimed(fresh)
        images |= fresh.scan.images.keys()
        # a retired image published again meanwhile: its publisher took the retirement back
        images |= {i for i in self.doomed if i not in fresh.scan.retired}
        # moved layers are not in the fresh scan and new ones not in the first: follow parents
        # through both
        parents = {lid: e.parent for lid, e in self.state.scan.layers.items()}
        parents.update({lid: e.parent for lid, e in fresh.scan.layers.items()})
        tops = {iid: e.top_layer for iid, e in {**self.state.scan.images, **fresh.scan.images}.items()}
        wanted: set[str] = set(images)
        for start in layers | {tops.get(i) for i in images}:
            for lid in walk_chain(start, parents.get):
                if lid in wanted:
                    break  # its ancestors are in already
                wanted.add(lid)
        restored: list[Ref] = []
        for what, path, dst in reversed(self.moved):
            if what.id not in wanted:
                continue
            try:
                os.rename(dst, path)
            except OSError:
                continue  # a publisher placed it anew meanwhile: theirs stays, this copy goes
            if what not in restored:
                restored.append(what)
                self.say(f"kept {what}: claimed while gc ran")
        return restored


def collect(share: str, dry_run: bool = False, grace: float = DEFAULT_GRACE,
            say: Callable[[str], None] = lambda line: None) -> Plan:
    """One gc run (see the module docstring); ShareError when the share or a claim is unusable."""
    state = ShareState.read(share, writable=not dry_run)
    if state.claim_problems:
        raise ShareError("refusing to collect while a claim cannot be read (it may protect what gc would "
                         f"delete): {state.claim_problems[0]}")
    p = plan(state, grace)
    if not dry_run:
        Collector(state, say).run(p)
    return p
