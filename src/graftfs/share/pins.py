"""Pins: a node's own copies of shared images, so it can start containers while the share is out.

A node's pin tree, ``RW/.graftfs/pins``, is shaped like a share and mounted as the *first* shared
tree of a containers-storage mount: its entries win over the same ids in a share (entries are
content-addressed, so the view does not change, only where the bytes come from), the view lists
each image once, and a pinned image keeps working when the share does not answer. Containers made
from a pinned image run on the local copy.

``pin`` publishes the image from the mounted graph into the pin tree (the publisher's staging,
intents and atomic renames, copying from the share through the layer links); ``unpin`` retires it
there and collects what no other pin and none of this node's containers use (gc's rules, with
this node's use as its only lease).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from graftfs.format.names import MARKER_NAME, STATE_DIR
from graftfs.format.records import graph_layer_ids
from graftfs.share.gc import Collector, Plan, plan, unpublish
from graftfs.share.leases import Claim, in_use
from graftfs.share.publish import Graph, ImageResult, Meter, Progress, Publisher
from graftfs.share.state import ShareError, ShareState

PINS_DIR = "pins"
PIN_MARKER_TEXT = "graftfs pin tree v1\n"


def pin_tree(rw_root: str) -> str:
    return os.path.join(rw_root, STATE_DIR, PINS_DIR)


def ensure_pin_tree(rw_root: str) -> str:
    """Create the node's pin tree (with its marker) if it does not exist yet; return its path."""
    path = pin_tree(rw_root)
    os.makedirs(path, mode=0o700, exist_ok=True)
    marker = os.path.join(path, MARKER_NAME)
    if not os.path.exists(marker):
        with open(marker, "w", encoding="utf-8") as f:
            f.write(PIN_MARKER_TEXT)
    return path


def node_use(rw_root: str, state: ShareState) -> tuple[set[str], set[str]]:
    """What this node's containers and own images use of a tree's layers (its lease there)."""
    parents = {lid: e.parent for lid, e in state.scan.layers.items()}
    tops = {iid: e.top_layer for iid, e in state.scan.images.items()}
    return in_use(rw_root, parents, tops)


def pin(mountpoint: str, rw_root: str, refs: list[str], progress: Progress | None = None,
        meter: Meter | None = None) -> list[ImageResult]:
    """Copy images of a mounted graph into the node's pin tree (layers the node holds itself
    are not copied). PublishError when an image cannot be found or copied."""
    tree = ensure_pin_tree(rw_root)
    graph = Graph.load(mountpoint)
    local = graph_layer_ids(rw_root)
    return [Publisher(graph, tree, progress, meter, local=local).publish(ref) for ref in refs]


def unpin(rw_root: str, refs: list[str], say: Callable[[str], None],
          settled: Callable[[list[str]], None] | None = None) -> Plan:
    """Retire pinned images in the pin tree and delete what nothing else on this node uses."""
    tree = pin_tree(rw_root)
    if not os.path.isdir(tree):
        raise ShareError("this node has no pinned images")
    unpublish(tree, refs)
    return collect_pins(rw_root, say, settled)


def collect_pins(rw_root: str, say: Callable[[str], None],
                 settled: Callable[[list[str]], None] | None = None) -> Plan:
    """gc of the pin tree: this node's use is the only lease, and nothing waits for other nodes.
    ``settled`` waits until the mount's view no longer uses the copies about to go (it falls
    back to the share's copy, or drops the layer), see gc.Collector."""
    tree = pin_tree(rw_root)
    state = ShareState.read(tree, writable=True)
    layers, images = node_use(rw_root, state)
    state.claims = [_local_claim(state.now, layers, images)]
    p = plan(state, grace=0.0, settle=0.0)
    p.staging = []  # a pin running right now has its staging there
    Collector(state, say, settled).run(p)
    return p


def _local_claim(now: float, layers: set[str], images: set[str]) -> Claim:
    return Claim("local", "this node", "", now, 1.0, frozenset(layers), frozenset(images))


#: How long the copies of unpinned layers wait for the view to let go of them.
SETTLE_SECONDS = 5.0


def wait_until(view_uses: Callable[[str], bool], lids: list[str], seconds: float = SETTLE_SECONDS) -> None:
    """Poll until no layer in ``lids`` is used by the view any more (or give up after ``seconds``:
    a reader then sees the layer missing for a moment, as after any gc)."""
    deadline = time.monotonic() + seconds
    waiting = list(lids)
    while waiting and time.monotonic() < deadline:
        waiting = [lid for lid in waiting if view_uses(lid)]
        if waiting:
            time.sleep(0.05)
