"""Which layout a mount presents, and a warning when the runtime writes the other one.

A layout decides what the runtime sees: containers/storage (podman, CRI-O, buildah) reads its
index files ``overlay-layers/layers.json`` and ``overlay-images/images.json``; iSulad reads one
directory per entry. Mounted with the wrong one, the runtime silently sees none of the shared
images and falls back to its registry. So ``auto`` decides from what the runtime already wrote,
and when nothing is written yet (a fresh node), from the mountpoint's path, defaulting to
containers/storage, the layout of the runtimes graftfs is mounted for most; the reason is
logged and shown by ``graftfs status``. While mounted, a check notices a runtime writing the
other layout's files into the RW tree and says so in the log and in the status.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import trio

from graftfs.format.names import LAYERS, LAYERS_JSON, REMOTE_RO_DIR, is_id
from graftfs.fuse.workers import Workers
from graftfs.node.mounts import call_with_timeout
from graftfs.node.options import MountConfig

log = logging.getLogger(__name__)

CONTAINERS_STORAGE = "containers-storage"
ISULAD = "isulad"
#: Files only containers/storage writes at the top of its graph (next to the index files).
CS_SIGNS = (LAYERS_JSON, ("storage.lock",), (LAYERS, "layers.lock"))
#: How often a mount looks for the other layout's files in its RW tree, at first (see CHECK_OFTEN_FOR).
CHECK_SECONDS = 2.0
#: After this long, the RW tree is checked every CHECK_LATER_SECONDS only: a runtime set up for
#: the wrong layout writes its files at its first start, mostly just after the mount, and on a
#: containers-storage mount each check lists ``overlay-layers/`` (a tar-split per layer).
CHECK_OFTEN_FOR = 600.0
CHECK_LATER_SECONDS = 60.0


@dataclass(frozen=True)
class LayoutChoice:
    """The layout a mount presents, and why (logged, and in the status as ``layout_reason``)."""

    name: str
    reason: str


def _writes_containers_storage(tree: str) -> bool:
    return any(os.path.exists(os.path.join(tree, *rel)) for rel in CS_SIGNS)


def _writes_isulad(tree: str) -> bool:
    """iSulad keeps a directory per layer record (containers/storage keeps files there)."""
    try:
        with os.scandir(os.path.join(tree, LAYERS)) as it:
            return any(e.is_dir(follow_symlinks=False) and is_id(e.name) for e in it)
    except OSError:
        return False


def runtime_layout(tree: str) -> str | None:
    """The layout whose files a runtime wrote into ``tree``, if any."""
    if _writes_containers_storage(tree):
        return CONTAINERS_STORAGE
    if _writes_isulad(tree):
        return ISULAD
    return None


def _share_shape(tree: str) -> str | None:
    """The layout a share's own shape says: containers/storage index files, or iSulad's
    remote-RO directories (a graftfs share's per-entry shape serves both)."""
    if os.path.exists(os.path.join(tree, *LAYERS_JSON)):
        return CONTAINERS_STORAGE
    if os.path.isdir(os.path.join(tree, LAYERS, REMOTE_RO_DIR)):
        return ISULAD
    return None


def choose_layout(cfg: MountConfig) -> LayoutChoice:
    """The layout for a mount's options (see the module docstring)."""
    if cfg.layout != "auto":
        return LayoutChoice(cfg.layout, "given")
    if cfg.publish:
        return LayoutChoice(CONTAINERS_STORAGE, "publish=auto reads containers/storage's image records")
    assert cfg.rw is not None
    found = runtime_layout(cfg.rw)
    if found is not None:
        return LayoutChoice(found, f"auto: the RW tree holds {found} files")
    for ro in cfg.ro:
        try:  # a share may hang (an NFS hard mount): its shape is only a hint
            shape = call_with_timeout(functools.partial(_share_shape, ro), cfg.timeout, f"the share {ro}")
        except OSError as e:
            log.warning("choosing the layout: %s", e.strerror or e)
            continue
        if shape is not None:
            return LayoutChoice(shape, f"auto: {ro} holds {shape} files")
    if "isulad" in cfg.mountpoint.lower():
        return LayoutChoice(ISULAD, "auto: the RW tree is empty and the mountpoint's path names iSulad")
    return LayoutChoice(CONTAINERS_STORAGE, "auto: the RW tree is empty; podman/CRI-O's layout is the default "
                        "(layout=isulad for iSulad)")


def mismatch(layout: str, rw_root: str) -> str | None:
    """A warning when the runtime writes the other layout's files into the RW tree. Only the
    other layout's files count: a containers-storage mount's RW tree always holds its own lock
    files (the daemon binds them), which must not hide an iSulad runtime writing there."""
    if layout == CONTAINERS_STORAGE and _writes_isulad(rw_root):
        found = ISULAD
    elif layout == ISULAD and _writes_containers_storage(rw_root):
        found = CONTAINERS_STORAGE
    else:
        return None
    runtime = "containers/storage (podman, CRI-O)" if found == CONTAINERS_STORAGE else "iSulad"
    return (f"the runtime writes {runtime} files into {rw_root} but this mount presents the {layout} "
            f"layout, so the runtime sees no shared image: remount with layout={found}")


class LayoutCheck:
    """Looks for the other layout's files in the RW tree until it finds them (then warns once)."""

    def __init__(self, layout: str, rw_root: str, workers: Workers) -> None:
        self.layout = layout
        self.rw_root = rw_root
        self.workers = workers
        self.warning: str | None = None

    async def run(self) -> None:
        started = trio.current_time()
        while self.warning is None:
            found = await self.workers.run_thread(mismatch, self.layout, self.rw_root)
            if found is not None:
                self.warning = found
                log.warning("%s", found)
                return
            await trio.sleep(check_interval(trio.current_time() - started))


def check_interval(elapsed: float) -> float:
    """Seconds until the next check, ``elapsed`` seconds after the mount (see CHECK_OFTEN_FOR)."""
    return CHECK_SECONDS if elapsed < CHECK_OFTEN_FOR else CHECK_LATER_SECONDS
