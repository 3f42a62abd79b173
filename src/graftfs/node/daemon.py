"""The mount daemon: build the merged view, mount it, serve until unmounted or told to stop.

``graftfs mount`` without --foreground starts this in a new session as a child process and
waits on a pipe (``--ready-fd``) for one line: ``READY`` once the kernel mount exists, or
``ERROR <reason>``. That way the command returns only when the mount can be used, and a failure
is reported by the command the user ran, not only in a log.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from graftfs import __version__
from graftfs.format.names import STATE_DIR
from graftfs.fuse import files, session
from graftfs.fuse.errors import TRACERS
from graftfs.fuse.inodes import InodeTable
from graftfs.fuse.inotify import is_local_fs
from graftfs.fuse.kernel_cache import KernelCache, ViewGeneration
from graftfs.fuse.operations import GraftOperations
from graftfs.fuse.watcher import Watcher
from graftfs.fuse.workers import Workers, all_local, guarded
from graftfs.node import binds, systemd
from graftfs.node.autopublish import AutoPublisher
from graftfs.node.keeper import LeaseKeeper
from graftfs.node.layout_choice import LayoutCheck, LayoutChoice, choose_layout
from graftfs.node.mounts import check_mountable, is_graftfs_daemon, recorded_pid, remove_runtime, write_runtime
from graftfs.node.options import ConfigError, MountConfig
from graftfs.share import leases, pins
from graftfs.view.containers_storage import ContainersStorageLayout, containers_storage_catalog
from graftfs.view.hides import HideStore
from graftfs.view.isulad import IsuladLayout, isulad_catalog
from graftfs.view.layout import Layout
from graftfs.view.namespace import Namespace
from graftfs.view.plain import PlainLayout
from graftfs.view.small_files import CACHE_DIR, SmallFiles

if TYPE_CHECKING:
    from graftfs.node.metrics import MetricsServer

log = logging.getLogger(__name__)


def make_layout(name: str, cfg: MountConfig) -> Layout:
    """The presenter for layout ``name``, its catalog loaded (a share that does not answer within
    ``timeout=`` starts out empty rather than holding up the mount)."""
    assert cfg.rw is not None
    layout: Layout
    if name == "isulad":
        layout = IsuladLayout(isulad_catalog(cfg.ro, cfg.rw), direct=bool(cfg.direct))
    elif name == "containers-storage":
        live = containers_storage_catalog(cfg.ro, cfg.rw, pins.ensure_pin_tree(cfg.rw))
        layout = ContainersStorageLayout(live, cfg.rw, direct=cfg.direct is not False)
    elif name == "plain":
        layout = PlainLayout(cfg.ro)
    else:
        raise ConfigError(f"layout {name!r} is not supported by this version of graftfs yet")
    if layout.live is not None:
        for root in layout.live.load(cfg.timeout):
            log.error("shared tree %s did not answer within %g s: mounting with it empty; its images show "
                      "once it answers", root, cfg.timeout)
    return layout


def build_namespace(cfg: MountConfig, choice: LayoutChoice) -> Namespace:
    assert cfg.rw is not None
    state_dir = os.path.join(cfg.rw, STATE_DIR)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    layout = make_layout(choice.name, cfg)
    # calls stuck past the mount's time limit: further calls on that tree fail at once
    ns = Namespace(cfg.rw, layout, HideStore(state_dir), hang_after=cfg.timeout,
                   small_files=small_files(layout, state_dir))
    ns.sweep_tmp()
    # the share may have changed while unmounted; briefly: a client holding a lock now gets the
    # token beside it (it reloads once more)
    layout.announce(wait=1.0)
    return ns


def small_files(layout: Layout, state_dir: str) -> SmallFiles | None:
    """Node-local copies of shared images' small files, for a layout with a catalog."""
    live = layout.live
    if live is None:
        return None
    return SmallFiles(os.path.join(state_dir, CACHE_DIR),
                      lambda eid: eid in live.catalog.images or eid in live.catalog.layers)


def setup_logging(log_file: str | None, verbose: bool = False) -> None:
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


@dataclass
class BindState:
    """The daemon's bind mounts over its own view (graftfs.node.binds)."""

    wanted: bool
    rw_root: str
    mountpoint: str
    runtime: dict[str, object]
    ready: Callable[[], None]  # tells `graftfs mount` the mount is ready: only once bound, so that
    # no client opens a lock file through FUSE (a different inode, whose locks would not exclude
    # those taken on the RW file under the bind)
    #: told the view paths bound (the watcher: nothing to tell the kernel of changes behind them)
    on_bound: Callable[[list[tuple[str, ...]]], None] | None = None
    targets: list[str] = field(default_factory=list)
    made: trio.Event = field(default_factory=trio.Event)

    async def make(self) -> None:
        try:
            if self.wanted:
                self.targets = await trio.to_thread.run_sync(binds.bind_all, self.rw_root, self.mountpoint)
                if self.on_bound is not None:
                    self.on_bound([tuple(os.path.relpath(t, self.mountpoint).split(os.sep)) for t in self.targets])
                write_runtime(self.mountpoint, {**self.runtime, "binds": self.targets})  # for graftfs umount
        except OSError as e:
            log.warning("cannot record the binds: %s", e)
        finally:
            self.made.set()
            self.ready()

    async def remove(self) -> None:
        """Remove the binds (waiting for them to be made first: a bind made after this would
        keep the mount busy forever)."""
        with trio.move_on_after(BIND_REMOVE_SECONDS):
            await self.made.wait()
            if self.targets and self._still_ours():
                await trio.to_thread.run_sync(binds.unbind_all, self.targets, abandon_on_cancel=True)

    def _still_ours(self) -> bool:
        """Binds are removed by path: after `graftfs remount` the paths hold the new daemon's
        binds (its runtime record names it), which this one, detached, must leave alone. Only a
        record naming this daemon makes them ours: a missing one (removed, or the new daemon's
        not written yet) proves nothing, and unbinding a successor's binds under its running
        containers is worse than leaving ours (the lazy unmount at exit takes them along)."""
        return recorded_pid(self.mountpoint) == os.getpid()


BIND_REMOVE_SECONDS = 10.0


@dataclass
class Background:
    """What runs beside the FUSE loop, and what ``graftfs status`` reports of it."""

    bound: BindState
    workers: Workers
    trees: list[str]
    layout_check: LayoutCheck
    watcher: Watcher | None = None
    keeper: LeaseKeeper | None = None
    autopublish: AutoPublisher | None = None

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"inline_io": self.workers.inline, "layout_warning": self.layout_check.warning}
        out["watcher"] = self.watcher.status() if self.watcher is not None else {"enabled": False}
        if self.keeper is not None:
            out["leases"] = self.keeper.status()
        if self.autopublish is not None:
            out["autopublish"] = self.autopublish.status()
        return out


async def _serve(bg: Background) -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    log.info("signal %d: unmounting", signum)
                    systemd.notify(STOPPING="1")
                    await bg.bound.remove()  # they would keep the mount busy
                    session.stop()
                    return

        nursery.start_soon(stop_on_signal)
        nursery.start_soon(bg.bound.make)
        nursery.start_soon(bg.workers.follow_locality, bg.trees, is_local_fs)
        nursery.start_soon(guarded, "layout check", bg.layout_check.run, 5.0)
        if bg.watcher is not None:
            nursery.start_soon(bg.watcher.run)
        if bg.keeper is not None:
            nursery.start_soon(guarded, "leases", bg.keeper.run, 2.0)
        if bg.autopublish is not None:
            publisher = bg.autopublish
            nursery.start_soon(guarded, "auto-publish", lambda: publisher.run(bg.bound.made), 5.0)
        await session.serve()
        nursery.cancel_scope.cancel()


def make_keeper(cfg: MountConfig, ns: Namespace, workers: Workers) -> LeaseKeeper | None:
    """This node's leases in its shares, for containers-storage mounts (whose runtime state
    says what is in use) unless ``lease=0``."""
    live = ns.layout.live
    if cfg.lease <= 0 or not ns.layout.leases or live is None:
        return None
    node = leases.node_id(os.path.join(ns.rw_root, STATE_DIR))
    return LeaseKeeper(live, ns.rw_root, list(cfg.ro), node, cfg.lease, workers)


def make_watcher(cfg: MountConfig, ns: Namespace, inodes: InodeTable, generation: ViewGeneration,
                 workers: Workers) -> Watcher | None:
    """The watcher that keeps the kernel's caches exact, for a layout with a catalog to keep
    current, unless ``poll=0`` (then the kernel caches for a second only)."""
    live = ns.layout.live
    if live is None or cfg.poll <= 0:
        return None
    kernel = KernelCache(inodes, ns, workers)
    watcher = Watcher(live, ns.layout, ns.rw_root, inodes, kernel, generation, workers, cfg.poll, cfg.share_inotify)
    watcher.open()
    return watcher


def make_autopublisher(cfg: MountConfig, ns: Namespace, workers: Workers) -> AutoPublisher | None:
    """The auto-publish task (``publish=auto``), publishing to the first share."""
    if not cfg.publish:
        return None
    if not ns.layout.leases:  # the layouts that read the runtime's records
        raise ConfigError("publish=auto needs the containers-storage layout")
    return AutoPublisher(cfg.mountpoint, ns.rw_root, cfg.ro[0], list(cfg.publish_match), workers,
                         os.path.join(ns.rw_root, STATE_DIR))


def start_metrics(cfg: MountConfig) -> MetricsServer | None:
    """The ``metrics=`` endpoint, listening before the shares are scanned: an address that cannot
    be listened on fails the mount at once, in one line (ConfigError)."""
    if cfg.metrics is None:
        return None
    from graftfs.node.metrics import MetricsServer  # prometheus_client only where metrics are served

    server = MetricsServer(*cfg.metrics)
    old = _predecessor(cfg.mountpoint)
    # the pid is read now, before this daemon records itself (write_runtime): the old daemon may
    # hold the port for long after that, serving files still open on its detached mount
    server.start(lambda: old is not None and is_graftfs_daemon(old))
    return server


def _predecessor(mountpoint: str) -> int | None:
    """The pid of the daemon this mountpoint's runtime record names, when that is not this one:
    the one ``graftfs remount`` replaces (still serving its detached mount), or a dead one."""
    pid = recorded_pid(mountpoint)
    return pid if pid != os.getpid() else None


def watch_metrics(metrics: MetricsServer | None, cfg: MountConfig, started: float, layout: str, ops: GraftOperations,
                  bg: Background) -> None:
    """Let the endpoint serve this mount's figures (graftfs.node.metrics)."""
    if metrics is not None:
        from graftfs.node.metrics import Sources

        metrics.watch(Sources(__version__, cfg.mountpoint, layout, started, ops, ops.ns, ops.generation, bg.status,
                              bg.watcher, bg.keeper))


def _stop_metrics(metrics: MetricsServer | None) -> None:
    """Close the metrics port, first thing on every way out: a successor (``graftfs remount``)
    may be waiting to take it over."""
    if metrics is not None:
        metrics.stop()


def _save_scans(layout: Layout) -> None:
    """Keep the shares' scans for a quick next mount; losing them only costs a full scan."""
    if layout.live is not None:
        try:
            layout.live.save()
        except OSError as e:
            log.warning("could not save the shares' scans for the next mount: %s", e)


def _tell(ready_fd: int | None, line: str) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, (line.replace("\n", " ") + "\n").encode())
        os.close(ready_fd)
    except OSError:
        pass


def _ready(ready_fd: int | None, mountpoint: str) -> None:
    """The mount and its binds are ready: tell `graftfs mount` (its pipe) and systemd (a
    Type=notify service: NOTIFY_SOCKET; nothing is sent without it)."""
    _tell(ready_fd, "READY")
    systemd.notify(READY="1", STATUS=f"serving {mountpoint}")


def run(cfg: MountConfig, ready_fd: int | None = None) -> int:
    """Mount and serve in this process until unmounted; returns the exit status."""
    os.umask(0)  # modes come from the clients' requests, already masked by the kernel
    metrics: MetricsServer | None = None
    try:
        cfg.check()
        check_mountable(cfg)
        metrics = start_metrics(cfg)
        choice = choose_layout(cfg)
        log.info("layout %s (%s)", choice.name, choice.reason)
        ns = build_namespace(cfg, choice)
        # quick backing calls run in the trio thread only when no tree can hang (graftfs.fuse.workers)
        trees = [ns.rw_root, *cfg.ro]
        workers = Workers(cfg.timeout, inline=all_local(trees, is_local_fs))
        autopublish = make_autopublisher(cfg, ns, workers)
    except (ConfigError, OSError) as e:
        _stop_metrics(metrics)
        log.error("cannot mount: %s", e)
        _tell(ready_fd, f"ERROR {e}")
        return 1
    started = time.time()
    inodes, generation = InodeTable(), ViewGeneration()
    watcher = make_watcher(cfg, ns, inodes, generation, workers)
    # argv: what `graftfs remount` mounts again
    runtime: dict[str, object] = {"pid": os.getpid(), "rw": cfg.rw, "ro": cfg.ro, "log": cfg.log_file,
                                  "argv": cfg.to_argv(), "verbose": logging.getLogger().isEnabledFor(logging.DEBUG)}
    bound = BindState(ns.layout.binds, ns.rw_root, cfg.mountpoint, runtime, lambda: _ready(ready_fd, cfg.mountpoint),
                      on_bound=watcher.behind_binds if watcher is not None else None)
    bg = Background(bound, workers, trees, LayoutCheck(choice.name, ns.rw_root, workers), watcher,
                    make_keeper(cfg, ns, workers), autopublish)

    def info() -> dict[str, Any]:
        return {"version": __version__, "pid": os.getpid(), "mountpoint": cfg.mountpoint, "started": started,
                "timeout": cfg.timeout, "fuse_options": sorted(cfg.fuse_option_set()),
                "cache_timeout": ops.cache_timeout, "layout_reason": choice.reason,
                "kernel_opens": ops.files is not None, "links_cached": session.links_cached(), **bg.status()}

    kernel_opens = files.supported() if cfg.kernel_opens is None else cfg.kernel_opens
    if kernel_opens and not files.supported():
        log.error("kernel_opens=1: this pyfuse3 cannot serve files the kernel opens itself (tools/install "
                  "rebuilds it with tools/build-pyfuse3)")
        _tell(ready_fd, "ERROR kernel_opens=1 needs the pyfuse3 tools/build-pyfuse3 builds")
        return 1
    ops = GraftOperations(ns, workers, inodes, generation, listener=watcher, info=info, kernel_opens=kernel_opens)
    if logging.getLogger(GraftOperations.__module__).isEnabledFor(logging.DEBUG):
        TRACERS[:] = [ops.trace]  # --verbose: every request in the log, with its path
    watch_metrics(metrics, cfg, started, ns.layout.name, ops, bg)
    try:
        session.mount(ops, cfg.mountpoint, cfg.fuse_option_set())
    except OSError as e:
        _stop_metrics(metrics)
        log.error("cannot mount %s: %s", cfg.mountpoint, e)
        _tell(ready_fd, f"ERROR {e}")
        return 1
    try:
        write_runtime(cfg.mountpoint, runtime)
    except OSError as e:
        _stop_metrics(metrics)
        log.error("cannot record the daemon in %s: %s", cfg.mountpoint, e)
        session.unmount()
        _tell(ready_fd, f"ERROR cannot write the runtime record: {e}")
        return 1
    log.info("graftfs %s mounted %s (rw=%s ro=%s layout=%s)", __version__, cfg.mountpoint, cfg.rw,
             ",".join(cfg.ro), ns.layout.name)
    try:
        if watcher is not None:
            watcher.watch_rw_dir(ops.inodes.root, ns.rw_root)
        trio.run(_serve, bg)
    except BaseException:
        log.exception("the FUSE loop failed")
        raise
    finally:
        TRACERS.clear()
        _stop_metrics(metrics)
        session.unmount()
        if watcher is not None:
            watcher.close()
        ns.hides.close()
        _save_scans(ns.layout)
        remove_runtime(cfg.mountpoint, os.getpid())
        log.info("unmounted %s", cfg.mountpoint)
    return 0
