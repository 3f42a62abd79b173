"""The containers/storage layout (podman, CRI-O, buildah): one index file per store, merged.

containers/storage keeps every layer record in ``overlay-layers/layers.json`` and every image
record in ``overlay-images/images.json`` (JSON arrays), and a layer's tar-split beside them as
``overlay-layers/<id>.tar-split.gz``. A share cannot hold such index files (two writers would
have to lock one file across nodes), so it keeps the per-entry shape (graftfs.format.names):
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

Overlay directories and ``overlay/l/<short>`` links are shown as in the iSulad layout
(graftfs.view.entries).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass

from graftfs.catalog.catalog import Catalog, CatalogDiff
from graftfs.catalog.live import LiveCatalog, LocalLayers
from graftfs.catalog.scan import TreeScan
from graftfs.format.attrs import Attr
from graftfs.format.names import (
    IMAGES,
    IMAGES_JSON,
    LAYERS,
    LAYERS_JSON,
    STATE_DIR,
    TAR_SPLIT_SUFFIX,
    is_id,
)
from graftfs.format.records import (
    go_json,
    graph_layer_ids,
    layer_chain,
    read_index,
    record_ids,
    record_names,
    walk_chain,
)
from graftfs.view import lock_tokens
from graftfs.view.entries import EntryView
from graftfs.view.layout import ANY_READER, CACHED, FilePolicy, HideView, Synthetic, ViewChange, VPath
from graftfs.view.status import LayoutStatus

log = logging.getLogger(__name__)

#: Processes whose last read of a merged file is remembered (the oldest are forgotten first).
MAX_READERS = 4096
#: The index files composed in memory.
MERGED_FILES = (LAYERS_JSON, IMAGES_JSON)
#: Lock files read on every lock for their token: every read must reach the file.
UNCACHED = FilePolicy(direct_io=True)
#: Token lock files created through the mount get a token at once.
NEW_TOKEN_LOCK = FilePolicy(direct_io=True, token=True)
#: The runtime's staging copy of a merged file (made durable by absorb, see FilePolicy).
STAGED = FilePolicy(synced_by_absorb=True)
#: containers/storage writes an index file as a temporary file named after it in the same
#: directory (this prefix, the name, random digits), fsyncs it and renames it into place.
STAGING_PREFIX = ".tmp-"


@dataclass(frozen=True)
class _Composed:
    catalog: object  # compared by identity: the catalog the content was composed from
    key: tuple[object, ...]
    synthetic: Synthetic


def own_layers(rw_root: str) -> set[str]:
    """Layer ids a containers/storage graph holds itself: the records of its layers.json."""
    try:
        return graph_layer_ids(rw_root)
    except ValueError:
        return set()


def containers_storage_catalog(trees: list[str], rw_root: str, pin_tree: str) -> LiveCatalog:
    """The catalog of a containers/storage mount: the node's pinned copies first (they win over
    the shares', graftfs.share.pins), then its shares."""
    local = LocalLayers(os.path.join(rw_root, *LAYERS_JSON), lambda: own_layers(rw_root))
    return LiveCatalog([pin_tree, *trees], os.path.join(rw_root, STATE_DIR), local,
                       pin_tree=0)


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
        size = sum(scan.layers[lid].size for lid in chain)
        out.append({"id": iid, "names": list(image.names), "bytes": size, "layers": len(chain)})
    return out


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _is_staging(vpath: VPath) -> bool:
    """Is ``vpath`` the runtime's staging copy of a merged file (STAGING_PREFIX)?"""
    return any(vpath[:-1] == merged[:-1] and vpath[-1].startswith(STAGING_PREFIX + merged[-1])
               for merged in MERGED_FILES)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sig_of(st: os.stat_result | None) -> tuple[int, ...]:
    """What changes when the node rewrites its index file (nothing when it has none)."""
    return () if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)


class ContainersStorageLayout(EntryView):
    """Shared trees presented with containers/storage's index files (see the module docstring).

    ``direct`` (on by default, measured with podman 4.3: runs, commits and removes layers through
    links) shows layer directories as links and has the daemon bind-mount the runtime's lock
    files and node-local directories over the view.
    """

    name = "containers-storage"
    leases = True
    WHOLE_LAYER_LINKS = True

    def __init__(self, live: LiveCatalog, rw_root: str, direct: bool = True) -> None:
        super().__init__(live, direct)
        self.rw_root = rw_root
        self.binds = direct
        self._composed: dict[VPath, _Composed] = {}
        self._compose_lock = threading.Lock()
        # the commit at which each process last read each merged file: a rewrite may only drop
        # shared ids its writer had seen (LiveCatalog.appeared_at)
        self._reads: dict[tuple[VPath, int], int] = {}

    def status(self) -> LayoutStatus:
        out = self.entry_status(self.name)
        pins = self.live.pin_scan()
        if pins is not None:
            out.pins = pin_sizes(pins)
        return out

    # -- telling clients -------------------------------------------------------------------------

    def view_changes(self, diff: CatalogDiff) -> list[ViewChange]:
        changes = super().view_changes(diff)
        if changes:
            changes += [ViewChange((LAYERS,), LAYERS_JSON[1]), ViewChange((IMAGES,), IMAGES_JSON[1])]
        return changes

    def announce(self, wait: float | None = None) -> None:
        """New lock tokens, so that long-running clients reload the merged index files."""
        lock_tokens.announce(self.rw_root, lock_tokens.LOCK_WAIT_SECONDS if wait is None else wait)

    def file_policy(self, vpath: VPath, in_rw: bool) -> FilePolicy:
        if in_rw and vpath in lock_tokens.TOKEN_LOCKS:
            return NEW_TOKEN_LOCK
        if in_rw and vpath in lock_tokens.LOCK_FILES:
            return UNCACHED  # every token read must see the file
        if in_rw and _is_staging(vpath):
            return STAGED
        if not in_rw and vpath in MERGED_FILES:
            # (an open of the content an inode number stands for is served cached by the FUSE
            # adapter; this is an open of a number whose content is no longer what shows)
            return UNCACHED
        return CACHED

    def note_read(self, vpath: VPath, reader: int) -> None:
        """Process ``reader`` opened merged file ``vpath`` (to read what it will rewrite)."""
        with self._compose_lock:
            self._reads[(vpath, reader)] = self.live.seq
            if len(self._reads) > MAX_READERS:
                for key in list(self._reads)[: len(self._reads) - MAX_READERS]:
                    del self._reads[key]

    # -- merged index files ----------------------------------------------------------------------

    def composed_files(self) -> tuple[VPath, ...]:
        return MERGED_FILES

    def merged(self, vpath: VPath, hides: HideView) -> Synthetic | None:
        if vpath not in MERGED_FILES:
            return None
        rw_path = os.path.join(self.rw_root, *vpath)
        st = _stat(rw_path)
        cat = self.live.catalog
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

    def _compose(self, cat: Catalog, vpath: VPath, rw_path: str, hides: HideView) -> tuple[bytes, int]:
        """The visible shared records, then the node's; and the newest record time.

        The order and the encoding (go_json) are the runtime's own: it writes back the records
        it read in that order with its new ones appended, which the split-back appends to the
        node's part, so a rewrite that changes nothing else is the composed file byte for byte.
        The node's own file must parse: serving the shared records alone would make the runtime
        drop its local layers at its next save, so an unreadable file answers EIO instead."""
        try:
            own = read_index(rw_path)
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
            local = self.live.local_layers()  # read again only when layers.json changed
            for iid, (_, image) in cat.images.items():
                if iid in own_ids or image.record is None or hides.covers((IMAGES, iid)):
                    continue
                top = image.top_layer
                if top is not None and top not in usable_set and top not in local:
                    continue  # its layers were deleted on this node: the image cannot be used here
                shared.append(image.record)
        merged = own + shared
        if vpath == IMAGES_JSON:
            merged = _one_image_per_name(merged)  # (the node's own listed first: they win ties)
        return go_json(merged[len(own):] + merged[:len(own)]), newest or cat.shorts_mtime_ns

    @staticmethod
    def _usable_layers(cat: Catalog, hides: HideView) -> list[str]:
        """Shared layers this node can use, in catalog order: not hidden here, and no hidden
        layer below them."""
        def shared_parent(lid: str) -> str | None:
            parent = cat.layers[lid][1].parent
            return parent if parent in cat.layers else None

        usable: dict[str, bool] = {}
        for lid in cat.layers:
            chain: list[str] = []
            ok = True
            for cur in walk_chain(lid, shared_parent):
                if cur in usable:
                    ok = usable[cur]  # the rest of the chain is judged already
                    break
                if hides.covers((LAYERS, cur)):
                    ok = usable[cur] = False
                    break
                chain.append(cur)
            for c in chain:
                usable[c] = ok
        return [lid for lid in cat.layers if usable.get(lid)]

    def absorb(self, vpath: VPath, written: str, hides: HideView, writer: int = 0) -> None:
        """Split an index file the runtime wrote (at RW path ``written``) into this node's part.

        Records identical to a visible shared one stay in the share, unless the node held them
        already (an entry it pulled or built and then published keeps its own copy: unpublish and
        gc of the share's copy never take it from this node); a shared record missing from what
        was written is hidden on this node; all other records go to the RW file, which replaces
        ``written`` atomically. A file that does not parse is kept as it is.
        """
        if vpath not in MERGED_FILES:
            raise OSError(errno.EPERM, "not a merged file", "/".join(vpath))
        try:
            records = read_index(written)
        except ValueError:
            _fsync(written)  # the caller keeps the file as written: as durable as the runtime asked (STAGED)
            raise
        cat = self.live.catalog
        entries = cat.layers if vpath == LAYERS_JSON else cat.images
        shared = {eid: entry.record for eid, (_, entry) in entries.items()
                  if entry.record is not None and not hides.covers((vpath[0], eid))}
        held = self._held_ids(vpath)
        own = [r for r in records
               if r.get("id") in held or not (r.get("id") in shared and shared[str(r.get("id"))] == r)]
        kept = {r.get("id") for r in records}
        with self._compose_lock:
            # (a kernel that opens files itself tells no reader: the newest content anyone read
            # then stands for what the writer read, which the runtime's own lock makes exact for
            # its processes: none of them reads while one holds the lock to write)
            read_at = self._reads.get((vpath, writer), self._reads.get((vpath, ANY_READER)))
        for eid in shared:
            # only what the writer could have seen: an id published after its read is not a deletion
            if eid not in kept and read_at is not None and self.live.appeared_at(eid) <= read_at:
                hides.add((vpath[0], eid))
        if len(own) < len(records):
            # shared records were left out: the runtime's staged file (its owner and mode kept)
            # holds the node's part before it is renamed into place
            with open(written, "wb") as f:
                f.write(go_json(own))
                f.flush()
                os.fsync(f.fileno())
        else:
            _fsync(written)  # the node's part already; the runtime's own fsync waited for this (STAGED)
        os.rename(written, os.path.join(self.rw_root, *vpath))

    def _held_ids(self, vpath: VPath) -> set[str]:
        """The ids of the records the node's own index file holds now (before it is replaced)."""
        try:
            return record_ids(read_index(os.path.join(self.rw_root, *vpath)))
        except ValueError:
            return set()

    # -- where shared files show ---------------------------------------------------------------

    def ro_path(self, tree: int, vpath: VPath) -> str | None:
        if len(vpath) >= 2 and vpath[0] == LAYERS:
            return self._tar_split(tree, vpath)
        return super().ro_path(tree, vpath)

    def _tar_split(self, tree: int, vpath: VPath) -> str | None:
        """overlay-layers/<id>.tar-split.gz of a shared layer; nothing else below overlay-layers."""
        name = vpath[1]
        if len(vpath) != 2 or not name.endswith(TAR_SPLIT_SUFFIX):
            return None
        lid = name[: -len(TAR_SPLIT_SUFFIX)]
        layer = self.live.catalog.layers.get(lid) if is_id(lid) else None
        if layer is None or layer[0] != tree:
            return None
        return os.path.join(layer[1].record_dir, name)

    def ro_names(self, tree: int, vpath: VPath) -> list[str] | None:
        if vpath == (LAYERS,):
            return [lid + TAR_SPLIT_SUFFIX for lid in self.live.catalog.layer_ids_in(tree)]
        return super().ro_names(tree, vpath)

    def synthetic_names(self, vpath: VPath) -> list[str]:
        if vpath == (LAYERS,):
            return [LAYERS_JSON[1]]
        if vpath == (IMAGES,):
            return [IMAGES_JSON[1]]
        return super().synthetic_names(vpath)
