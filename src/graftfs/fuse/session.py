"""Mounting, serving and unmounting one FUSE session (the daemon calls these, never pyfuse3)."""

from __future__ import annotations

import pyfuse3

from graftfs.fuse.operations import GraftOperations

#: pyfuse3 serves each request in a trio task; at most this many at once.
MIN_TASKS = 4
MAX_TASKS = 64


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
