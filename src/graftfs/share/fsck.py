"""``graftfs fsck --share``: is every entry of a share whole, and is anything left lying around?

Entries are judged by the rules readers use (graftfs.format.records and the catalog's chain
checks), so a share with no problem is one every node shows in full. Entries a running publisher
or gc is working on (named by a live intent, or in a trash directory of the last minute) are
reported as "in progress", not as problems.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from graftfs.catalog.catalog import build_catalog
from graftfs.share.state import ShareState

#: A trash or staging directory this recent may belong to a gc or publish that is still running.
IN_PROGRESS_SECONDS = 60.0


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"problems": self.problems, "in_progress": self.in_progress, "counts": self.counts}


def check(share: str) -> Report:
    """Check a whole share (read-only; ShareError when it is not a share)."""
    state = ShareState.read(share)
    scan = state.scan
    out = Report()
    live = state.live_claims()
    claimed = {lid for c in live if c.kind == "intent" for lid in c.layers} | \
              {iid for c in live if c.kind == "intent" for iid in c.images}
    live_staging = {c.staging for c in live if c.staging}
    for (kind, eid), problem in sorted(scan.broken.items()):
        line = f"{kind} {eid}: incomplete ({problem.reason})"
        (out.in_progress if eid in claimed else out.problems).append(line)
    catalog = build_catalog([scan], set())
    for problem in catalog.layer_problems:
        out.problems.append(f"layer {problem.id}: {problem.reason}")
    for iid, image in sorted(scan.images.items()):
        if image.top_layer and image.top_layer not in catalog.layers:
            line = f"image {iid}: top layer {image.top_layer[:12]} is not a complete layer of the share"
            (out.in_progress if iid in claimed else out.problems).append(line)
    referenced = state.layers_of(scan.images)
    for lid in sorted(scan.layers.keys() - referenced):
        line = f"layer {lid}: no image uses it (orphan; `graftfs gc` removes it after its grace period)"
        (out.in_progress if lid in claimed else out.problems).append(line)
    for iid in sorted(state.retired_at.keys() - scan.images.keys()):
        out.problems.append(f"retired marker {iid}: no such image (stale; `graftfs gc` removes it)")
    for name, mtime in sorted(state.staging.items()):
        line = f"staging {name}: left by a publisher"
        recent = state.now - mtime < IN_PROGRESS_SECONDS
        (out.in_progress if name in live_staging or recent else out.problems).append(line)
    for name, mtime in sorted(state.trash.items()):
        line = f"trash {name}: left by a gc"
        (out.in_progress if state.now - mtime < IN_PROGRESS_SECONDS else out.problems).append(line)
    out.problems.extend(state.claim_problems)
    out.counts = {"layers": len(scan.layers), "images": len(scan.images), "retired": len(scan.retired),
                  "leases": sum(1 for c in state.claims if c.kind == "lease"),
                  "live_leases": sum(1 for c in live if c.kind == "lease"),
                  "intents": sum(1 for c in live if c.kind == "intent")}
    return out
