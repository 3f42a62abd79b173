"""The one errno-mapping boundary every FUSE handler goes through.

pyfuse3 ends the whole mount when a handler raises anything but FUSEError, so each handler is
wrapped: OSError becomes FUSEError(errno), a worker that ran out of time becomes ETIMEDOUT, and
any other exception is logged with its traceback and becomes EIO. trio's Cancelled is a
BaseException and passes through untouched, so shutting the mount down still works.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3

log = logging.getLogger(__name__)

#: FUSE requests served per handler since the mount started (shown by `graftfs status`): what
#: a workload costs in round trips through Python, the first thing to look at when it is slow.
REQUESTS: collections.Counter[str] = collections.Counter()
#: Seconds spent in each handler (wall clock, including waits for worker threads).
REQUEST_SECONDS: dict[str, float] = collections.defaultdict(float)
#: Upper bounds (seconds) of the latency buckets below: few, since each request pays for finding
#: its bucket; from a request answered from memory (~50 us) to one that waited out ``timeout=``.
REQUEST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1, 1.0, 10.0)
#: Requests per handler per latency bucket (the last one: slower than every bound), each request
#: counted in its own bucket only; `graftfs_fuse_request_duration_seconds` (graftfs.node.metrics)
#: cumulates them when scraped. A handler's list exists from the moment it is decorated, so the
#: dict never grows while a scrape reads it from another thread.
REQUEST_HISTOGRAM: dict[str, list[int]] = {}

#: A request tracer, when one is set (``graftfs mount --verbose``): called with each request's
#: handler name and arguments before it runs, so that the FUSE adapter can log which path each
#: request is for (graftfs.fuse.operations.GraftOperations.trace). Empty: one list test per request.
TRACERS: list[Callable[[str, tuple[object, ...]], None]] = []

P = ParamSpec("P")
R = TypeVar("R")


class BackingTimeout(OSError):
    """A backing tree did not answer within the configured time (e.g. a hung share)."""

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(errno.ETIMEDOUT, f"{what} took longer than {seconds:g} s")


def to_fuse_error(exc: BaseException, where: str) -> pyfuse3.FUSEError:
    """Translate an exception raised while serving ``where`` into the FUSEError to answer."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, OSError) and exc.errno:
        if isinstance(exc, BackingTimeout):
            log.warning("%s: %s", where, exc.strerror)
        return pyfuse3.FUSEError(exc.errno)
    log.error("%s failed unexpectedly; answering EIO", where, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


def fuse_boundary(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Decorate an async FUSE handler so that only FUSEError can leave it."""

    name = fn.__name__
    buckets = REQUEST_HISTOGRAM.setdefault(name, [0] * (len(REQUEST_BUCKETS) + 1))

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        REQUESTS[name] += 1
        started = time.perf_counter()
        try:
            if TRACERS:
                TRACERS[0](name, args)  # inside: nothing it raises may leave the handler
            return await fn(*args, **kwargs)
        except Exception as exc:
            raise to_fuse_error(exc, fn.__name__) from None
        finally:
            elapsed = time.perf_counter() - started
            REQUEST_SECONDS[name] += elapsed
            buckets[bisect_left(REQUEST_BUCKETS, elapsed)] += 1

    return wrapper
