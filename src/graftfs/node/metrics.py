"""Prometheus metrics (``-o metrics=HOST:PORT``): what ``graftfs status`` shows, as time series.

A node's status answers "what is wrong now"; a cluster's operators also want "since when, how
often, on which node", which is what a Prometheus server scraping every node gives them. The
metrics are the status' own figures, read when a scrape comes (one custom collector), not
counters kept a second time beside them: the errno boundary's per-handler counts and latency
buckets (graftfs.fuse.errors), the FUSE adapter's byte counts, the live catalog's shared trees,
hides and skipped entries, and ``Background.status()`` (watcher, leases, auto-publish).

A scrape runs in the HTTP server's own thread and reads memory only: it never touches a backing
tree and never waits for the trio thread, so it answers at once while a share hangs (which is
when it is wanted most). It takes no lock the trio thread takes, so what it reads may change
under it; what holds it together is the GIL: a number or a reference is read in one step, the
containers the trio thread changes in place are copied in one C call before a Python loop goes
over them (``dict.copy``: the status methods, the errno boundary's counts), and figures that must
agree are replaced together rather than changed (the watcher's count and latencies: one tuple;
the catalog: a new object per change). Two figures read one after the other may still be a
change apart. A loop over something changed meanwhile all the same (the hides) fails with
RuntimeError; its group is read again, or left out of that scrape. The names follow Prometheus'
conventions and are described in docs/metrics.md; the server is prometheus_client's
``start_http_server`` (a thread of its own).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from graftfs.catalog.live import LiveCatalog
from graftfs.fuse.errors import REQUEST_BUCKETS, REQUEST_HISTOGRAM, REQUEST_SECONDS, REQUESTS
from graftfs.fuse.kernel_cache import ViewGeneration
from graftfs.fuse.operations import GraftOperations
from graftfs.fuse.watcher import Watcher
from graftfs.node.keeper import LeaseKeeper
from graftfs.node.options import ConfigError, format_listen_address
from graftfs.view.namespace import Namespace

log = logging.getLogger(__name__)

#: Bounds (seconds) of the detection-to-invalidation histogram: a change is usually applied in
#: milliseconds; seconds mean retries or a busy node.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: While the previous daemon of this mountpoint (``graftfs remount``) holds the port: retry this often.
REBIND_SECONDS = 0.5


@dataclass
class Sources:
    """Where the figures are: the daemon's parts as ``daemon.run`` built them."""

    version: str
    mountpoint: str
    layout: str
    started: float  # time.time() of the mount
    ops: GraftOperations
    ns: Namespace
    generation: ViewGeneration
    status: Callable[[], dict[str, Any]]  # Background.status: the watcher's, leases' and auto-publish's part
    watcher: Watcher | None = None  # its recent latencies (its status keeps percentiles only)
    keeper: LeaseKeeper | None = None  # the shared layers the node uses (the bytes the share saves it)


class Cumulated:
    """A histogram fed at scrape time from a sequence of the latest values and a total count of
    them (the watcher keeps its last 200 latencies and counts every change it applied): the values
    new since the last scrape are the sequence's last ``total - seen``. More than it holds between
    two scrapes: only those it still holds are counted."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.seen = 0

    def feed(self, total: int, recent: Sequence[float]) -> None:
        new = total - self.seen
        if new <= 0:
            return
        for value in recent[-new:]:
            self.counts[bisect_left(self.bounds, value)] += 1
            self.sum += value
        self.seen = total


def histogram(name: str, doc: str, labels: list[str], series: Iterable[tuple[list[str], list[int], float]],
              bounds: tuple[float, ...]) -> HistogramMetricFamily:
    """A histogram family from per-bucket counts (each value in its own bucket only): Prometheus
    wants them cumulative, ending with +Inf."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, counts, total in series:
        running, buckets = 0, []
        for bound, count in zip([*bounds, float("inf")], counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), running))
        family.add_metric(values, buckets, total)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    """A gauge without labels: one line per figure in the groups below."""
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    """A counter without labels, from a total the daemon keeps itself (not a prometheus_client
    Counter: the figure exists already, see the module docstring)."""
    return CounterMetricFamily(name, doc, value=value)


def _labelled(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, doc: str, labels: list[str],
              series: Iterable[tuple[list[str], float]]) -> Metric:
    """A gauge or counter family with one sample per (label values, value): the per-handler,
    per-tree and per-share figures, built in one go from a generator over a snapshot."""
    family = kind(name, doc, labels=labels)
    for values, value in series:
        family.add_metric(values, value)
    return family


class GraftCollector(Collector):
    """The daemon's figures as metric families, read at each scrape (see the module docstring)."""

    def __init__(self, src: Sources) -> None:
        self.src = src
        self._lock = threading.Lock()  # scrapes may come in parallel; the folds below are not
        self._latency = Cumulated(LATENCY_BUCKETS)
        self._hidden: tuple[object, int, int, int] | None = None  # (catalog, hides generation, images, layers)
        self._warned: set[str] = set()  # groups whose failure was logged as a warning

    def collect(self) -> Iterable[Metric]:
        """All groups' families for one scrape (prometheus_client calls this per request)."""
        with self._lock:
            status = self._group("status", lambda: [self.src.status()])
            parts: dict[str, Any] = status[0] if status else {}
            out: list[Metric] = []
            for group in (self._daemon, self._fuse, self._trees, self._view, self._saved):
                out += self._group(group.__name__, group)
            out += self._group("watcher", lambda: self._watcher(parts.get("watcher")))
            out += self._group("leases", lambda: lease_families(parts.get("leases")))
            out += self._group("autopublish", lambda: autopublish_families(parts.get("autopublish")))
            return out

    def _group(self, name: str, make: Callable[[], list[Any]]) -> list[Any]:
        """One group's families; a group that fails is left out of this scrape, not the whole
        scrape. A RuntimeError is most likely a container the trio thread changed under a loop
        (see the module docstring): that group is read again, up to three times. Every failure is
        logged at debug level, a group's first also as a warning (a scrape every few seconds must
        not flood the log)."""
        error: Exception | None = None
        for _ in range(3):
            try:
                return make()
            except RuntimeError as e:
                error = e
            except Exception as e:
                error = e
                break
        log.debug("metrics: %s left out of the scrape: %r", name, error)
        if name not in self._warned:
            self._warned.add(name)
            log.warning("metrics: %s left out of the scrape: %r (further failures are logged at debug level)",
                        name, error)
        return []

    # -- groups -------------------------------------------------------------------------------

    def _daemon(self) -> list[Metric]:
        """What runs where, since when, and the inode table's size."""
        info = GaugeMetricFamily("graftfs_info", "This graftfs mount: version, layout, mountpoint (always 1)",
                                 labels=["version", "layout", "mountpoint"])
        info.add_metric([self.src.version, self.src.layout, self.src.mountpoint], 1)
        return [info, _gauge("graftfs_start_time_seconds", "When the mount started (Unix time)", self.src.started),
                _gauge("graftfs_inodes", "Entries in graftfs' inode table (what the kernel holds)",
                       len(self.src.ops.inodes))]

    def _fuse(self) -> list[Metric]:
        """The errno boundary's per-handler counts and latency buckets (copied first: the trio
        thread adds a handler's keys when it first serves), and the adapter's byte counts."""
        requests, seconds, buckets = REQUESTS.copy(), REQUEST_SECONDS.copy(), REQUEST_HISTOGRAM.copy()
        used = sorted(op for op, counts in buckets.items() if any(counts))
        return [
            _labelled(CounterMetricFamily, "graftfs_fuse_requests_total", "FUSE requests served, per handler",
                      ["op"], (([op], n) for op, n in sorted(requests.items()))),
            histogram("graftfs_fuse_request_duration_seconds",
                      "Time from a FUSE request reaching its handler to its answer (worker waits included)",
                      ["op"], (([op], list(buckets[op]), seconds.get(op, 0.0)) for op in used), REQUEST_BUCKETS),
            _counter("graftfs_fuse_read_bytes_total", "File data read through graftfs (not the bypassing links)",
                     self.src.ops.bytes_read),
            _counter("graftfs_fuse_written_bytes_total", "File data written through graftfs",
                     self.src.ops.bytes_written),
        ]

    def _trees(self) -> list[Metric]:
        """Each shared tree's availability, polls and contribution (the catalog's status rows)."""
        live = self.src.ns.layout.live
        if live is None:
            return []
        labels = ["tree", "role"]
        rows = [([t.tree, "pins" if t.pins else "share"], t) for t in live.tree_status()]
        now = time.monotonic()
        ages = [(values, now - ok) for (values, _), tree in zip(rows, live.shared, strict=True)
                if (ok := tree.last_success) is not None]  # None: it never answered yet
        return [
            _labelled(GaugeMetricFamily, "graftfs_shared_tree_available",
                      "1 while the shared tree answers, 0 while it is unavailable (missing marker, failing, hung)",
                      labels, ((v, int(t.available)) for v, t in rows)),
            _labelled(GaugeMetricFamily, "graftfs_shared_tree_poll_age_seconds",
                      "Seconds since the shared tree last answered a poll", labels, ages),
            _labelled(CounterMetricFamily, "graftfs_shared_tree_polls_total", "Polls of the shared tree",
                      labels, ((v, t.polls) for v, t in rows)),
            _labelled(GaugeMetricFamily, "graftfs_shared_tree_layers", "Complete layers the shared tree contributes",
                      labels, ((v, t.layers) for v, t in rows)),
            _labelled(GaugeMetricFamily, "graftfs_shared_tree_images", "Images the shared tree contributes",
                      labels, ((v, t.images) for v, t in rows)),
        ]

    def _view(self) -> list[Metric]:
        """The view's generation, hides and the shared entries left out."""
        out: list[Metric] = [
            _gauge("graftfs_view_generation", "The view's generation: bumped around every change applied",
                   self.src.generation.value),
            _gauge("graftfs_hidden_paths", "View paths this node hid (shared entries deleted here)",
                   len(self.src.ns.hides)),
        ]
        live = self.src.ns.layout.live
        if live is None:
            return out
        images, layers = self._hidden_counts(live)
        kinds: dict[str, int] = {"layer": 0, "image": 0}
        for problem in live.catalog.problems:
            kinds[problem.kind] = kinds.get(problem.kind, 0) + 1
        return [*out,
                _gauge("graftfs_hidden_images", "Shared images hidden on this node (graftfs unhide gives one back)",
                       images),
                _gauge("graftfs_hidden_layers", "Shared layers hidden on this node", layers),
                _labelled(GaugeMetricFamily, "graftfs_skipped_entries",
                          "Shared entries left out as incomplete or corrupt (graftfs status says why)",
                          ["kind"], (([k], n) for k, n in sorted(kinds.items())))]

    def _hidden_counts(self, live: LiveCatalog) -> tuple[int, int]:
        """Hidden images and layers: computed again only when the catalog or the hides changed
        (a walk of every shared image's chain)."""
        cat, generation = live.catalog, self.src.ns.hides.generation
        cached = self._hidden
        if cached is not None and cached[0] is cat and cached[1] == generation:
            return cached[2], cached[3]
        images, layers = self.src.ns.hidden_images()
        self._hidden = (cat, generation, len(images), layers)
        return len(images), layers

    def _saved(self) -> list[Metric]:
        """The bytes of shared layers the node's containers and images use and it does not store
        (not its own, not pinned): what it would store without the share. Known where leases are
        kept (they are what the node uses), from the layers' recorded sizes."""
        keeper, live = self.src.keeper, self.src.ns.layout.live
        if keeper is None or live is None:
            return []
        layers, cat = keeper.layers, live.catalog
        total = 0
        for lid in layers:
            entry = cat.layers.get(lid)
            if entry is not None and entry[0] != live.pin_tree:
                total += entry[1].size
        return [_gauge("graftfs_share_saved_bytes",
                       "Bytes of shared layers this node uses without storing them (their recorded sizes)", total),
                _gauge("graftfs_lease_layers", "Shared layers this node uses (in its leases)", len(layers)),
                _gauge("graftfs_lease_images", "Shared images this node uses (in its leases)", len(keeper.images))]

    def _watcher(self, w: dict[str, Any] | None) -> list[Metric]:
        """The watcher's status figures, and the changes applied since the last scrape fed into
        the latency histogram. The count and the latencies come from one read of
        ``Watcher.applied`` (a tuple replaced whole), so they always agree."""
        if not w or w.get("enabled") is False:
            return []
        applied = int(w.get("changes_applied", 0))
        if self.src.watcher is not None:
            applied, recent = self.src.watcher.applied
            self._latency.feed(applied, [ms / 1000 for ms in recent])
        lat = self._latency
        return [
            _counter("graftfs_watcher_changes_applied_total", "Changes of the view applied (catalog and kernel told)",
                     applied),
            _counter("graftfs_watcher_failures_total", "Watcher tasks that failed, and changes the kernel could "
                     "not be told of", int(w.get("failures", 0))),
            _counter("graftfs_kernel_notifications_total", "Kernel cache invalidations sent",
                     int(w.get("kernel_notifications", 0))),
            _gauge("graftfs_inotify_watches", "inotify watches (RW directories, local shared trees)",
                   int(w.get("inotify_watches", 0))),
            histogram("graftfs_watcher_change_latency_seconds",
                      "From the poll or inotify event that found a change to the kernel being told of it",
                      [], [([], list(lat.counts), lat.sum)], LATENCY_BUCKETS),
        ]


def lease_families(leases: dict[str, Any] | None) -> list[Metric]:
    """The lease keeper's status (``graftfs status --json``: "leases") as metric families."""
    if not leases:
        return []
    shares = sorted(leases.get("shares", {}).items())
    return [
        _labelled(CounterMetricFamily, "graftfs_lease_renewals_total", "Leases written to the share", ["share"],
                  (([s], int(v.get("renewals", 0))) for s, v in shares)),
        _labelled(CounterMetricFamily, "graftfs_lease_failures_total", "Lease writes to the share that failed",
                  ["share"], (([s], int(v.get("failures", 0))) for s, v in shares)),
        _labelled(GaugeMetricFamily, "graftfs_lease_failing", "1 while the last lease write to the share failed",
                  ["share"], (([s], int(bool(v.get("failing")))) for s, v in shares)),
        _labelled(GaugeMetricFamily, "graftfs_lease_renewal_age_seconds",
                  "Seconds since the lease was last written to the share (it lapses after the TTL)", ["share"],
                  (([s], float(v["renewed_ago"])) for s, v in shares if v.get("renewed_ago") is not None)),
        _gauge("graftfs_lease_ttl_seconds", "How long a lease counts after its last renewal",
               float(leases.get("ttl", 0))),
    ]


def autopublish_families(ap: dict[str, Any] | None) -> list[Metric]:
    """Auto-publish's status ("autopublish") as metric families."""
    if not ap:
        return []
    durations = SummaryMetricFamily("graftfs_autopublish_duration_seconds",
                                    "Auto-publish attempts and their time, by how they ended", labels=["result"])
    for kind, d in sorted(ap.get("durations", {}).items()):
        durations.add_metric([kind], int(d["count"]), float(d["seconds"]))
    return [
        _counter("graftfs_autopublish_published_total", "Images auto-publish copied to the share",
                 int(ap.get("published", 0))),
        _counter("graftfs_autopublish_failures_total", "Auto-publish attempts that failed",
                 int(ap.get("failures", 0))),
        _counter("graftfs_autopublish_layers_copied_total", "Layers auto-publish copied to the share",
                 int(ap.get("layers_copied", 0))),
        _gauge("graftfs_autopublish_pending", "Images waiting to be published (settling or to be retried)",
               len(ap.get("pending", []))),
        _gauge("graftfs_autopublish_gave_up", "Images auto-publish gave up on (until their record changes)",
               len(ap.get("gave_up", []))),
        _gauge("graftfs_autopublish_running", "1 while a publish runs", int(ap.get("running") is not None)),
        durations,
    ]


class MetricsServer:
    """The HTTP endpoint at ``metrics=HOST:PORT`` and the registry it serves."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # the daemon's CPU, memory and open files
        self._server: Any = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """HOST:PORT as the option is written (IPv6 in brackets), for messages."""
        return format_listen_address(self.host, self.port)

    def start(self, predecessor_alive: Callable[[], bool]) -> None:
        """Listen now; ConfigError (one line) when that is not possible. A port still held by the
        previous daemon of this mountpoint (``graftfs remount``: it serves its detached mount until
        released) is taken over once that daemon is gone, in a thread of its own."""
        try:
            self._bind()
        except OSError as e:
            if e.errno == errno.EADDRINUSE and predecessor_alive():
                log.info("metrics: %s is still held by this mountpoint's previous daemon; serving once it exits",
                         self.address)
                threading.Thread(target=self._rebind, args=(predecessor_alive,), name="metrics-rebind",
                                 daemon=True).start()
                return
            raise ConfigError(f"metrics={self.address}: cannot listen there: {e.strerror or e}") from None
        log.info("metrics: serving http://%s/metrics", self.address)

    def _bind(self) -> None:
        """Listen (OSError when the port cannot be had), unless stop() came first: a rebind
        racing with the unmount must not open a port nobody closes."""
        with self._lock:
            if not self._stopped.is_set():
                self._server, _ = start_http_server(self.port, self.host, registry=self.registry)

    def _rebind(self, predecessor_alive: Callable[[], bool]) -> None:
        """Try the port every REBIND_SECONDS while the previous daemon lives (thread
        ``metrics-rebind``); once it is gone, one more failure is final (logged: the mount
        serves on without metrics)."""
        while not self._stopped.wait(REBIND_SECONDS):
            try:
                self._bind()
            except OSError as e:
                if predecessor_alive():
                    continue
                log.error("metrics: cannot listen on %s: %s; no metrics from this mount", self.address,
                          e.strerror or e)
                return
            log.info("metrics: serving http://%s/metrics", self.address)
            return

    def watch(self, sources: Sources) -> None:
        """Serve the daemon's figures (until then only the process' own)."""
        self.registry.register(GraftCollector(sources))

    def stop(self) -> None:
        """Close the port (first thing at unmount: a successor may be waiting for it)."""
        with self._lock:
            self._stopped.set()
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
