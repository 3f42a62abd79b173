"""Shared images this node deleted, seen as images again: what ``graftfs status`` lists and what
``graftfs unhide`` takes back.

Deleting a shared image on a node (``podman rmi``, iSulad's ``rmi``) leaves the share untouched
and records hides at the view paths the runtime removed: the image's record, each layer's
record, its ``overlay/<id>`` directory, its ``l/<short>`` link, its tar-split (graftfs.view.hides).
An operator thinks in images, not in those paths, so this module maps them back: an image counts
as hidden on this node when its record or any layer of its chain is hidden; giving it back takes
back every hide at or below the paths of the image and of those layers of its chain that the
node does not hold itself (a layer it pulled again since keeps its own copy, opaque as it is).
"""

from __future__ import annotations

from dataclasses import dataclass

from graftfs.catalog.catalog import Catalog, CatalogDiff
from graftfs.format.names import IMAGES, LAYERS, OVERLAY, SHORT_DIR, TAR_SPLIT_SUFFIX
from graftfs.format.records import walk_chain
from graftfs.format.refs import match_image_ref
from graftfs.view.layout import HideView, VPath


@dataclass(frozen=True)
class HiddenImage:
    """A shared image this node deleted (or one whose layers it deleted: it cannot run here)."""

    id: str
    names: tuple[str, ...]
    layers: int  # layers of its chain hidden on this node

    def as_dict(self) -> dict[str, object]:
        """As ``graftfs status --json`` lists it."""
        return {"id": self.id, "names": list(self.names), "layers": self.layers}


def image_layers(cat: Catalog, iid: str) -> list[str]:
    """The shared layers of an image's chain, top first (the chain stops where the share does)."""
    image = cat.images.get(iid)
    if image is None or image[1].top_layer is None:
        return []

    def parent(lid: str) -> str | None:
        entry = cat.layers.get(lid)
        return entry[1].parent if entry is not None else None

    return [lid for lid in walk_chain(image[1].top_layer, parent) if lid in cat.layers]


def layer_paths(cat: Catalog, lid: str) -> list[VPath]:
    """The view paths a shared layer shows at (each covers what is below it)."""
    paths: list[VPath] = [(LAYERS, lid), (LAYERS, lid + TAR_SPLIT_SUFFIX), (OVERLAY, lid)]
    entry = cat.layers.get(lid)
    if entry is not None and entry[1].short:
        paths.append((OVERLAY, SHORT_DIR, entry[1].short))
    return paths


def _layer_hidden(hides: HideView, lid: str) -> bool:
    """The runtime removes a layer's record and its directory: either hides it here."""
    return hides.covers((LAYERS, lid)) or hides.covers((OVERLAY, lid))


def hidden_images(cat: Catalog, hides: HideView) -> tuple[list[HiddenImage], int]:
    """The shared images hidden on this node, and how many shared layers are hidden in all."""
    hidden: list[HiddenImage] = []
    for iid, (_, image) in cat.images.items():
        layers = sum(1 for lid in image_layers(cat, iid) if _layer_hidden(hides, lid))
        if layers or hides.covers((IMAGES, iid)):
            hidden.append(HiddenImage(iid, image.names, layers))
    hidden.sort(key=lambda h: (h.names, h.id))
    return hidden, sum(1 for lid in cat.layers if _layer_hidden(hides, lid))


def match_hidden(cat: Catalog, hides: HideView, ref: str) -> list[str]:
    """The hidden shared images a user's reference (name, id or id prefix) names."""
    hidden, _ = hidden_images(cat, hides)
    return match_image_ref(ref, {h.id: h.names for h in hidden})


@dataclass(frozen=True)
class Unhiding:
    """What giving an image back touches: hides at or below ``prefixes``, the view names in ``diff``."""

    prefixes: list[VPath]
    diff: CatalogDiff

    def covers(self, vpath: VPath) -> bool:
        """Is ``vpath`` a hide this takes back (at or below one of the prefixes)?"""
        return any(vpath[: len(p)] == p for p in self.prefixes)


def unhiding(cat: Catalog, iid: str, own_layers: frozenset[str]) -> Unhiding:
    """The hides to take back to give shared image ``iid`` back to this node."""
    layers = [lid for lid in image_layers(cat, iid) if lid not in own_layers]
    prefixes: list[VPath] = [(IMAGES, iid)]
    for lid in layers:
        prefixes.extend(layer_paths(cat, lid))
    shorts = [cat.layers[lid][1].short for lid in layers if cat.layers[lid][1].short]
    # moved: the layers' diff/ and work/ may turn from merged directories back into links
    return Unhiding(prefixes, CatalogDiff(layers=layers, moved=list(layers), images=[iid], shorts=shorts))
