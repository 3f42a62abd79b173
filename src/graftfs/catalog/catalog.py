"""The catalog: the shared entries the view shows, built from every tree's scan.

Every part of graftfs that asks "which shared layers and images exist" asks a catalog: the
presenters in graftfs.view, the lease keeper, ``graftfs fsck``. A catalog is built from the
trees' scans (graftfs.catalog.scan) in the union's order (the first tree holding a complete
entry wins), keeps only layers whose whole parent chain is visible and images whose top layer is,
and is compared with the previous one (``diff_catalogs``) to tell exactly which entries changed.
A catalog is never changed once built: a new one replaces it, so readers in other threads always
see a consistent one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from graftfs.catalog.scan import EntryKey, TreeScan
from graftfs.format.records import ImageEntry, LayerEntry, Problem

log = logging.getLogger(__name__)


@dataclass
class Catalog:
    """The shared entries every RO tree contributes to the view, after the chain checks.

    ``layers``/``images`` map an id to (tree index, entry); the first tree that has a complete
    entry wins, which is the union's resolution order. A catalog is never changed once built:
    a new one replaces it, so readers in other threads always see a consistent one.
    """

    trees: list[str]
    layers: dict[str, tuple[int, LayerEntry]] = field(default_factory=dict)
    images: dict[str, tuple[int, ImageEntry]] = field(default_factory=dict)
    shorts: dict[str, tuple[int, LayerEntry]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    remote_ro: list[bool] = field(default_factory=list)
    layers_by_tree: list[list[str]] = field(default_factory=list)
    images_by_tree: list[list[str]] = field(default_factory=list)
    shorts_mtime_ns: int = 0  # newest link file: the times of the synthesized overlay/l
    layer_problems: list[Problem] = field(default_factory=list)  # broken chains
    layer_inputs: tuple[list[dict[str, LayerEntry]], frozenset[str]] | None = None  # what the layer half used

    def layer_ids_in(self, tree: int) -> list[str]:
        return self.layers_by_tree[tree] if tree < len(self.layers_by_tree) else []

    def image_ids_in(self, tree: int) -> list[str]:
        return self.images_by_tree[tree] if tree < len(self.images_by_tree) else []


def _chain_reasons(candidates: dict[str, LayerEntry], local: set[str],
                   known_good: Iterable[str] = ()) -> dict[str, str | None]:
    """For every candidate layer: why its parent chain is not visible, or None when it is.

    Each chain is walked once (results are shared along it), so 10,000 layers in deep images
    cost one pass, not one walk per layer.
    """
    result: dict[str, str | None] = dict.fromkeys(known_good)
    for lid in candidates:
        chain: list[str] = []
        on_chain: set[str] = set()
        cur: str | None = lid
        reason: str | None = None
        while cur is not None:
            if cur in result:
                reason = result[cur]
                break
            if cur in on_chain:
                reason = "parent chain loops"
                break
            entry = candidates.get(cur)
            if entry is None:
                reason = None if cur in local else f"parent layer {cur[:12]} is not visible"
                break
            chain.append(cur)
            on_chain.add(cur)
            cur = entry.parent
        for c in chain:
            result[c] = reason
    return result


def build_catalog(scans: Iterable[TreeScan], local_layers: set[str], old: Catalog | None = None) -> Catalog:
    """Combine per-tree scans into the view's catalog, dropping broken chains.

    ``local_layers`` are the layer ids the RW tree holds; a shared layer may sit on one of them.
    When no tree's layers changed since ``old`` (the same dictionaries, see TreeScan), the layer
    half of ``old`` is reused: publishing an image on known layers costs no layer work. Problems
    not already in ``old`` are logged (once, not at every rebuild).
    """
    scans = list(scans)
    cat = Catalog([s.root for s in scans], remote_ro=[s.remote_ro for s in scans])
    inputs = ([s.layers for s in scans], frozenset(local_layers))
    if old is not None and _same_inputs(old.layer_inputs, inputs):
        cat.layers, cat.layers_by_tree, cat.shorts = old.layers, old.layers_by_tree, old.shorts
        cat.shorts_mtime_ns, cat.layer_problems = old.shorts_mtime_ns, old.layer_problems
    elif old is None or not _add_layers(cat, old, scans, local_layers):
        _build_layers(cat, scans, local_layers)
    cat.layer_inputs = inputs
    cat.problems = [p for s in scans for p in s.problems] + cat.layer_problems
    cat.images_by_tree = [[] for _ in scans]
    for ti, scan in enumerate(scans):
        for iid, img in scan.images.items():
            if iid in cat.images or iid in scan.retired:
                continue  # first tree wins; a retired image is kept from new use (graftfs unpublish)
            top = img.top_layer
            if top is not None and top not in cat.layers and top not in local_layers:
                reason = f"top layer {top[:12]} is not visible"
                cat.problems.append(Problem(scan.root, "image", iid, reason))
                continue
            cat.images[iid] = (ti, img)
            cat.images_by_tree[ti].append(iid)
    known = set(old.problems) if old is not None else set()
    for p in cat.problems:
        if p not in known:
            log.warning("skipping %s %s in %s: %s", p.kind, p.id, p.tree, p.reason)
    return cat


def _same_inputs(a: tuple[list[dict[str, LayerEntry]], frozenset[str]] | None,
                 b: tuple[list[dict[str, LayerEntry]], frozenset[str]]) -> bool:
    if a is None or len(a[0]) != len(b[0]) or a[1] != b[1]:
        return False
    return all(x is y for x, y in zip(a[0], b[0], strict=True))


def _added_layers(old: Catalog, scans: list[TreeScan], local_layers: set[str]
                  ) -> dict[str, tuple[int, LayerEntry]] | None:
    """The layers that are new since ``old`` (first tree wins), or None when anything else changed
    (a layer gone or rewritten, the trees or the local layers different)."""
    if old.layer_inputs is None or len(old.layer_inputs[0]) != len(scans) or old.layer_inputs[1] != local_layers:
        return None
    added: dict[str, tuple[int, LayerEntry]] = {}
    for ti, (before, scan) in enumerate(zip(old.layer_inputs[0], scans, strict=True)):
        now = scan.layers
        if before.keys() - now.keys():
            return None
        for lid in now.keys() - before.keys():
            added.setdefault(lid, (ti, now[lid]))
        if any(now[lid] is not entry for lid, entry in before.items()):
            return None
    return added


def _add_layers(cat: Catalog, old: Catalog, scans: list[TreeScan], local_layers: set[str]) -> bool:
    """Extend ``old``'s layer half with newly published layers; False when a full build is needed.

    Adding layers never hides a visible one, so only the new layers and the ones whose chain was
    broken before need their chains walked: publishing into a 10,000-layer share stays cheap.
    """
    added = _added_layers(old, scans, local_layers)
    waiting = {p.id: p for p in old.layer_problems}
    if added is None or any(lid in old.layers or lid in waiting for lid in added):
        return False  # an id in several trees: which tree wins is the full build's business
    candidates: dict[str, tuple[int, LayerEntry]] = dict(added)
    for lid, problem in waiting.items():
        for ti, scan in enumerate(scans):
            if scan.root == problem.tree and lid in scan.layers:
                candidates.setdefault(lid, (ti, scan.layers[lid]))
    flat = {lid: e for lid, (_, e) in candidates.items()}
    visible = {lid: e for lid, (_, e) in old.layers.items()}
    reasons = _chain_reasons(flat, local_layers, known_good=visible.keys())
    cat.layers = dict(old.layers)
    cat.layers_by_tree = [list(ids) for ids in old.layers_by_tree]
    cat.shorts = dict(old.shorts)
    cat.shorts_mtime_ns = old.shorts_mtime_ns
    for lid, (ti, entry) in candidates.items():
        _place_layer(cat, scans, lid, ti, entry, reasons[lid])
    return True


def _place_layer(cat: Catalog, scans: list[TreeScan], lid: str, ti: int, entry: LayerEntry, reason: str | None) -> None:
    if reason is None:
        cat.layers[lid] = (ti, entry)
        cat.layers_by_tree[ti].append(lid)
        cat.shorts.setdefault(entry.short, (ti, entry))
        if entry.mtime_ns > cat.shorts_mtime_ns:
            cat.shorts_mtime_ns = entry.mtime_ns
    else:
        cat.layer_problems.append(Problem(scans[ti].root, "layer", lid, reason))


def _build_layers(cat: Catalog, scans: list[TreeScan], local_layers: set[str]) -> None:
    """The layer half of the catalog: first tree wins, then every chain must be visible."""
    candidates: dict[str, tuple[int, LayerEntry]] = {}
    for ti, scan in enumerate(scans):
        for lid, entry in scan.layers.items():
            candidates.setdefault(lid, (ti, entry))
    reasons = _chain_reasons({lid: e for lid, (_, e) in candidates.items()}, local_layers)
    cat.layers_by_tree = [[] for _ in scans]
    for lid, (ti, entry) in candidates.items():
        _place_layer(cat, scans, lid, ti, entry, reasons[lid])


@dataclass
class CatalogDiff:
    """What differs between two catalogs, by entry: the view turns it into names to re-check."""

    layers: list[str] = field(default_factory=list)  # added, removed or changed
    moved: list[str] = field(default_factory=list)  # layers another tree holds now (a pin, an unpin)
    images: list[str] = field(default_factory=list)
    shorts: list[str] = field(default_factory=list)  # short link names added, removed or changed
    top_names: set[str] = field(default_factory=set)  # names at some tree's top that changed
    managed: set[str] = field(default_factory=set)  # managed directories re-listed in some tree

    def __bool__(self) -> bool:
        return bool(self.layers or self.images or self.shorts or self.top_names or self.managed)


def diff_catalogs(old: Catalog, new: Catalog, touched: Iterable[EntryKey] = ()) -> CatalogDiff:
    """The entries that differ between two catalogs (plus ``touched`` ones, changed in place)."""
    touched = set(touched)
    diff = CatalogDiff()
    diff.layers = _changed(old.layers, new.layers, {eid for kind, eid in touched if kind == "layer"})
    for lid in diff.layers:
        before, now = old.layers.get(lid), new.layers.get(lid)
        if before is not None and now is not None and before[0] != now[0]:
            diff.moved.append(lid)
    diff.images = _changed(old.images, new.images, {eid for kind, eid in touched if kind == "image"})
    diff.shorts = _changed(old.shorts, new.shorts, set())
    return diff


def _changed(old: Mapping[str, object], new: Mapping[str, object], touched: set[str]) -> list[str]:
    """Keys added, removed, or whose value differs, plus ``touched`` ones."""
    if old is new:
        return [k for k in touched if k in old]
    out = [k for k, v in new.items() if old.get(k) != v]
    out += [k for k in old if k not in new]
    out += [k for k in touched if k in old or k in new]
    return list(dict.fromkeys(out))
