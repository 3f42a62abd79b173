"""The containers/storage layout (podman, CRI-O, buildah): one index file per store, merged.

containers/storage keeps every layer record in ``overlay-layers/layers.json`` and every image
record in ``overlay-images/images.json`` (JSON arrays), and a layer's tar-split beside them as
``overlay-layers/<id>.tar-split.gz``. A share cannot hold such index files (two writers would
have to lock one file across nodes), so it keeps the per-entry shape of graftfs.layouts.isulad:
``overlay-layers/<id>/{layer.json,<id>.tar-split.gz}``, ``overlay-images/<id>/{images.json,...}``.

This layout presents the share to the runtime in the runtime's own shape:

* ``layers.json`` and ``images.json`` are *merged files*, composed in memory: the node's own
  records (the RW tree's file) followed by the records of the visible shared entries that this
  node has not hidden and does not hold itself;
* when the runtime rewrites one (temp file renamed over it, as containers/storage always does),
  the written array is split back (``absorb``): records equal to a shared one are not copied to
  RW, shared records the runtime dropped become hides on this node only, everything else is
  written to the RW file. Nothing the runtime wrote is lost and the share is never written;
* ``overlay-layers/<id>.tar-split.gz`` of a shared layer maps to the file in its entry directory;
  the per-entry record directories themselves are not shown.

Overlay directories and ``overlay/l/<short>`` links are shown as in the iSulad layout.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from dataclasses import dataclass

from graftfs import lock_tokens
from graftfs.attrs import Attr
from graftfs.layouts import HideView, Synthetic, ViewChange
from graftfs.layouts.isulad import Catalog, IsuladLayout
from graftfs.layouts.share_tree import (
    ID_RE,
    IMAGES,
    LAYERS,
    MAX_RECORD_BYTES,
    TreeScan,
    layer_chain,
    parse_json,
    read_limited,
    record_names,
    recorded_size,
)

log = logging.getLogger(__name__)

#: Processes whose last read of a merged file is remembered (the oldest are forgotten first).
MAX_READERS = 4096

LAYERS_JSON = (LAYERS, "layers.json")
IMAGES_JSON = (IMAGES, "images.json")
TAR_SPLIT_SUFFIX = ".tar-split.gz"


@dataclass(frozen=True)
class _Composed:
    catalog: object  # compared by identity: the catalog the content was composed from
    key: tuple[object, ...]
    synthetic: Synthetic


def read_records(path: str) -> list[dict[str, object]]:
    """The records of an index file the runtime wrote; [] when it does not exist.

    A file that does not parse raises ValueError: the caller decides (never silently dropped).
    """
    try:
        data = read_limited(path, MAX_RECORD_BYTES * 16)
    except FileNotFoundError:
        return []
    if len(data) > MAX_RECORD_BYTES * 16:
        raise ValueError(f"{path} is larger than {MAX_RECORD_BYTES * 16} bytes")
    if not data.strip():
        return []
    records = parse_json(data, path)
    if not isinstance(records, list):
        raise ValueError(f"{path} is not a JSON array")
    return [r for r in records if isinstance(r, dict)]


def _one_image_per_name(images: list[dict[str, object]]) -> list[dict[str, object]]:
    """Give each name to one image only: the newest (then the node's own, listed first).

    A tag re-published with a new image leaves the old record on the share with the same name;
    containers/storage would resolve that by rewriting a shared record as this node's own, so
    the merged view resolves it the same way first, without touching any record on disk.
    """
    owner: dict[str, int] = {}
    for index, image in enumerate(images):
        for name in record_names(image):
            best = owner.get(name)
            if best is None or str(image.get("created", "")) > str(images[best].get("created", "")):
                owner[name] = index
    out = []
    for index, image in enumerate(images):
        names = record_names(image)
        kept = [n for n in names if owner.get(n) == index]
        out.append(image if len(kept) == len(names) else {**image, "names": kept})
    return out


def pin_sizes(scan: TreeScan) -> list[dict[str, object]]:
    """Each pinned image with the bytes its layers take in the pin tree (their records' sizes)."""
    out: list[dict[str, object]] = []
    for iid, image in sorted(scan.images.items()):
        if iid in scan.retired:
            continue  # unpinned, its copy kept only while a container uses it
        chain = [lid for lid in layer_chain(scan.layers, image.top_layer) if lid in scan.layers]
        size = sum(recorded_size(scan.layers[lid]) for lid in chain)
        out.append({"id": iid, "names": list(image.names), "bytes": size, "layers": len(chain)})
    return out


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _sig_of(st: os.stat_result | None) -> tuple[int, ...]:
    """What changes when the node rewrites its index file (nothing when it has none)."""
    return () if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)


class ContainersStorageLayout(IsuladLayout):
    """The iSulad layout's catalog, presented with containers/storage's index files."""

    name = "containers-storage"
    direct = True  # measured with podman 4.3: runs, commits and removes layers through links

    def announce(self, wait: float = lock_tokens.LOCK_WAIT_SECONDS) -> None:
        """New lock tokens, so that long-running clients reload the merged index files."""
        lock_tokens.announce(self.rw_root, wait)

    def binds_wanted(self) -> bool:
        """The runtime's lock files and node-local directories get bind mounts (graftfs.binds)."""
        return self.direct

    def __init__(self, trees: list[str], rw_root: str) -> None:
        super().__init__(trees, rw_root)
        self._composed: dict[tuple[str, ...], _Composed] = {}
        self._compose_lock = threading.Lock()
        # commit sequence at which each shared id entered the catalog, and at which each process
        # last read each merged file: a rewrite may only drop shared ids its writer had seen
        self._appeared: dict[str, int] = {}
        self._reads: dict[tuple[tuple[str, ...], int], int] = {}

    # -- the catalog's view of the RW tree ------------------------------------------------------

    def local_layers(self) -> set[str]:
        """Layer ids the node holds itself: the records of its own layers.json."""
        try:
            return {str(r.get("id")) for r in read_records(os.path.join(self.rw_root, *LAYERS_JSON))}
        except ValueError:
            return set()

    def commit(self, quiet: bool = False) -> tuple[int, list[ViewChange]]:
        seq, changes = super().commit(quiet)
        cat = self.catalog
        with self._compose_lock:
            for eid in [*cat.layers, *cat.images]:
                self._appeared.setdefault(eid, seq)
        if changes:
            changes += [ViewChange((LAYERS,), LAYERS_JSON[1]), ViewChange((IMAGES,), IMAGES_JSON[1])]
        return seq, changes

    def note_read(self, vpath: tuple[str, ...], reader: int) -> None:
        """Process ``reader`` opened merged file ``vpath`` (to read what it will rewrite)."""
        with self._compose_lock:
            self._reads[(vpath, reader)] = self._commit_seq
            if len(self._reads) > MAX_READERS:
                for key in list(self._reads)[: len(self._reads) - MAX_READERS]:
                    del self._reads[key]

    # -- merged index files ----------------------------------------------------------------------

    def merged(self, vpath: tuple[str, ...], hides: HideView) -> Synthetic | None:
        if vpath not in (LAYERS_JSON, IMAGES_JSON):
            return None
        rw_path = os.path.join(self.rw_root, *vpath)
        st = _stat(rw_path)
        cat = self.catalog
        key: tuple[object, ...] = (_sig_of(st), hides.generation)
        if vpath == IMAGES_JSON:  # which shared images show also depends on the node's own layers
            key += (_sig_of(_stat(os.path.join(self.rw_root, *LAYERS_JSON))),)
        with self._compose_lock:
            cached = self._composed.get(vpath)
            if cached is not None and cached.catalog is cat and cached.key == key:
                return cached.synthetic
        content, mtime_ns = self._compose(cat, vpath, rw_path, hides)
        mtime_ns = max(mtime_ns, st.st_mtime_ns if st else 0)
        mode, uid, gid = (st.st_mode & 0o777, st.st_uid, st.st_gid) if st else (0o600, 0, 0)
        attr = Attr.synthetic_file(len(content), mtime_ns, mode, uid, gid)
        synthetic = Synthetic("merged", attr, content=content)
        with self._compose_lock:
            self._composed[vpath] = _Composed(cat, key, synthetic)
        return synthetic

    def _compose(self, cat: Catalog, vpath: tuple[str, ...], rw_path: str, hides: HideView) -> tuple[bytes, int]:
        """The node's records, then the visible shared ones; and the newest record time.

        The node's own file must parse: serving the shared records alone would make the runtime
        drop its local layers at its next save, so an unreadable file answers EIO instead."""
        try:
            own = read_records(rw_path)
        except ValueError as e:
            log.error("%s: answering EIO for it until it is repaired", e)
            raise OSError(errno.EIO, f"{e}") from None
        own_ids = {r.get("id") for r in own}
        shared: list[dict[str, object]] = []
        newest = 0
        usable = self._usable_layers(cat, hides)
        usable_set = set(usable)
        if vpath == LAYERS_JSON:
            for lid in usable:
                entry = cat.layers[lid][1]
                if lid not in own_ids and entry.record is not None:
                    shared.append(entry.record)
                    newest = max(newest, entry.mtime_ns)
        else:
            own_layers = self.local_layers()
            for iid, (_, image) in cat.images.items():
                if iid in own_ids or image.record is None or hides.covers((IMAGES, iid)):
                    continue
                top = image.top_layer
                if top is not None and top not in usable_set and top not in own_layers:
                    continue  # its layers were deleted on this node: the image cannot be used here
                shared.append(image.record)
        merged = own + shared
        if vpath == IMAGES_JSON:
            merged = _one_image_per_name(merged)
        return json.dumps(merged).encode(), newest or cat.shorts_mtime_ns

    @staticmethod
    def _usable_layers(cat: Catalog, hides: HideView) -> list[str]:
        """Shared layers this node can use, in catalog order: not hidden here, and no hidden
        layer below them."""
        usable: dict[str, bool] = {}
        for lid in cat.layers:
            chain: list[str] = []
            cur: str | None = lid
            ok = True
            while cur is not None and cur in cat.layers:
                if cur in usable:
                    ok = usable[cur]
                    break
                if hides.covers((LAYERS, cur)):
                    ok = False
                    usable[cur] = False
                    break
                chain.append(cur)
                cur = cat.layers[cur][1].parent
            for c in chain:
                usable[c] = ok
        return [lid for lid in cat.layers if usable.get(lid)]

    def absorb(self, vpath: tuple[str, ...], written: str, hides: HideView, writer: int = 0) -> None:
        """Split an index file the runtime wrote (at RW path ``written``) into this node's part.

        Records identical to a visible shared one stay in the share; a shared record missing
        from what was written is hidden on this node; all other records go to the RW file,
        which replaces ``written`` atomically. A file that does not parse is kept as it is.
        """
        if vpath not in (LAYERS_JSON, IMAGES_JSON):
            raise OSError(errno.EPERM, "not a merged file", "/".join(vpath))
        records = read_records(written)  # ValueError: the caller keeps the file as written
        entries = self.catalog.layers if vpath == LAYERS_JSON else self.catalog.images
        shared = {eid: entry.record for eid, (_, entry) in entries.items()
                  if entry.record is not None and not hides.covers((vpath[0], eid))}
        own = [r for r in records if not (r.get("id") in shared and shared[str(r.get("id"))] == r)]
        kept = {r.get("id") for r in records}
        with self._compose_lock:
            read_at = self._reads.get((vpath, writer))
            appeared = dict(self._appeared)
        for eid in shared:
            # only what the writer could have seen: an id published after its read is not a deletion
            if eid not in kept and read_at is not None and appeared.get(eid, 0) <= read_at:
                hides.add((vpath[0], eid))
        if len(own) < len(records):  # shared records were left out: write the node's part
            with open(written, "w", encoding="utf-8") as f:
                f.write(json.dumps(own))  # one write: json.dump writes a piece per token
                f.flush()
                os.fsync(f.fileno())
        # else the file is the node's part already, as durable as the runtime made it
        os.rename(written, os.path.join(self.rw_root, *vpath))

    # -- where shared files show ---------------------------------------------------------------

    def ro_path(self, tree: int, vpath: tuple[str, ...]) -> str | None:
        if len(vpath) >= 2 and vpath[0] == LAYERS:
            return self._tar_split(tree, vpath)
        return super().ro_path(tree, vpath)

    def _tar_split(self, tree: int, vpath: tuple[str, ...]) -> str | None:
        """overlay-layers/<id>.tar-split.gz of a shared layer; nothing else below overlay-layers."""
        name = vpath[1]
        if len(vpath) != 2 or not name.endswith(TAR_SPLIT_SUFFIX):
            return None
        lid = name[: -len(TAR_SPLIT_SUFFIX)]
        layer = self.catalog.layers.get(lid) if ID_RE.match(lid) else None
        if layer is None or layer[0] != tree:
            return None
        return os.path.join(layer[1].record_dir, name)

    def ro_names(self, tree: int, vpath: tuple[str, ...]) -> list[str] | None:
        if vpath == (LAYERS,):
            return [lid + TAR_SPLIT_SUFFIX for lid in self.catalog.layer_ids_in(tree)]
        return super().ro_names(tree, vpath)

    def synthetic_names(self, vpath: tuple[str, ...]) -> list[str]:
        if vpath == (LAYERS,):
            return [LAYERS_JSON[1]]
        if vpath == (IMAGES,):
            return [IMAGES_JSON[1]]
        return super().synthetic_names(vpath)

    def status(self) -> dict[str, object]:
        out = super().status()
        out["layout"] = self.name
        if self.pin_tree is not None:
            out["pins"] = pin_sizes(self.shared[self.pin_tree].scan)
        return out
