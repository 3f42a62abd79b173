"""A small inotify binding for trio: watch directories, read change events without blocking.

The watcher uses inotify for trees on local filesystems (the node's RW tree, and RO trees that
are local directories), where it reports changes made behind the mount's back at once. Network
filesystems give no inotify for other clients' changes; those trees are polled instead.

The system calls are in graftfs.linux; the file descriptor is non-blocking and read when
``trio.lowlevel.wait_readable`` says it has data, so the trio thread never blocks on it.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

import trio

from graftfs import linux

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ISDIR = 0x40000000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

#: Name-level changes in a directory: entries appearing, vanishing, changing.
DIR_EVENTS = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len

@dataclass(frozen=True, slots=True)
class Event:
    wd: int
    mask: int
    name: str  # empty for events about the watched directory itself

    @property
    def overflow(self) -> bool:
        return bool(self.mask & IN_Q_OVERFLOW)


class Inotify:
    """One inotify instance; ``add`` directories, ``await read()`` batches of events."""

    def __init__(self) -> None:
        self.fd = linux.inotify_init()

    def add(self, path: str, mask: int = DIR_EVENTS) -> int:
        """Watch directory ``path``; returns its watch descriptor (the same one if already watched)."""
        return linux.inotify_add_watch(self.fd, path, mask | IN_ONLYDIR)

    def remove(self, wd: int) -> None:
        linux.inotify_rm_watch(self.fd, wd)

    async def read(self) -> list[Event]:
        """Wait for events and return all that are queued."""
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                data = os.read(self.fd, 256 * 1024)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            return list(self._parse(data))

    @staticmethod
    def _parse(data: bytes) -> list[Event]:
        events = []
        pos = 0
        while pos + _HEADER.size <= len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, pos)
            pos += _HEADER.size
            raw = data[pos : pos + length].split(b"\0", 1)[0]
            pos += length
            events.append(Event(wd, mask, os.fsdecode(raw)))
        return events

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: statfs f_type of filesystems whose other clients' changes inotify never reports.
NETWORK_FS_MAGIC = {
    0x6969,  # NFS
    0xFF534D42, 0xFE534D42, 0x517B,  # CIFS, SMB2, SMB
    0x00C36400,  # Ceph
    0x65735546,  # FUSE (sshfs, s3fs, ...)
    0x01021997,  # 9p / v9fs
    0x47504653,  # GPFS
    0x0BD00BD0,  # Lustre
    0x61756673,  # AFS
    0x013111A8,  # IBRIX
    0x19830326,  # FhGFS / BeeGFS
}


def is_local_fs(path: str) -> bool:
    """True when ``path`` is on a filesystem where inotify sees every change (not a network fs)."""
    magic = linux.fs_type(path)
    return magic is not None and magic not in NETWORK_FS_MAGIC
