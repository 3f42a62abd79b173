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
import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import trio

from graftfs.fuse.errors import BackingTimeout

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
        #: threads themselves are not limited: the limiters above bound the requests waiting
        #: on backing I/O, and a thread abandoned past the time limit gives its slot back
        self._threads = trio.CapacityLimiter(math.inf)
        #: worker threads abandoned past the limit and still blocked (a hung share)
        self.abandoned = 0
        self._stuck_lock = threading.Lock()

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
        # The slot is held by this request, not by its thread: a worker abandoned on a hung
        # share stays blocked in its syscall for as long as the share hangs, and if it kept its
        # slot, a few dozen requests on the share would leave none for RW-only paths (which
        # then failed with ETIMEDOUT too: tests/test_reliability.py). Abandoned threads are
        # counted instead; each is freed when its syscall finally returns.
        state = _CallState()
        with trio.move_on_after(self.timeout):
            async with limiter:
                return await trio.to_thread.run_sync(self._tracked, call, state, abandon_on_cancel=True,
                                                     limiter=self._threads)
        self._abandon(state)
        raise BackingTimeout(getattr(call.func, "__name__", "backing I/O"), self.timeout)

    def _tracked(self, call: functools.partial[R], state: _CallState) -> R:
        """Run ``call`` in the worker thread, noting when it returns (an abandoned one is then
        no longer stuck)."""
        try:
            return call()
        finally:
            with self._stuck_lock:
                state.done = True
                if state.abandoned:
                    self.abandoned -= 1

    def _abandon(self, state: _CallState) -> None:
        with self._stuck_lock:
            if state.done:
                return
            state.abandoned = True
            self.abandoned += 1
            count = self.abandoned
        if count & (count - 1) == 0:  # at 1, 2, 4, 8...: enough to see a growing pile
            log.warning("%d worker thread(s) blocked on backing trees that do not answer", count)


@dataclass
class _CallState:
    """One worker call: has it returned, was it abandoned past the time limit?"""

    done: bool = False
    abandoned: bool = False


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
