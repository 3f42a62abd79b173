"""Telling containers/storage clients that the share changed: a new token in their lock files.

containers/storage decides whether to reload layers.json or images.json by comparing the first
64 bytes of layers.lock or images.lock (the "last writer" token every writer stores there) with
what it saw last. A long-running client (CRI-O, `podman system service`)
therefore sees a change of the share only if the token changes. So after each change of the
share's part of the view, graftfs writes a fresh token, the way a writer does, holding the
file's write lock (a POSIX record lock, as the runtime takes it) so that it never lands between
a writer's read and its own token write: the writer then reloads too.

A lock file reaches its backing file directly (a link, see graftfs.view.namespace), so the token on
disk is the only channel. A fresh lock file also gets a token at once: containers/storage 1.43
takes a file shorter than the token as "changed" on every lock and reloads each time.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import time

from graftfs.format.names import IMAGES, LAYERS

log = logging.getLogger(__name__)

#: The lock files whose tokens guard the merged index files.
TOKEN_LOCKS = ((LAYERS, "layers.lock"), (IMAGES, "images.lock"))
#: All the lock files containers/storage keeps in a graph (each opened, read, closed per lock).
LOCK_FILES = (("storage.lock",), ("userns.lock",), *TOKEN_LOCKS)
TOKEN_BYTES = 64
#: How long to wait for a client holding the lock before writing the token anyway.
LOCK_WAIT_SECONDS = 30.0


def new_token() -> bytes:
    """64 random hex characters, the form containers/storage 1.43 writes itself."""
    return secrets.token_hex(TOKEN_BYTES // 2).encode()


def write_token_fd(fd: int) -> None:
    os.pwrite(fd, new_token(), 0)


def _lock(fd: int, wait: float) -> bool:
    """Take the whole-file write lock, polling (a blocking F_SETLKW could not give up)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def write_token(path: str, wait: float = LOCK_WAIT_SECONDS) -> bool:
    """Write a fresh token into lock file ``path`` under its write lock; False when the file does
    not exist (no client has used it yet, so none has anything to reload)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if not _lock(fd, wait):
            # better a token written beside a writer (it reloads once more) than a change unseen
            log.warning("%s stayed locked for %g s; writing its new token without the lock", path, wait)
        write_token_fd(fd)
        return True
    finally:
        os.close(fd)  # drops the lock


def announce(rw_root: str, wait: float = LOCK_WAIT_SECONDS) -> int:
    """New tokens in every token lock file of the RW tree; returns how many were written."""
    return sum(write_token(os.path.join(rw_root, *vpath), wait) for vpath in TOKEN_LOCKS)
