"""Running blocking backing-tree I/O off the trio thread, with a time limit.

Every FUSE request is served on the trio thread; a backing tree may be a network share that
hangs. So backing I/O runs in worker threads, and a request whose I/O takes longer than the
limit is answered with ETIMEDOUT while the worker is abandoned (it finishes or stays stuck on its
own; the mount keeps serving other requests).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import trio

from graftfs.errors import BackingTimeout

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_TIMEOUT = 10.0


class Workers:
    def __init__(self, timeout: float = DEFAULT_TIMEOUT, threads: int = 32) -> None:
        self.timeout = timeout
        self.limiter = trio.CapacityLimiter(threads)
        # I/O on already-open files gets threads of its own: an abandoned worker keeps its slot
        # until its syscall returns, and lookups hung on a share must not starve reads and writes
        self.fd_limiter = trio.CapacityLimiter(threads)

    async def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args)`` in a worker thread; raise BackingTimeout past the limit."""
        return await self._run(self.limiter, functools.partial(fn, *args, **kwargs))

    async def run_fd(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Like run, for read/write/fsync/close on an open file descriptor."""
        return await self._run(self.fd_limiter, functools.partial(fn, *args, **kwargs))

    async def _run(self, limiter: trio.CapacityLimiter, call: functools.partial[R]) -> R:
        with trio.move_on_after(self.timeout):
            return await trio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=limiter)
        raise BackingTimeout(getattr(call.func, "__name__", "backing I/O"), self.timeout)
