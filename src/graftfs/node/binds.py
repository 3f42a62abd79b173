"""Bind mounts of the runtime's own hot files over the view: no FUSE request at all for them.

containers/storage opens, reads and closes its lock files on every lock, ~220 times in one
`podman run --rm`, and podman keeps its database (libpod/) and the containers' run data
(overlay-containers/) in the graph. None of it is ever shared. Shown as links (see
Namespace._direct), each path walk through them would cost a readlink request where the kernel
does not cache links (the stock pyfuse3, graftfs.fuse.session.links_cached), and each open of a
lock file an open and a release where graftfs serves opens. So graftfs bind-mounts their RW
files and directories over the same names in the view: a path walk then crosses into the
backing filesystem inside the kernel. The view underneath shows the very same RW entries, so a
bind that goes missing (an operator's `umount`, the kernel dropping the entry) costs speed,
never correctness.

The binds are made by the daemon once it serves requests (the path walk to each target goes
through the mount), recorded in the runtime record, and removed before the mount itself by the
daemon on SIGTERM and by `graftfs umount`; a lazy unmount takes them along.
"""

from __future__ import annotations

import logging
import os
import stat

from graftfs.linux import MNT_DETACH, bind_mount, umount
from graftfs.node.mounts import find_mount
from graftfs.view.lock_tokens import LOCK_FILES, TOKEN_BYTES, write_token_fd

log = logging.getLogger(__name__)

VPath = tuple[str, ...]

#: The runtime's node-local directories (containers/storage, podman); its lock files are
#: graftfs.view.lock_tokens.LOCK_FILES.
BIND_DIRS: tuple[VPath, ...] = (("libpod",), ("overlay-containers",))


def _prepare(rw_root: str, vpath: VPath, is_dir: bool) -> str:
    """Create the RW entry the runtime would create (modes as containers/storage makes them)."""
    path = os.path.join(rw_root, *vpath)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if is_dir:
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if os.fstat(fd).st_size < TOKEN_BYTES:
            write_token_fd(fd)  # never shorter than a token (graftfs.view.lock_tokens)
    finally:
        os.close(fd)
    return path


def bind_all(rw_root: str, mountpoint: str) -> list[str]:
    """Bind each hot entry's RW file or directory over its name in the view; returns the
    targets bound. Runs in a worker thread while the mount serves (the targets are looked up
    through it). A failure is logged and leaves that entry served by graftfs."""
    done = []
    for vpaths, is_dir in ((BIND_DIRS, True), (LOCK_FILES, False)):
        for vpath in vpaths:
            target = os.path.join(mountpoint, *vpath)
            try:
                source = _prepare(rw_root, vpath, is_dir)
                st = os.lstat(target)  # through the mount: the view shows the RW entry
                if stat.S_ISDIR(st.st_mode) != is_dir:
                    raise OSError(f"{target} is not a {'directory' if is_dir else 'file'} in the view")
                bind_mount(source, target)
                done.append(target)
            except OSError as e:
                log.warning("cannot bind %s over the view (%s): it is served through graftfs", "/".join(vpath), e)
    return done


def unbind_all(targets: list[str]) -> None:
    """Remove our binds (before unmounting the view, which they would keep busy)."""
    for target in reversed(targets):
        if find_mount(target) is None:
            continue
        try:
            umount(target)
        except OSError:
            try:
                umount(target, MNT_DETACH)  # in use (an open lock file): detach, it stays valid
            except OSError as e:
                log.warning("cannot remove the bind on %s: %s", target, e)
