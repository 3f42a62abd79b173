"""File attributes as graftfs hands them to the kernel.

One small value type serves both real entries (from ``os.lstat`` of a backing file) and
synthesized ones (``overlay/l/<short>`` links), so the FUSE adapter converts a single shape.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Attr:
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    dev: int = 0  # the backing file's device and inode number (0 for synthesized entries): the
    ino: int = 0  # names of one hard-linked file share one inode in the view (graftfs.fuse.inodes)

    @classmethod
    def from_stat(cls, st: os.stat_result) -> Attr:
        return cls(
            st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_rdev,
            st.st_blocks, st.st_blksize, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_dev, st.st_ino,
        )

    @classmethod
    def synthetic_dir(cls, mtime_ns: int, mode: int = 0o700) -> Attr:
        return cls(stat.S_IFDIR | mode, 2, 0, 0, 4096, 0, 8, 4096, mtime_ns, mtime_ns, mtime_ns)

    @classmethod
    def synthetic_file(cls, size: int, mtime_ns: int, mode: int = 0o600, uid: int = 0, gid: int = 0) -> Attr:
        return cls(stat.S_IFREG | mode, 1, uid, gid, size, 0, (size + 511) // 512, 4096, mtime_ns, mtime_ns, mtime_ns)

    @classmethod
    def synthetic_symlink(cls, target: str, mtime_ns: int) -> Attr:
        size = len(os.fsencode(target))
        return cls(stat.S_IFLNK | 0o777, 1, 0, 0, size, 0, 0, 4096, mtime_ns, mtime_ns, mtime_ns)

    @property
    def sig(self) -> tuple[int, int, int, int]:
        """What changes when the entry changes (type and mode, size, times): see graftfs.fuse.kernel_cache."""
        return (self.mode, self.size, self.mtime_ns, self.ctime_ns)

    @property
    def identity(self) -> tuple[int, int] | None:
        """The backing file a hard-linked regular file is (its names share one view inode), else None."""
        if stat.S_ISREG(self.mode) and self.nlink > 1 and self.ino:
            return (self.dev, self.ino)
        return None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def with_nlink(self, nlink: int) -> Attr:
        return replace(self, nlink=nlink)
