"""Auto-publish (``-o publish=auto``): images this node pulls or builds reach the share by themselves.

In a cluster images arrive by the runtime pulling them (kubelet -> CRI-O, ``podman pull``), not
by an operator running ``graftfs publish``. With ``publish=auto`` the daemon watches the node's
own image records (the RW tree's ``overlay-images/images.json``) and publishes every image that
is complete there and whose name matches ``publish_match``, with the very protocol of ``graftfs
publish`` (staging, intent, renames; it *is* that command, run as a child process reading the
mounted graph, so a copy of gigabytes never holds up a FUSE request). Every other node sees the
image within its watcher's latency and pulls nothing.

An image is published once it is *settled*: its record and its big-data files (manifest, config,
signatures: containers/storage writes them after the record) unchanged for ``SETTLE_SECONDS`` and
all present with the sizes the record names. What was published, or found retired on the share
(an operator's ``graftfs unpublish`` is not undone behind their back), is remembered in
``RW/.graftfs/autopublish.json``. A failed publish is retried with a growing pause, a bounded
number of times; it leaves only what ``graftfs gc`` collects (staging debris).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from graftfs.format.atomic import read_json_state, write_file_atomically
from graftfs.format.names import IMAGE_RECORD, IMAGES, IMAGES_JSON, RETIRED_DIR, is_id
from graftfs.format.records import Record, read_index, record_names
from graftfs.fuse.errors import BackingTimeout
from graftfs.fuse.workers import Workers

log = logging.getLogger(__name__)

STATE_FILE = "autopublish.json"
#: How often the node's image records are looked at (one stat when nothing changed).
CHECK_SECONDS = 1.0
#: An image's record and files must stay unchanged this long before it is published.
SETTLE_SECONDS = 2.0
#: Attempts at publishing one image before giving up on it (until its record changes again).
MAX_ATTEMPTS = 5
#: The pause after the first failure; doubled after each further one, at most MAX_BACKOFF.
FIRST_BACKOFF = 5.0
MAX_BACKOFF = 300.0
#: A single publish taking longer than this is stopped (and retried).
PUBLISH_LIMIT = 3600.0
#: How an attempt ended, for the durations: copied, nothing to copy (on the share or retired), failed.
OUTCOME_KINDS = ("published", "skipped", "failed")


def matches(names: Sequence[str], patterns: Sequence[str]) -> bool:
    """Is an image with these names selected: one name matches a pattern, none a ``!pattern``?

    Without any positive pattern every name is selected (``!`` patterns alone only exclude)."""
    positive = [p for p in patterns if not p.startswith("!")] or ["*"]
    negative = [p[1:] for p in patterns if p.startswith("!")]
    if any(fnmatch.fnmatchcase(n, p) for n in names for p in negative):
        return False
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in positive)


def big_data_file(key: str) -> str:
    """The file name containers/storage gives an image's big-data item ``key``: the key itself
    when it is made of lowercase letters, digits and dots, else ``=`` and its base64."""
    if key and all(c == "." or c.isdigit() or ("a" <= c <= "z") for c in key):
        return key
    return "=" + base64.b64encode(key.encode()).decode()


def missing_big_data(record: Record, image_dir: str) -> list[str]:
    """The big-data items the record names that are not (yet) in the image's directory whole."""
    names = record.get("big-data-names")
    sizes = record.get("big-data-sizes")
    if not isinstance(names, list):
        return []
    sizes = sizes if isinstance(sizes, dict) else {}
    out = []
    for key in names:
        if not isinstance(key, str):
            continue
        try:
            size = os.stat(os.path.join(image_dir, big_data_file(key))).st_size
        except FileNotFoundError:
            out.append(key)
            continue
        want = sizes.get(key)
        if isinstance(want, int) and want != size:
            out.append(key)
    return out


@dataclass
class Pending:
    """An image seen complete on this node and not on the share yet."""

    id: str
    names: list[str]
    sig: str  # what must stay unchanged: its record and its files
    since: float  # monotonic time the sig was first seen
    attempts: int = 0
    next_try: float = 0.0
    error: str = ""


@dataclass
class Outcome:
    at: float
    id: str
    names: list[str]
    result: str  # "published", "already on the share", "failed: ..."
    seconds: float
    layers_copied: int = 0


@dataclass
class AutoPublisher:
    """The daemon's auto-publish task for one node and one share (see the module docstring)."""

    mountpoint: str
    rw_root: str
    share: str
    patterns: list[str]
    workers: Workers
    state_dir: str
    pending: dict[str, Pending] = field(default_factory=dict)
    handled: dict[str, str] = field(default_factory=dict)  # image id -> what happened, persisted
    gave_up: dict[str, str] = field(default_factory=dict)  # image id -> last error
    recent: list[Outcome] = field(default_factory=list)
    running: str | None = None
    published: int = 0
    failures: int = 0
    layers_copied: int = 0
    #: (count, seconds) of the attempts ending each way since the mount (metrics: a summary)
    durations: dict[str, tuple[int, float]] = field(default_factory=lambda: dict.fromkeys(OUTCOME_KINDS, (0, 0.0)))

    def __post_init__(self) -> None:
        self.handled = self._load()

    # -- remembering -----------------------------------------------------------------------------

    def _load(self) -> dict[str, str]:
        data = read_json_state(os.path.join(self.state_dir, STATE_FILE), "auto-publish starts afresh")
        handled = data.get("handled") if isinstance(data, dict) else None
        return {k: str(v) for k, v in handled.items() if is_id(k)} if isinstance(handled, dict) else {}

    def _save(self) -> None:
        body = json.dumps({"share": self.share, "handled": self.handled}, sort_keys=True)
        write_file_atomically(os.path.join(self.state_dir, STATE_FILE), body, mode=0o600)

    # -- what to publish (blocking reads: worker threads) ----------------------------------------

    def candidates(self) -> list[tuple[str, list[str], str]]:
        """(id, names, signature) of the node's own images that are complete and selected."""
        try:
            records = read_index(os.path.join(self.rw_root, *IMAGES_JSON))
        except ValueError as e:
            log.warning("auto-publish: %s; looking again when it changes", e)
            return []
        out = []
        for rec in records:
            iid, names = str(rec.get("id", "")), record_names(rec)
            if not is_id(iid) or iid in self.handled or not names or not matches(names, self.patterns):
                continue
            image_dir = os.path.join(self.rw_root, IMAGES, iid)
            if missing_big_data(rec, image_dir):
                continue  # the runtime is still writing it
            out.append((iid, names, _signature(rec, image_dir)))
        return out

    def on_share(self, iid: str) -> str | None:
        """Why image ``iid`` needs no publish (on the share already, or retired there), or None."""
        if os.path.exists(os.path.join(self.share, RETIRED_DIR, iid)):
            return "retired on the share"
        if os.path.exists(os.path.join(self.share, IMAGES, iid, IMAGE_RECORD)):
            return "already on the share"
        return None

    # -- the task -------------------------------------------------------------------------------

    async def run(self, ready: trio.Event) -> None:
        """Look at the node's images every CHECK_SECONDS and publish what is due, one at a time
        (the graph is read through the mount: not before it is ready)."""
        await ready.wait()
        log.info("auto-publish to %s: images matching %s", self.share, ", ".join(self.patterns) or "*")
        last_key: object = None
        while True:
            key = _stat_key(os.path.join(self.rw_root, *IMAGES_JSON))
            if key != last_key or self.pending:
                last_key = key
                await self._refresh()
                due = self._due()
                if due is not None:
                    await self._publish(due)
                    continue  # the next one at once
            await trio.sleep(CHECK_SECONDS)

    async def _refresh(self) -> None:
        try:
            found = await self.workers.run_thread(self.candidates)
        except (OSError, BackingTimeout) as e:
            log.warning("auto-publish: reading this node's images: %s", e)
            return
        now = time.monotonic()
        current = {iid for iid, _, _ in found}
        for iid in list(self.pending):
            if iid not in current:
                del self.pending[iid]  # removed (rmi) or handled meanwhile
        for iid, names, sig in found:
            known = self.pending.get(iid)
            if known is None or known.sig != sig:
                if iid in self.gave_up and known is None:
                    continue  # given up: until its record changes, which gives a new sig
                self.gave_up.pop(iid, None)
                self.pending[iid] = Pending(iid, names, sig, now)

    def _due(self) -> Pending | None:
        now = time.monotonic()
        for p in self.pending.values():
            if now - p.since >= SETTLE_SECONDS and now >= p.next_try:
                return p
        return None

    async def _publish(self, p: Pending) -> None:
        started = time.monotonic()
        try:
            why = await self.workers.run_thread(self.on_share, p.id)
        except (OSError, BackingTimeout) as e:
            why, error = None, f"the share does not answer: {e}"
        else:
            error = ""
        if why is not None:
            self._done(p, why, started)
            return
        if not error:
            self.running = p.id
            try:
                error, copied = await self._run_publish(p)
            finally:
                self.running = None
            if not error:
                self.published += 1
                self.layers_copied += copied
                self._done(p, "published", started, copied)
                return
        self._failed(p, error, started)

    async def _run_publish(self, p: Pending) -> tuple[str, int]:
        """Run ``graftfs publish`` for one image; ("", layers copied) or (the error, 0)."""
        argv = [sys.executable, "-m", "graftfs", "publish", "--graph", self.mountpoint, "--share", self.share,
                "--json", p.id]
        log.info("auto-publish: publishing %s (%s) to %s", p.id[:12], " ".join(p.names), self.share)
        with trio.move_on_after(PUBLISH_LIMIT):
            res = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False,
                                         stdin=b"")
            if res.returncode != 0:
                lines = res.stderr.decode(errors="replace").strip().splitlines()
                return (lines[-1] if lines else f"exit status {res.returncode}"), 0
            try:
                images = json.loads(res.stdout)["images"]
                copied = sum(1 for la in images[0]["layers"] if la["status"] == "published")
            except (ValueError, KeyError, IndexError, TypeError):
                copied = 0
            return "", copied
        return f"took longer than {PUBLISH_LIMIT:g} s", 0

    def _done(self, p: Pending, result: str, started: float, copied: int = 0) -> None:
        seconds = time.monotonic() - started
        self.pending.pop(p.id, None)
        self.handled[p.id] = result
        self._note(Outcome(time.time(), p.id, p.names, result, seconds, copied))
        log.info("auto-publish: %s (%s): %s in %.1f s (%d layers copied)", p.id[:12], " ".join(p.names), result,
                 seconds, copied)
        try:
            self._save()
        except OSError as e:
            log.warning("auto-publish: cannot remember what was published (%s): it is looked at again", e)

    def _failed(self, p: Pending, error: str, started: float) -> None:
        self.failures += 1
        p.attempts += 1
        p.error = error
        self._note(Outcome(time.time(), p.id, p.names, f"failed: {error}", time.monotonic() - started))
        if p.attempts >= MAX_ATTEMPTS:
            del self.pending[p.id]
            self.gave_up[p.id] = error
            log.error("auto-publish: %s (%s) failed %d times, giving up until it changes: %s", p.id[:12],
                      " ".join(p.names), p.attempts, error)
            return
        pause = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (p.attempts - 1))
        p.next_try = time.monotonic() + pause
        log.warning("auto-publish: %s (%s) failed (attempt %d of %d): %s; trying again in %g s", p.id[:12],
                    " ".join(p.names), p.attempts, MAX_ATTEMPTS, error, pause)

    def _note(self, outcome: Outcome) -> None:
        self.recent = [*self.recent[-9:], outcome]
        kind = outcome_kind(outcome.result)
        count, seconds = self.durations[kind]
        self.durations[kind] = (count + 1, seconds + outcome.seconds)

    def status(self) -> dict[str, object]:
        """What ``graftfs status`` shows. Also called from the metrics server's thread while the
        trio thread changes these dicts: each is copied in one C call (``dict.copy``, atomic under
        the GIL) before a Python loop goes over it, so none changes size under the loop."""
        now = time.monotonic()
        pending, gave_up, durations = self.pending.copy(), self.gave_up.copy(), self.durations.copy()
        return {
            "share": self.share, "match": self.patterns or ["*"], "published": self.published,
            "failures": self.failures, "running": self.running,
            "pending": [{"id": p.id, "names": p.names, "attempts": p.attempts, "error": p.error,
                         "next_try_in": round(max(0.0, p.next_try - now), 1)} for p in pending.values()],
            "gave_up": [{"id": iid, "error": err} for iid, err in gave_up.items()],
            "recent": [vars(o) for o in self.recent],  # a list replaced whole, never changed
            "layers_copied": self.layers_copied,
            "durations": {k: {"count": n, "seconds": round(t, 3)} for k, (n, t) in durations.items()},
        }


def outcome_kind(result: str) -> str:
    """One of OUTCOME_KINDS for an Outcome's result."""
    if result == "published":
        return "published"
    return "failed" if result.startswith("failed") else "skipped"


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _signature(record: Record, image_dir: str) -> str:
    """What changes when the runtime is still writing an image: its record, its files."""
    try:
        files = sorted((e.name, st.st_size, st.st_mtime_ns) for e in os.scandir(image_dir) for st in [e.stat()])
    except FileNotFoundError:
        files = []
    return json.dumps([record, files], sort_keys=True, default=str)
