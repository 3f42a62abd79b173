"""The shared trees' complete entries: scanned, polled, built into a catalog, diffed.

``scan`` reads one tree entry by entry; ``tree`` keeps one tree's scan current and knows whether
it answers; ``catalog`` combines the trees' scans under the union's rules (complete entries,
visible chains) and tells what changed; ``live`` is the catalog a mount keeps current;
``scan_cache`` keeps the scans between mounts. No FUSE, no view: the share tools use it too.
"""
