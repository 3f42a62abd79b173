"""Running backing-tree I/O: in the trio thread when it is quick and local, else off it with a
time limit.

Every FUSE request is served on the trio thread. A hop to a worker thread and back costs
hundreds of microseconds on a busy 2-CPU node (tools/bench: 300-900 us per request, which made
`podman run` 5x slower than native), while a metadata syscall on a local disk costs a few. So
when every backing tree is on a local filesystem, ``run`` and ``run_fd`` call the function
directly. A backing tree may also be a network share that hangs: then backing I/O runs in worker
threads, and a request whose I/O takes longer than the limit is answered with ETIMEDOUT while
the worker is abandoned (it finishes or stays stuck on its own; the mount keeps serving other
requests). ``run_thread`` always uses a worker: for what is slow even on a local disk (copying
a file up, fsync).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import trio

from graftfs.errors import BackingTimeout

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_TIMEOUT = 10.0
#: How often the backing trees' filesystems are checked again (see Workers.follow_locality).
LOCALITY_CHECK_SECONDS = 2.0

log = logging.getLogger(__name__)


def all_local(roots: list[str], is_local: Callable[[str], bool]) -> bool:
    """Are all backing trees on local filesystems (quick calls may then run inline)?"""
    return all(is_local(r) for r in roots)


class Workers:
    def __init__(self, timeout: float = DEFAULT_TIMEOUT, threads: int = 32, inline: bool = False) -> None:
        self.timeout = timeout
        #: every backing tree is local: quick calls run in the trio thread (see module docstring)
        self.inline = inline
        self.limiter = trio.CapacityLimiter(threads)
        # I/O on already-open files gets threads of its own: an abandoned worker keeps its slot
        # until its syscall returns, and lookups hung on a share must not starve reads and writes
        self.fd_limiter = trio.CapacityLimiter(threads)

    async def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a quick call ``fn(*args)``: directly when the trees are local, else in a worker
        thread (BackingTimeout past the limit)."""
        if self.inline:
            return fn(*args, **kwargs)
        return await self._run(self.limiter, functools.partial(fn, *args, **kwargs))

    async def run_fd(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Like run, for read/write/close on an open file descriptor."""
        if self.inline:
            return fn(*args, **kwargs)
        return await self._run(self.fd_limiter, functools.partial(fn, *args, **kwargs))

    async def run_thread(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args)`` in a worker thread, always: for calls that take long even on a
        local disk (copy-up, fsync, composing status)."""
        return await self._run(self.limiter, functools.partial(fn, *args, **kwargs))

    async def follow_locality(self, roots: list[str], is_local: Callable[[str], bool]) -> None:
        """Keep ``inline`` true only while every tree is local: a share's directory may be
        empty and local at mount time and have NFS mounted on it later (runs until cancelled)."""
        while True:
            await trio.sleep(LOCALITY_CHECK_SECONDS)
            try:
                local = await self.run_thread(all_local, roots, is_local)
            except OSError:
                local = False  # statfs itself hung or failed: certainly not a quick local tree
            if local != self.inline:
                log.info("backing trees are %s: quick calls now run %s", "all local" if local else "not all local",
                         "in the trio thread" if local else "in worker threads")
                self.inline = local

    async def _run(self, limiter: trio.CapacityLimiter, call: functools.partial[R]) -> R:
        with trio.move_on_after(self.timeout):
            return await trio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=limiter)
        raise BackingTimeout(getattr(call.func, "__name__", "backing I/O"), self.timeout)


async def guarded(what: str, task: Callable[[], Awaitable[None]], delay: float = 1.0,
                  on_failure: Callable[[], None] | None = None) -> None:
    """Run a background task of the daemon; when it fails, log it and start it again after
    ``delay``. An exception leaving a task would end the nursery it shares with the FUSE loop,
    which unmounts."""
    while True:
        try:
            await task()
            return
        except Exception:
            log.exception("task %s failed; restarting it in %g s", what, delay)
            if on_failure is not None:
                on_failure()
            await trio.sleep(delay)
