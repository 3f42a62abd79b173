"""Reading and checking the records of one entry, as every reader and tool must.

A share is written by other nodes and read by a root daemon, so every read here is bounded
(``MAX_RECORD_BYTES``), never follows a symlink out of the share, and turns a bad record into a
``ValueError`` with a short reason: the caller leaves the entry out and reports it; it never
crashes a mount. Errors that mean "the tree is out of reach" (``TREE_ERRNOS``) are raised as
they are, since they say nothing about the entry.

The rules of completeness are the readers' rules: a layer is complete when its ``diff``
directory, its ``link`` file and its record are there and agree; an image when its record parses
and names a well-formed top layer. Chains (parents being visible) are judged by the catalog.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from graftfs.format.names import ID_RE, IMAGE_RECORD, LAYER_RECORD, LAYERS_JSON, SHORT_RE

#: A record bigger than this is not a real layer/image record: refuse it rather than load it.
MAX_RECORD_BYTES = 16 * 1024 * 1024
#: A runtime's whole index file (every record of a store) may be this big.
MAX_INDEX_BYTES = MAX_RECORD_BYTES * 16
READ_STEP = 64 * 1024

#: errno values that mean "the tree is not reachable", not "this entry is broken": an entry that
#: fails with one of these is not judged, the whole tree is treated as unavailable instead.
TREE_ERRNOS = frozenset({errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.ETIMEDOUT, errno.EHOSTDOWN,
                         errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNABORTED,
                         errno.ECONNRESET, errno.ENODEV, errno.ENXIO, errno.EAGAIN})

Record = dict[str, object]


def is_tree_error(e: OSError) -> bool:
    """Does ``e`` say the tree is out of reach (rather than that one entry is broken)?"""
    return e.errno in TREE_ERRNOS


@dataclass(frozen=True)
class LayerEntry:
    """A layer found complete in one tree (its parent chain is checked later, by the catalog)."""

    id: str
    parent: str | None
    short: str
    overlay_dir: str  # backing path of overlay/<id>
    record_dir: str  # backing path of overlay-layers/<id>
    mtime_ns: int  # of the link file: used as the times of the synthesized l/<short> link
    record: Record | None = field(default=None, compare=False, repr=False)  # layer.json as read

    @property
    def size(self) -> int:
        """The layer's size as its record says (``diff-size``: the uncompressed tar); 0 unknown."""
        size = self.record.get("diff-size") if self.record else None
        return size if isinstance(size, int) and size > 0 else 0


@dataclass(frozen=True)
class ImageEntry:
    """An image record found parseable in one tree."""

    id: str
    top_layer: str | None
    names: tuple[str, ...]
    record_dir: str  # backing path of overlay-images/<id>
    record: Record | None = field(default=None, compare=False, repr=False)  # images.json as read


@dataclass(frozen=True)
class Problem:
    """An entry left out of the view, and why; shown by `graftfs status` and `graftfs fsck`."""

    tree: str
    kind: str  # "layer" or "image"
    id: str
    reason: str


def read_limited(path: str, limit: int, flags: int = 0) -> bytes:
    """A file's content, at most ``limit`` + 1 bytes (so the caller can tell it is too big).

    Read in 64 KiB steps: f.read(limit) sizes its buffer by the limit, which for a 16 MiB limit
    made each small record cost 5x the syscalls' time (10,000 of them at every mount)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, READ_STEP))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_json(data: bytes, label: str) -> object:
    """JSON from bytes a runtime or publisher wrote; ValueError naming ``label`` when it is not."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{label} does not parse: {e}") from None


def read_record(path: str) -> Record:
    """Parse a JSON object record; raise ValueError with a short reason otherwise."""
    name = os.path.basename(path)
    try:
        # a share's record is a file of its own: a symlink could make the daemon (root) read a
        # file outside the share and show it as a record
        data = read_limited(path, MAX_RECORD_BYTES, os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ValueError(f"{name} missing") from None
    except OSError as e:
        if is_tree_error(e):
            raise
        if e.errno == errno.ELOOP:
            raise ValueError(f"{name} is a symbolic link (not followed)") from None
        raise ValueError(f"{name} unreadable: {e.strerror}") from None
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"{name} larger than {MAX_RECORD_BYTES} bytes")
    obj = parse_json(data, name)
    if not isinstance(obj, dict):
        raise ValueError(f"{name} is not a JSON object")
    return obj


def read_index(path: str) -> list[Record]:
    """The records of an index file a runtime wrote (``layers.json``); [] when there is none.

    A file that does not parse raises ValueError: the caller decides (never silently dropped).
    """
    try:
        data = read_limited(path, MAX_INDEX_BYTES)
    except FileNotFoundError:
        return []
    if len(data) > MAX_INDEX_BYTES:
        raise ValueError(f"{path} is larger than {MAX_INDEX_BYTES} bytes")
    if not data.strip():
        return []
    records = parse_json(data, path)
    if not isinstance(records, list):
        raise ValueError(f"{path} is not a JSON array")
    return [r for r in records if isinstance(r, dict)]


def go_json(value: object) -> bytes:
    """``value`` as Go's encoding/json writes it: compact, with ``<``, ``>``, ``&``, U+2028 and
    U+2029 escaped (those occur only inside strings, so replacing them everywhere is exact).

    Records keep the key order they were read in, which for records a Go runtime wrote is its
    own; so an index file composed from them in the runtime's order comes out byte for byte as
    the runtime writes it back unchanged, and graftfs can tell that the file the runtime renamed
    into place is what the view shows (graftfs.fuse.kernel_cache: no new inode number for it)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in _GO_ESCAPES:
        text = text.replace(char, escaped)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate read from a "\ud800" escape: keep it escaped
        return json.dumps(value, separators=(",", ":")).encode()


_GO_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def record_ids(records: list[Record]) -> set[str]:
    """The ids an index file's records carry."""
    return {r["id"] for r in records if isinstance(r.get("id"), str)}  # type: ignore[misc]


def record_names(record: Mapping[str, object]) -> list[str]:
    """The ``names`` of an image record (tags), ignoring anything that is not a string."""
    names = record.get("names")
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def id_list(value: object) -> frozenset[str]:
    """A JSON list of ids as written by a node or publisher; anything not an id is dropped."""
    if not isinstance(value, list):
        raise ValueError("an id list is not a list")
    return frozenset(v for v in value if isinstance(v, str) and ID_RE.match(v))


def lstat_entry(path: str) -> os.stat_result | None:
    """lstat that answers None for a missing entry and raises only for tree-level errors."""
    try:
        return os.lstat(path)
    except OSError as e:
        if is_tree_error(e):
            raise
        return None


def is_real_dir(path: str) -> bool:
    """True for a directory that is not a symlink (iSulad's RO symlinks are not entries)."""
    st = lstat_entry(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def check_layer(lid: str, overlay_dir: str, record_dir: str) -> LayerEntry:
    """Validate one layer's own files; raise ValueError(reason) when incomplete."""
    if not is_real_dir(os.path.join(overlay_dir, "diff")):
        raise ValueError("overlay diff directory missing")
    short, link_mtime = _read_link_file(os.path.join(overlay_dir, "link"))
    rec = read_record(os.path.join(record_dir, LAYER_RECORD))
    if rec.get("id") != lid:
        raise ValueError(f"{LAYER_RECORD} id {str(rec.get('id'))[:70]!r} does not match its directory")
    if rec.get("incompleted") is True:
        raise ValueError(f"{LAYER_RECORD} marks the layer incomplete")
    parent = rec.get("parent") or None
    if parent is not None and (not isinstance(parent, str) or not ID_RE.match(parent)):
        raise ValueError(f"{LAYER_RECORD} parent {str(parent)[:70]!r} is not a layer id")
    return LayerEntry(lid, parent, short, overlay_dir, record_dir, link_mtime, rec)


def _read_link_file(path: str) -> tuple[str, int]:
    """A layer's short link name and the link file's mtime."""
    try:
        # not followed when a symlink, like the records (read_record)
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
            short = f.read(256).decode("ascii", "replace").strip()
            mtime = os.fstat(f.fileno()).st_mtime_ns
    except FileNotFoundError:
        raise ValueError("overlay link file missing") from None
    except OSError as e:
        if is_tree_error(e):
            raise
        if e.errno == errno.ELOOP:
            raise ValueError("overlay link file is a symbolic link (not followed)") from None
        raise ValueError(f"overlay link file unreadable: {e.strerror}") from None
    if not SHORT_RE.match(short):
        raise ValueError(f"overlay link file holds an invalid short name {short[:40]!r}")
    return short, mtime


def check_image(iid: str, record_dir: str) -> ImageEntry:
    """Validate one image record; raise ValueError(reason) when it cannot be used."""
    rec = read_record(os.path.join(record_dir, IMAGE_RECORD))
    if rec.get("id") != iid:
        raise ValueError(f"{IMAGE_RECORD} id {str(rec.get('id'))[:70]!r} does not match its directory")
    top = rec.get("layer") or None
    if top is not None and (not isinstance(top, str) or not ID_RE.match(top)):
        raise ValueError(f"{IMAGE_RECORD} top layer {str(top)[:70]!r} is not a layer id")
    return ImageEntry(iid, top, tuple(record_names(rec)), record_dir, rec)


def walk_chain(lid: str | None, parent_of: Callable[[str], str | None]) -> Iterator[str]:
    """A layer and its ancestors as far as ``parent_of`` knows them, top first (loops cut).

    The one walk up a parent chain: every "which layers does this image need" is this."""
    seen: set[str] = set()
    while lid and lid not in seen:
        seen.add(lid)
        yield lid
        lid = parent_of(lid)


def layer_chain(layers: Mapping[str, LayerEntry], lid: str | None) -> list[str]:
    """A layer and its ancestors as far as ``layers`` holds them (loops cut); the last one
    may be missing from ``layers`` (it is the parent the lowest known entry names)."""

    def parent_of(i: str) -> str | None:
        entry = layers.get(i)
        return entry.parent if entry is not None else None

    return list(walk_chain(lid, parent_of))


def graph_layer_ids(graph_root: str) -> set[str]:
    """Layer ids a containers/storage graph holds itself: the records of its layers.json
    (ValueError when that file does not parse)."""
    return record_ids(read_index(os.path.join(graph_root, *LAYERS_JSON)))
