"""Prometheus metrics (``-o metrics=HOST:PORT``): a mount serves /metrics, the figures move with
what the node does, Debian's real Prometheus server scrapes and stores them, a bad address is a
one-line mount error, and ``graftfs remount`` hands the port to the new daemon."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from conftest import GraftMount, Sample, force_unmount, graftfs_cmd, needs_mount, sh, wait_for
from graftfs.fuse.errors import REQUEST_BUCKETS, REQUEST_HISTOGRAM, fuse_boundary
from graftfs.node.autopublish import AutoPublisher, Outcome, Pending
from graftfs.node.keeper import LeaseKeeper
from graftfs.node.metrics import REBIND_SECONDS, Cumulated, GraftCollector, autopublish_families, lease_families
from graftfs.node.mounts import find_mount, pid_alive, read_runtime
from graftfs.share.sample import chain, digest, publish_sample_image

MountFactory = Callable[..., GraftMount]
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]
PROMETHEUS = "/usr/bin/prometheus"
SCRAPE_TIMEOUT = 5.0

#: What every mount with a live catalog serves (the watcher's and the trees' with poll= > 0).
EXPECTED = (
    "graftfs_info", "graftfs_start_time_seconds", "graftfs_inodes", "graftfs_fuse_requests_total",
    "graftfs_fuse_request_duration_seconds_bucket", "graftfs_fuse_request_duration_seconds_sum",
    "graftfs_fuse_request_duration_seconds_count", "graftfs_fuse_read_bytes_total", "graftfs_fuse_written_bytes_total",
    "graftfs_shared_tree_available", "graftfs_shared_tree_polls_total", "graftfs_shared_tree_layers",
    "graftfs_shared_tree_images", "graftfs_view_generation", "graftfs_hidden_paths", "graftfs_hidden_images",
    "graftfs_hidden_layers", "graftfs_skipped_entries", "graftfs_watcher_changes_applied_total",
    "graftfs_watcher_failures_total", "graftfs_kernel_notifications_total", "graftfs_inotify_watches",
    "graftfs_watcher_change_latency_seconds_bucket", "graftfs_watcher_change_latency_seconds_count",
    "process_resident_memory_bytes",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as resp:
        body: bytes = resp.read()
        return body.decode()


def parse(text: str) -> Samples:
    """Exposition text as {sample name: {labels: value}} (the parser also checks the format)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def scrape(port: int) -> Samples:
    return parse(fetch(f"http://127.0.0.1:{port}/metrics"))


def scrape_openmetrics(port: int) -> list[str]:
    """The OpenMetrics exposition (what Prometheus asks for), parsed strictly: its family names."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                 headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(req, timeout=SCRAPE_TIMEOUT) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        text = resp.read().decode()
    return [f.name for f in openmetrics_families(text)]


def value(samples: Samples, name: str, **labels: str) -> float:
    series = samples.get(name, {})
    key = frozenset(labels.items())
    assert key in series, f"{name}{labels} not in {sorted(series, key=str)}"
    return series[key]


def total(samples: Samples, name: str) -> float:
    return sum(samples.get(name, {}).values())


def check_histogram(samples: Samples, name: str, **labels: str) -> float:
    """Buckets cumulative and ending in +Inf == _count; returns the count."""
    buckets = sorted(((float(dict(k)["le"]), v) for k, v in samples[f"{name}_bucket"].items()
                      if all(dict(k).get(a) == b for a, b in labels.items())))
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0] == float("inf"), buckets
    count = value(samples, f"{name}_count", **labels)
    assert counts[-1] == count
    return count


# -- the figures, without a mount ---------------------------------------------------------------


async def test_fuse_boundary_counts_each_request_in_one_bucket() -> None:
    @fuse_boundary
    async def metrics_probe_handler() -> int:
        return 1

    counts = REQUEST_HISTOGRAM["metrics_probe_handler"]
    assert len(counts) == len(REQUEST_BUCKETS) + 1 and not any(counts)
    for _ in range(3):
        assert await metrics_probe_handler() == 1
    assert sum(counts) == 3 and sum(counts[:-1]) == 3  # quick: never in the +Inf bucket


def test_latency_histogram_takes_only_new_values() -> None:
    h = Cumulated((0.01, 0.1))
    h.feed(2, [0.005, 0.05])
    h.feed(2, [0.005, 0.05])  # nothing new
    h.feed(3, [0.005, 0.05, 0.5])
    assert h.counts == [1, 1, 1] and abs(h.sum - 0.555) < 1e-9
    h.feed(10, [0.001, 0.002])  # more than the list holds: only those it holds
    assert h.counts == [3, 1, 1] and h.seen == 10


def exposition(families: list[object]) -> Samples:
    class Fixed:
        def collect(self) -> list[object]:
            return families

    registry = CollectorRegistry()
    registry.register(Fixed())  # type: ignore[arg-type]
    return parse(generate_latest(registry).decode())


def test_lease_and_autopublish_figures(tmp_path: Path) -> None:
    leases = {"ttl": 8.0, "shares": {"/s": {"renewed_ago": 1.5, "failing": "EROFS", "renewals": 4, "failures": 2},
                                     "/t": {"renewed_ago": None, "failing": None, "renewals": 0, "failures": 0}}}
    got = exposition(lease_families(leases))  # type: ignore[arg-type]
    assert value(got, "graftfs_lease_renewals_total", share="/s") == 4
    assert value(got, "graftfs_lease_failures_total", share="/s") == 2
    assert value(got, "graftfs_lease_failing", share="/s") == 1 and value(got, "graftfs_lease_failing", share="/t") == 0
    assert got["graftfs_lease_renewal_age_seconds"] == {frozenset({("share", "/s")}): 1.5}  # never renewed: none
    ap = AutoPublisher("/mnt", str(tmp_path), "/share", [], None, str(tmp_path))  # type: ignore[arg-type]
    for result, seconds in (("published", 2.0), ("failed: no space", 1.0), ("already on the share", 0.5),
                            ("published", 4.0)):
        ap._note(Outcome(0.0, "x", [], result, seconds))
    got = exposition(autopublish_families(ap.status()))  # type: ignore[arg-type]
    assert value(got, "graftfs_autopublish_duration_seconds_count", result="published") == 2
    assert value(got, "graftfs_autopublish_duration_seconds_sum", result="published") == 6.0
    assert value(got, "graftfs_autopublish_duration_seconds_count", result="failed") == 1
    assert value(got, "graftfs_autopublish_duration_seconds_count", result="skipped") == 1
    assert value(got, "graftfs_autopublish_pending") == 0 and value(got, "graftfs_autopublish_running") == 0


def test_watcher_count_and_latencies_come_from_one_read() -> None:
    """The histogram's count and the applied counter are one figure (Watcher.applied), even when
    the status was read a change earlier."""
    watcher = SimpleNamespace(applied=(3, (1.0, 2.0, 3000.0)))
    collector = GraftCollector(SimpleNamespace(watcher=watcher))  # type: ignore[arg-type]
    got = exposition(collector._watcher({"changes_applied": 2}))  # type: ignore[arg-type]
    assert value(got, "graftfs_watcher_changes_applied_total") == 3
    assert check_histogram(got, "graftfs_watcher_change_latency_seconds") == 3
    assert value(got, "graftfs_watcher_change_latency_seconds_bucket", le="0.001") == 1
    assert value(got, "graftfs_watcher_change_latency_seconds_bucket", le="2.5") == 2


def test_status_snapshots_survive_concurrent_changes(tmp_path: Path) -> None:
    """Auto-publish's and the lease keeper's status, read from another thread (a scrape) while
    their dicts and sets grow and shrink, never fail with "changed size during iteration"."""
    ap = AutoPublisher("/mnt", str(tmp_path), "/share", [], None, str(tmp_path))  # type: ignore[arg-type]
    keeper = LeaseKeeper(None, str(tmp_path), ["/s"], "node", 1.0, None)  # type: ignore[arg-type]
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            key = f"{i % 64:064x}"
            ap.pending[key] = Pending(key, [], "", 0.0)
            ap.gave_up[key] = "error"
            keeper.renewed[key] = 0.0
            keeper.empty.add(key)
            if i % 3 == 0:
                drop = f"{i * 7 % 64:064x}"
                ap.pending.pop(drop, None)
                ap.gave_up.pop(drop, None)
                keeper.renewed.pop(drop, None)
                keeper.empty.discard(drop)
            i += 1

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            ap.status()
            keeper.status()
    finally:
        stop.set()
        thread.join()


# -- real mounts ------------------------------------------------------------------------------------


@needs_mount
def test_metrics_are_served_and_move(sample: Sample, mount_factory: MountFactory) -> None:
    port = free_port()
    g = mount_factory(sample.rw, [sample.share_ro], "-o", f"metrics=127.0.0.1:{port}")
    version = str(g.status()["version"])  # a first request: handlers show once they served one
    first = scrape(port)
    missing = [n for n in EXPECTED if n not in first]
    assert not missing, missing
    tree = {"tree": sample.share_ro, "role": "share"}
    assert value(first, "graftfs_shared_tree_available", **tree) == 1
    assert value(first, "graftfs_shared_tree_images", **tree) == 2
    assert value(first, "graftfs_skipped_entries", kind="layer") >= 1  # the demo's half-published layer
    assert value(first, "graftfs_info", version=version, layout="isulad", mountpoint=g.mnt) == 1

    # FUSE requests: a listing and a read through graftfs (isulad's default: no bypassing links)
    assert sh("ls", "-lR", g.mnt).returncode == 0
    data = sh("cat", g.path("overlay", sample.ids.app, "diff", "app", "data.txt"))
    assert data.stdout == "application data\n"
    second = scrape(port)
    assert total(second, "graftfs_fuse_requests_total") > total(first, "graftfs_fuse_requests_total")
    assert value(second, "graftfs_fuse_read_bytes_total") >= value(first, "graftfs_fuse_read_bytes_total") + 17
    assert check_histogram(second, "graftfs_fuse_request_duration_seconds", op="read") >= 1
    assert check_histogram(second, "graftfs_fuse_request_duration_seconds", op="readdir") >= 1
    assert value(second, "graftfs_fuse_request_duration_seconds_sum", op="readdir") > 0

    # the watcher: a publish on the share is applied, with its latency
    publish_sample_image(sample.share, "metrics/new:1", chain("metrics", 2, parent=sample.ids.base))
    wait_for(lambda: value(scrape(port), "graftfs_watcher_changes_applied_total")
             > value(second, "graftfs_watcher_changes_applied_total"), 10, "the change in the metrics")
    third = scrape(port)
    assert value(third, "graftfs_shared_tree_images", **tree) == 3
    assert value(third, "graftfs_view_generation") > value(second, "graftfs_view_generation")
    assert value(third, "graftfs_kernel_notifications_total") > 0
    assert check_histogram(third, "graftfs_watcher_change_latency_seconds") >= 1
    polls = "graftfs_shared_tree_polls_total"
    assert value(third, polls, **tree) > value(first, polls, **tree)
    assert value(third, "graftfs_shared_tree_poll_age_seconds", **tree) < 5

    # a shared image deleted on this node is hidden, not gone
    assert sh("rm", "-rf", g.path("overlay-images", sample.ids.image_web)).returncode == 0
    fourth = scrape(port)
    assert value(fourth, "graftfs_hidden_paths") >= 1 and value(fourth, "graftfs_hidden_images") == 1
    assert {"graftfs_fuse_requests", "graftfs_watcher_change_latency_seconds"} <= set(scrape_openmetrics(port))


@needs_mount
def test_lease_and_saved_bytes_metrics(tmp_path: Path, mount_factory: MountFactory) -> None:
    """A containers-storage node using two shared layers: its leases renew, and the share saves
    it their bytes (the records' diff-size, 64 bytes each)."""
    share, rw = tmp_path / "share", tmp_path / "rw"
    share.mkdir()
    (share / ".graftfs-share").write_text("graftfs share v1\n")
    base = chain("m", 2)
    publish_sample_image(str(share), "m/base:1", base)
    for d in ("overlay-layers", "overlay-images", "overlay/l"):
        (rw / d).mkdir(parents=True)
    local = digest("layer:metrics-local")  # a container layer on the shared chain
    (rw / "overlay-layers" / "layers.json").write_text(json.dumps([{"id": local, "parent": base[-1].id}]))
    (rw / "overlay-images" / "images.json").write_text("[]")
    port = free_port()
    mount_factory(str(rw), [str(share)], "--layout", "containers-storage", "-o",
                  f"lease=0.5,publish=auto,metrics=127.0.0.1:{port}")
    wait_for(lambda: value(scrape(port), "graftfs_lease_renewals_total", share=str(share)) >= 2, 15,
             "two lease renewals")
    got = scrape(port)
    assert value(got, "graftfs_lease_failures_total", share=str(share)) == 0
    assert value(got, "graftfs_lease_failing", share=str(share)) == 0
    assert value(got, "graftfs_lease_renewal_age_seconds", share=str(share)) < 5
    assert value(got, "graftfs_lease_ttl_seconds") == 2.0
    assert value(got, "graftfs_lease_layers") == 2
    assert value(got, "graftfs_share_saved_bytes") == sum(len(d) for la in base for d in la.files.values()) == 128
    assert value(got, "graftfs_autopublish_published_total") == 0 and value(got, "graftfs_autopublish_pending") == 0
    assert value(got, "graftfs_autopublish_duration_seconds_count", result="published") == 0
    pins = str(rw / ".graftfs" / "pins")
    assert value(got, "graftfs_shared_tree_available", tree=pins, role="pins") == 1


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], int]]:
    """Start Debian's Prometheus scraping 127.0.0.1:PORT every second; returns its own port.
    Killed at teardown, whatever the test did."""
    if not os.path.exists(PROMETHEUS):
        pytest.skip("prometheus is not installed (tools/install --test installs it)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: int) -> int:
        config = tmp_path / "prometheus.yml"
        config.write_text(f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: graftfs
    static_configs:
      - targets: ['127.0.0.1:{target}']
""")
        port = free_port()
        with open(tmp_path / "prometheus.log", "wb") as log:
            procs.append(subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True))
        return port

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def query(port: int, expr: str) -> list[dict[str, object]]:
    """An instant query through Prometheus' HTTP API; [] while it cannot answer yet."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        answer = json.loads(fetch(url))
    except (OSError, ValueError):
        return []
    assert answer["status"] == "success", answer
    result: list[dict[str, object]] = answer["data"]["result"]
    return result


@needs_mount
def test_prometheus_scrapes_the_mount(sample: Sample, mount_factory: MountFactory, tmp_path: Path,
                                      prometheus: Callable[[int], int]) -> None:
    port = free_port()
    g = mount_factory(sample.rw, [sample.share_ro], "-o", f"metrics=127.0.0.1:{port}")
    server = prometheus(port)
    expr = f'graftfs_shared_tree_available{{job="graftfs",tree="{sample.share_ro}"}}'
    wait_for(lambda: bool(query(server, expr)), 60, f"Prometheus to store {expr}\n"
             + (tmp_path / "prometheus.log").read_text(errors="replace")[-2000:])
    [series] = query(server, expr)
    assert series["value"][1] == "1"  # type: ignore[index]
    assert query(server, 'up{job="graftfs"}')[0]["value"][1] == "1"  # type: ignore[index]
    assert sh("ls", "-lR", g.mnt).returncode == 0
    wait_for(lambda: bool(query(server, 'graftfs_fuse_requests_total{op="readdir"} > 0')), 30,
             "the readdir requests in Prometheus")
    hist = query(server, 'histogram_quantile(0.5, graftfs_fuse_request_duration_seconds_bucket{op="readdir"})')
    assert hist and 0 < float(hist[0]["value"][1]) <= 10  # type: ignore[index]


# -- mount errors and remount ---------------------------------------------------------------------


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[str]:
    """A mountpoint cleared at teardown, whatever the test did to it."""
    path = str(tmp_path / "mnt")
    os.makedirs(path)
    yield path
    pid = (read_runtime(path) or {}).get("pid")
    force_unmount(path)
    if isinstance(pid, int) and pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


@needs_mount
def test_bad_metrics_values_are_one_line_errors(sample: Sample, mnt: str) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        cases = [
            ("nonsense", 2, "is not HOST:PORT"),
            ("127.0.0.1:", 2, "is not HOST:PORT"),
            ("127.0.0.1:70000", 2, "between 1 and 65535"),
            ("127.0.0.1:0", 2, "between 1 and 65535"),
            ("::1:9108", 2, "in brackets"),
            (f"127.0.0.1:{busy.getsockname()[1]}", 1, "Address already in use"),
            ("192.0.2.1:9108", 1, "Cannot assign requested address"),  # not an address of this host
        ]
        for text, code, message in cases:
            res = graftfs_cmd("mount", "--rw", sample.rw, "--ro", sample.share_ro, "-o", f"metrics={text}", mnt)
            assert res.returncode == code and message in res.stderr, (text, res.returncode, res.stderr)
            assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("graftfs mount: "), res.stderr
            assert find_mount(mnt) is None
    finally:
        busy.close()


@needs_mount
def test_remount_hands_the_port_to_the_new_daemon(sample: Sample, mnt: str) -> None:
    """The old daemon keeps the port while a file open on its detached mount keeps it serving
    (longer than the new daemon takes to record itself); the new one takes the port once it exits."""
    port = free_port()
    res = graftfs_cmd("mount", "--rw", sample.rw, "--ro", sample.share_ro, "-o", f"metrics=127.0.0.1:{port}", mnt)
    assert res.returncode == 0, res.stderr
    old = (read_runtime(mnt) or {}).get("pid")
    assert isinstance(old, int)
    started = value(scrape(port), "graftfs_start_time_seconds")
    held = open(os.path.join(mnt, "overlay", sample.ids.app, "diff", "app", "data.txt"), "rb")  # noqa: SIM115
    try:
        remount = subprocess.Popen([sys.executable, "-m", "graftfs", "remount", mnt], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: (read_runtime(mnt) or {}).get("pid") not in (None, old), 60, "the new daemon's record")
        time.sleep(REBIND_SECONDS * 4)  # the new daemon, recorded, tries the port again meanwhile
        assert pid_alive(old)
        assert value(scrape(port), "graftfs_start_time_seconds") == started  # still the old daemon's
    finally:
        held.close()  # the detached mount is released: the old daemon exits
    _, err = remount.communicate(timeout=60)
    assert remount.returncode == 0, err
    wait_for(lambda: not pid_alive(old), 15, "the old daemon to exit")

    def new_daemon_serves() -> bool:
        try:
            return value(scrape(port), "graftfs_start_time_seconds") > started
        except OSError:
            return False  # between the old daemon closing the port and the new one taking it

    wait_for(new_daemon_serves, 15, "the new daemon's metrics")
    assert graftfs_cmd("umount", mnt).returncode == 0

    def closed() -> bool:
        try:
            scrape(port)
        except urllib.error.URLError:
            return True
        return False

    wait_for(closed, 10, "the port to close at unmount")
