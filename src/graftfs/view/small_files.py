"""Node-local copies of the small files of shared entries, so images stay usable through an outage.

``podman images`` and ``podman image inspect`` read each image's manifest and config (big-data
files in ``overlay-images/<id>/``), and starting any container reads layers' ``link`` and
``lower`` files, also of layers other than the container's. Those files are small, and a share's
entry never changes once placed (a publisher renames it into place whole; gc removes it whole),
so a copy read once stays right for as long as the catalog shows that same entry. The first read
of such a file copies it into ``RW/.graftfs/cache/`` (under the entry's identity: the sizes and
mtimes of its directory and record, so an entry placed anew is never answered from an old copy);
later lookups and reads use the copy and never ask the share, which keeps them fast and keeps
them working while the share fails or hangs. Only layer *contents* stay out of reach then (pins
cover those).

The cache is bounded (``limit`` bytes): beyond it, copies of entries the catalog no longer shows
go first, then the oldest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable

from graftfs.format.atomic import temp_name
from graftfs.format.names import IMAGES, OVERLAY

log = logging.getLogger(__name__)

#: The cache's directory in the node's state directory.
CACHE_DIR = "cache"
#: Files larger than this are read from the share each time (layer tar-splits, big blobs).
FILE_LIMIT = 4 * 1024 * 1024
#: The whole cache stays below this.
DEFAULT_LIMIT = 256 * 1024 * 1024


class SmallFiles:
    """The copies in ``directory`` (see the module docstring); thread-safe."""

    def __init__(self, directory: str, shown: Callable[[str], bool], limit: int = DEFAULT_LIMIT) -> None:
        self.directory = directory
        self.shown = shown  # is this layer or image id still in the catalog (its copies still useful)?
        self.limit = limit
        self._lock = threading.Lock()
        self._bytes = self._measure()
        self.hits = self.fills = 0

    def path(self, key: str) -> str:
        return os.path.join(self.directory, key)

    def holds(self, path: str | None) -> bool:
        """Is ``path`` one of the copies (not a share's file)?"""
        return path is not None and path.startswith(self.directory + "/")

    def get(self, key: str) -> tuple[str, os.stat_result] | None:
        """The copy for ``key`` and its attributes (those of the share's file), if there is one."""
        path = self.path(key)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        self.hits += 1
        return path, st

    def fill(self, key: str, source: str) -> str | None:
        """Copy the share's file ``source`` for ``key`` (contents, mode, owner and times); the
        copy's path, or None when the file is too big to keep."""
        st = os.stat(source)
        if st.st_size > FILE_LIMIT:
            return None
        path = self.path(key)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = temp_name(path)
        try:
            shutil.copy2(source, tmp)
            os.chown(tmp, st.st_uid, st.st_gid)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.fills += 1
        with self._lock:
            self._bytes += st.st_size
            over = self._bytes > self.limit
        if over:
            self._make_room()
        return path

    def _measure(self, directory: str | None = None) -> int:
        """Bytes of the copies below ``directory`` (the whole cache by default)."""
        total = 0
        for d, _, files in os.walk(directory or self.directory):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(d, f)).st_size
        return total

    def _entries(self) -> list[tuple[str, str, float]]:
        """(managed directory, entry id, mtime) of every entry with copies."""
        out = []
        for top in (IMAGES, OVERLAY):
            try:
                with os.scandir(os.path.join(self.directory, top)) as listing:
                    out += [(top, e.name, e.stat().st_mtime) for e in listing if e.is_dir()]
            except FileNotFoundError:
                continue
        return out

    def _make_room(self) -> None:
        """Drop copies until the cache is below 90 % of its limit: entries the catalog no longer
        shows first, then the least recently filled."""
        entries = sorted(self._entries(), key=lambda e: (self.shown(e[1]), e[2]))
        for top, eid, _ in entries:
            if self._bytes <= self.limit * 0.9:
                break
            entry = os.path.join(self.directory, top, eid)
            size = self._measure(entry)  # only this entry's, not the whole cache's again
            shutil.rmtree(entry, ignore_errors=True)
            with self._lock:
                self._bytes -= size
        log.info("small-file cache trimmed to %d bytes", self._bytes)

    def status(self) -> dict[str, object]:
        entries = self._entries()
        return {"directory": self.directory, "images": sum(1 for top, _, _ in entries if top == IMAGES),
                "layers": sum(1 for top, _, _ in entries if top == OVERLAY), "bytes": self._bytes,
                "limit": self.limit, "hits": self.hits, "fills": self.fills}
