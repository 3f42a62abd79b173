"""Local hides: this node's record of shared entries it deleted or renamed away.

The shared (RO) trees are never written. When a node deletes an entry that comes from a shared
tree, graftfs records the entry's path in the view as *hidden*; the RO entry at that path and
everything below it then drops out of this node's view only. A hidden directory that is created
again in RW is therefore opaque (it does not merge with the shared one), which is what
``rm -rf dir; mkdir dir`` must mean.

Records live in an append-only log inside the RW tree's private state directory, one JSON line
per change, so that a burst of deletes (``rm -rf`` of a shared layer) costs one small append
each rather than a rewrite of the whole set. The log is compacted when the mount starts.
Appends are flushed to the kernel at once (they survive the daemon being killed); ``sync()``
makes them durable and is called when a client fsyncs a directory. ``remove()`` (``graftfs
unhide``: the operator gives a deleted shared image back to the node) rewrites the log whole.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator

from graftfs.format.atomic import write_file_atomically

log = logging.getLogger(__name__)

VPath = tuple[str, ...]
LOG_NAME = "hides.log"


def _encode(vpath: VPath) -> str:
    # json keeps lone surrogates (undecodable bytes in names) as \udcXX escapes and round-trips them
    return json.dumps("/".join(vpath)) + "\n"


def _decode(line: str) -> VPath | None:
    try:
        text = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(text, str) or not text:
        return None
    parts = tuple(text.split("/"))
    if any(p in ("", ".", "..") for p in parts):
        return None
    return parts


def compact(paths: set[VPath]) -> set[VPath]:
    """Drop hides that a hide of one of their ancestors already covers."""
    kept: set[VPath] = set()
    for p in sorted(paths, key=len):
        if not any(p[:i] in kept for i in range(1, len(p))):
            kept.add(p)
    return kept


class HideStore:
    """The set of hidden view paths, persisted in ``<state_dir>/hides.log``; thread-safe."""

    def __init__(self, state_dir: str) -> None:
        self._path = os.path.join(state_dir, LOG_NAME)
        self._lock = threading.Lock()
        self.generation = 0  # bumped by every change: lets layouts cache what depends on the hides
        self._paths: set[VPath] = compact(set(self._load()))
        self._ancestors: set[VPath] = {p[:i] for p in self._paths for i in range(1, len(p))}
        self._rewrite()
        self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for appends

    def _load(self) -> Iterator[VPath]:
        try:
            with open(self._path, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return
        for n, line in enumerate(lines, 1):
            vpath = _decode(line)
            if vpath is None:
                # a torn last line after a crash, or damage: skip it, keep the rest
                log.warning("%s:%d: ignoring unreadable hide record %r", self._path, n, line[:80])
                continue
            yield vpath

    def _rewrite(self, paths: set[VPath] | None = None) -> None:
        """Atomically replace the log with ``paths`` (default: the current set), compacted at
        start-up, without the hides taken back by remove()."""
        write_file_atomically(self._path, "".join(_encode(p) for p in sorted(self._paths if paths is None else paths)))

    def covers(self, vpath: VPath) -> bool:
        """True when ``vpath`` or one of its ancestors is hidden."""
        paths = self._paths
        if not paths:
            return False
        return any(vpath[:i] in paths for i in range(1, len(vpath) + 1))

    def hides_below(self, vpath: VPath) -> bool:
        """True when something strictly below ``vpath`` is hidden (its shared content is then
        not what the shared tree holds, so it must be merged, not linked to)."""
        return vpath in self._ancestors

    def add(self, vpath: VPath) -> None:
        """Hide ``vpath`` (and everything under it) from the shared trees."""
        if not vpath:
            raise ValueError("the root cannot be hidden")
        with self._lock:
            if self.covers(vpath):
                return
            self._file.write(_encode(vpath))
            self._file.flush()
            self._paths.add(vpath)
            self._ancestors.update(vpath[:i] for i in range(1, len(vpath)))
            self.generation += 1

    def remove(self, under: Callable[[VPath], bool]) -> list[VPath]:
        """Take back every hide for which ``under`` answers True; the log is replaced atomically
        (a crash leaves the old set or the new one) and appends go on into the new file."""
        with self._lock:
            gone = sorted(p for p in self._paths if under(p))
            if not gone:
                return []
            kept = self._paths.difference(gone)
            self._file.flush()
            self._rewrite(kept)  # first: when it fails, the set and the log stay as they were
            try:
                self._file.close()
            finally:
                self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for appends
            self._paths = kept
            self._ancestors = {p[:i] for p in kept for i in range(1, len(p))}
            self.generation += 1
            return gone

    def sync(self) -> None:
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __len__(self) -> int:
        return len(self._paths)

    def sorted_paths(self) -> list[VPath]:
        with self._lock:  # status reads it from a worker thread while requests add hides
            return sorted(self._paths)
