"""``graftfs status --share``: what a share holds, who uses it, and the storage sharing saves.

Sizes are the layers' own records (``diff-size``, the uncompressed layer as the runtime
measured it), so the figures cost one scan of records, not a walk of every file.
"""

from __future__ import annotations

from typing import Any

from graftfs.share.state import ShareState


def share_stats(share: str) -> dict[str, Any]:
    state = ShareState.read(share)
    scan = state.scan
    published = state.published()
    stored = sum(state.layer_bytes(lid) for lid in scan.layers)
    published_bytes = sum(state.layer_bytes(lid) for lid in state.layers_of(published))
    nodes = []
    for c in sorted(state.claims, key=lambda c: c.owner):
        if c.kind != "lease":
            continue
        used = set(c.layers) | state.layers_of(c.images | c.pins)
        nodes.append({"node": c.owner, "host": c.host, "live": c.live(state.now),
                      "renewed_ago": round(state.now - c.renewed, 1), "ttl": c.ttl,
                      "layers": len(used & scan.layers.keys()), "images": len(c.images), "pins": len(c.pins),
                      "bytes": sum(state.layer_bytes(lid) for lid in used),
                      "held_bytes": sum(state.layer_bytes(lid) for lid in c.held & scan.layers.keys())})
    live = [n for n in nodes if n["live"]]
    # without the share, every node that mounts it would keep its own copy of every image it can run;
    # with it, the share's copy plus the copies nodes keep of layers they published themselves
    without = published_bytes * len(live)
    held = sum(state.layer_bytes(lid) for c in state.claims if c.kind == "lease" and c.live(state.now)
               for lid in c.held & scan.layers.keys())
    return {"share": share, "images": len(published), "retired": len(scan.retired & scan.images.keys()),
            "layers": len(scan.layers), "incomplete": len(scan.broken),
            "bytes_stored": stored, "bytes_published": published_bytes,
            "nodes": nodes, "live_nodes": len(live),
            "bytes_without_sharing": without, "bytes_held_by_nodes": held,
            "bytes_saved": max(0, without - stored - held),
            "unsized_layers": sum(1 for lid in scan.layers if state.layer_bytes(lid) == 0),
            "intents": sum(1 for c in state.live_claims() if c.kind == "intent"),
            "claim_problems": state.claim_problems}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_stats(st: dict[str, Any]) -> str:
    lines = [f"share {st['share']}: {st['images']} images ({st['retired']} retired), {st['layers']} layers"
             + (f", {st['incomplete']} incomplete entries" if st["incomplete"] else ""),
             f"  stored once:      {_size(st['bytes_stored'])}"
             + (f" ({st['unsized_layers']} layers without a recorded size)" if st["unsized_layers"] else ""),
             f"  without sharing:  {_size(st['bytes_without_sharing'])} "
             f"({st['live_nodes']} live nodes x {_size(st['bytes_published'])} of published images)",
             f"  kept by nodes:    {_size(st['bytes_held_by_nodes'])} (their own copies of layers they published)",
             f"  saved:            {_size(st['bytes_saved'])}"]
    if st["intents"]:
        lines.append(f"  publishes running: {st['intents']}")
    lines.append("nodes (leases):")
    for n in st["nodes"]:
        state = "live" if n["live"] else "EXPIRED"
        lines.append(f"  {n['node']} ({n['host']}): {state}, renewed {n['renewed_ago']:.0f} s ago "
                     f"(ttl {n['ttl']:.0f} s), uses {n['layers']} layers / {_size(n['bytes'])}, "
                     f"{n['images']} images, {n['pins']} pins, keeps {_size(n['held_bytes'])} of its own")
    if not st["nodes"]:
        lines.append("  none")
    lines.extend(f"  unreadable: {p}" for p in st["claim_problems"])
    return "\n".join(lines)
