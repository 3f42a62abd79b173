"""The one interface between the union model and a presenter of shared trees.

The union model (graftfs.view.namespace) knows nothing about container images. It asks the
layout what each shared tree contributes at a view path:

* ``ro_path(tree, vpath)``: where, in shared tree ``tree``, the entry at ``vpath`` lives, or None
  when that tree must not show anything there (an incomplete layer, iSulad's ``RO/`` directories,
  the share's private files);
* ``ro_names(tree, vpath)``: the names that tree shows in directory ``vpath``, or None to list
  the backing directory as it is;
* ``synthetic(vpath)`` / ``synthetic_names(vpath)``: entries that exist in no tree but are
  computed, like ``overlay/l/<short>`` links of shared layers;
* ``merged(vpath)`` / ``absorb(...)``: files composed from several trees (containers/storage's
  index files) and the split of what the runtime writes back.

What a layout can do beyond that is stated, not discovered: ``live`` (a catalog the watcher keeps
current, or None), ``binds`` (the daemon bind-mounts the runtime's hot files over the view),
``leases`` (the node's use of shared entries can be read from its RW tree), and ``file_policy``
(how the kernel may cache each file).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Protocol

from graftfs.catalog.catalog import CatalogDiff
from graftfs.catalog.live import LiveCatalog
from graftfs.format.attrs import Attr
from graftfs.view.status import LayoutStatus

VPath = tuple[str, ...]


class HideView(Protocol):
    """What a layout may ask of the node's hides (graftfs.view.hides.HideStore)."""

    generation: int

    def covers(self, vpath: VPath) -> bool: ...
    def hides_below(self, vpath: VPath) -> bool: ...
    def add(self, vpath: VPath) -> None: ...


@dataclass(frozen=True)
class Synthetic:
    """An entry computed from the catalog rather than read from a tree."""

    origin: str
    attr: Attr
    link_target: str | None = None  # set for symlinks
    content: bytes | None = None  # set for files composed in memory (see Layout.merged)


@dataclass(frozen=True, slots=True)
class ViewChange:
    """A name in the view whose entry may have appeared, vanished or changed.

    ``deep`` says the entry's contents changed as well (a record directory rewritten), so the
    kernel's cached entries below it are dropped too; only set where nothing is mounted below.
    """

    parent: VPath
    name: str
    deep: bool = False


@dataclass(frozen=True)
class FilePolicy:
    """How the kernel may treat an open file of the view.

    ``direct_io``: every read reaches graftfs (a lock token that must be seen at once, a file
    composed per open); otherwise pages are kept while the view is watched. ``token``: a file
    created here gets a lock token at once (graftfs.view.lock_tokens). ``synced_by_absorb``: the
    runtime's staging copy of a composed file, which it fsyncs and then renames over the composed
    one: the split-back (Layout.absorb) rewrites and fsyncs it before the rename returns anyway,
    so the runtime's own fsync of it is answered at once (a crash before the rename loses only a
    staging file the runtime never reads).
    """

    direct_io: bool = False
    token: bool = False
    synced_by_absorb: bool = False


CACHED = FilePolicy()
#: The reader of a merged file when the kernel opened it without asking (graftfs.fuse.files):
#: the first read of each content reaches graftfs, but without the process that made it.
ANY_READER = -1


class NoMergedFiles:
    """The part of a layout without composed files: every file is one tree's own, served cached.

    The plain and iSulad layouts take it; containers-storage composes its index files itself."""

    def merged(self, vpath: VPath, hides: HideView) -> Synthetic | None:
        return None

    def composed_files(self) -> tuple[VPath, ...]:
        return ()

    def absorb(self, vpath: VPath, written: str, hides: HideView, writer: int = 0) -> None:
        raise OSError(errno.EPERM, "not a merged file", "/".join(vpath))

    def note_read(self, vpath: VPath, reader: int) -> None:
        return None

    def file_policy(self, vpath: VPath, in_rw: bool) -> FilePolicy:
        return CACHED


class Layout(Protocol):
    """What the namespace, the FUSE adapter and the daemon need from a presenter."""

    name: str
    trees: list[str]
    #: the daemon bind-mounts the runtime's lock files and node-local directories over the view
    binds: bool
    #: the node's use of shared entries can be read from its runtime's files (lease keeper)
    leases: bool

    @property
    def live(self) -> LiveCatalog | None:
        """The catalog the watcher keeps current; None: nothing to watch (changes show once the
        kernel's short caches expire)."""

    def ro_path(self, tree: int, vpath: VPath) -> str | None: ...
    def ro_names(self, tree: int, vpath: VPath) -> list[str] | None: ...
    def synthetic(self, vpath: VPath) -> Synthetic | None: ...
    def synthetic_names(self, vpath: VPath) -> list[str]: ...
    def missing(self, tree: int, vpath: VPath) -> Attr | None: ...
    def known_attr(self, tree: int, vpath: VPath) -> Attr | None: ...
    def cache_key(self, tree: int, vpath: VPath) -> str | None: ...
    def unavailable(self, tree: int) -> bool: ...
    def merged(self, vpath: VPath, hides: HideView) -> Synthetic | None: ...
    def composed_files(self) -> tuple[VPath, ...]:
        """The files composed in memory (what merged answers for); a change of one may change
        the others (which images show depends on which layers do)."""
    def direct_path(self, vpath: VPath) -> bool: ...
    def own_layer_dir(self, vpath: VPath) -> bool: ...
    def link_shared(self, vpath: VPath) -> bool: ...
    def absorb(self, vpath: VPath, written: str, hides: HideView, writer: int = 0) -> None:
        """Split the file the runtime wrote at RW path ``written`` and renames over composed
        file ``vpath`` into the node's part, made durable and renamed into place."""
    def note_read(self, vpath: VPath, reader: int) -> None: ...
    def file_policy(self, vpath: VPath, in_rw: bool) -> FilePolicy: ...
    def view_changes(self, diff: CatalogDiff) -> list[ViewChange]: ...
    def announce(self, wait: float | None = None) -> None: ...
    def status(self) -> LayoutStatus: ...
