"""One read of a whole share, as ``gc``, ``fsck``, ``unpublish`` and ``status --share`` need it.

The entries are judged by the same code readers use (graftfs.format.records, graftfs.catalog.scan), so "complete"
means here exactly what it means to a mounted node. Times are compared with the *share's* clock
(the mtime of a file just written there), not this host's: leases are stamped by the server too.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from graftfs.catalog.scan import TreeScan, scan_tree
from graftfs.format.names import IMAGES, LAYERS, MARKER_NAME, OVERLAY, RETIRED_DIR, STAGING_DIR, TRASH_DIR, is_id
from graftfs.format.records import layer_chain, record_names
from graftfs.format.refs import match_image_ref
from graftfs.share.leases import Claim, read_claims


class ShareError(Exception):
    """The share cannot be worked on; the message is the one line the user sees."""


@dataclass
class ShareState:
    root: str
    scan: TreeScan
    claims: list[Claim]
    claim_problems: list[str]
    now: float  # the share's clock
    retired_at: dict[str, float] = field(default_factory=dict)  # image id -> mtime of its marker
    staging: dict[str, float] = field(default_factory=dict)  # staging dir name -> mtime
    trash: dict[str, float] = field(default_factory=dict)  # trash run dir name -> mtime

    @classmethod
    def read(cls, root: str, writable: bool = False) -> ShareState:
        """Read a share; ShareError when it is not one. ``writable``: the share's clock is read
        from a file written there (else this host's clock stands in)."""
        if not os.path.isdir(root):
            raise ShareError(f"share {root} does not exist or is not a directory")
        if not os.path.exists(os.path.join(root, MARKER_NAME)):
            raise ShareError(f"{root} has no {MARKER_NAME} marker: not a graftfs share (or not mounted)")
        now = share_clock(root) if writable else time.time()
        # claims before entries: a publisher's entries placed before ``now`` belong to a claim
        # read here, or to an image the scan sees; entries placed later are younger than now
        claims, problems = read_claims(root)
        scan = scan_tree(root)
        state = cls(root, scan, claims, problems, now)
        state.retired_at = _mtimes(os.path.join(root, RETIRED_DIR), is_id)
        state.staging = _mtimes(os.path.join(root, STAGING_DIR), lambda n: not n.startswith("."))
        state.trash = _mtimes(os.path.join(root, TRASH_DIR), lambda n: not n.startswith("."))
        return state

    # -- what is used ---------------------------------------------------------------------------

    def live_claims(self) -> list[Claim]:
        return [c for c in self.claims if c.live(self.now)]

    def chain(self, lid: str | None) -> list[str]:
        """A layer and its ancestors as far as the share holds them (loops cut)."""
        return layer_chain(self.scan.layers, lid)

    def image_layers(self, iid: str) -> list[str]:
        image = self.scan.images.get(iid)
        return self.chain(image.top_layer) if image is not None else []

    def layers_of(self, images: Iterable[str]) -> set[str]:
        out: set[str] = set()
        for iid in images:
            out.update(self.image_layers(iid))
        return out

    def published(self) -> list[str]:
        """Images readers may show (record parses, not retired)."""
        return [i for i in self.scan.images if i not in self.scan.retired]

    def layer_bytes(self, lid: str) -> int:
        """A layer's size as its record says (``diff-size``: the uncompressed tar); 0 unknown."""
        entry = self.scan.layers.get(lid)
        return entry.size if entry is not None else 0

    def entry_age(self, kind: str, eid: str) -> float:
        """Seconds since an entry's directories last changed (placed by rename, or written),
        by the share's clock when it was read: negative for entries placed while it was read."""
        if kind == "image":
            paths = [self.scan.image_dirs.get(eid)]
        else:
            paths = [self.scan.overlay_dirs.get(eid), self.scan.record_dirs.get(eid)]
        newest = 0.0
        for p in paths:
            if p is None:
                continue
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                newest = max(newest, st.st_mtime, st.st_ctime)
        return self.now - newest

    def find_images(self, ref: str) -> list[str]:
        """Images (retired or not) matching a full id, a unique id prefix or a name."""
        return match_image_ref(ref, {i: e.names for i, e in self.scan.images.items()})

    def names_of(self, iid: str) -> list[str]:
        image = self.scan.images.get(iid)
        return record_names(image.record) if image is not None and image.record else []

    def entry_paths(self, kind: str, eid: str) -> list[str]:
        """An entry's directories in the order gc moves them out (record first: readers then see
        the entry incomplete, never a record without its files)."""
        scan = self.scan
        if kind == "image":
            return [scan.image_dirs.get(eid) or os.path.join(self.root, IMAGES, eid)]
        return [scan.record_dirs.get(eid) or os.path.join(self.root, LAYERS, eid),
                scan.overlay_dirs.get(eid) or os.path.join(self.root, OVERLAY, eid)]


def share_clock(root: str) -> float:
    """The share server's idea of now: the mtime of a file just created there."""
    directory = os.path.join(root, TRASH_DIR)
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".clock-{uuid.uuid4().hex}")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(probe)


def _mtimes(directory: str, wanted: Callable[[str], bool]) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        if not wanted(name):
            continue
        with contextlib.suppress(FileNotFoundError):
            out[name] = os.lstat(os.path.join(directory, name)).st_mtime
    return out
