"""Mounting, serving and unmounting one FUSE session (the daemon calls these, never pyfuse3)."""

from __future__ import annotations

import pyfuse3

from graftfs.fuse.operations import GraftOperations

#: pyfuse3 serves each request in a trio task; at most this many at once.
MIN_TASKS = 4
MAX_TASKS = 64


def links_cached() -> bool:
    """Whether this pyfuse3 asks the kernel to cache symbolic links' targets (built by
    tools/build-pyfuse3; kernels since 4.20 grant it). graftfs then drops a link's cached target
    whenever it may change (graftfs.fuse.kernel_cache); with the stock pyfuse3 the kernel asks
    for the target on every path walk through a link."""
    return bool(getattr(pyfuse3, "CACHE_SYMLINKS", False))


def mount(ops: GraftOperations, mountpoint: str, options: set[str]) -> None:
    """Ask the kernel for the mount; OSError with the kernel's reason when it refuses."""
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as e:  # pyfuse3 reports the kernel's refusal this way
        raise OSError(f"the kernel refused the mount of {mountpoint}: {e}") from None


async def serve() -> None:
    """Answer requests until the mount goes away or ``stop`` is called (run inside trio)."""
    await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)


def stop() -> None:
    """Make ``serve`` return (from the trio thread)."""
    pyfuse3.terminate()


def unmount() -> None:
    """Close the session and unmount (after ``serve`` returned, or when it never ran)."""
    pyfuse3.close(unmount=True)
