"""Every libc call graftfs makes that Python's os module does not offer, in one place.

Each wrapper raises OSError with the call's errno, like the os module does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
MNT_FORCE = 1
MNT_DETACH = 2
MS_BIND = 4096
PR_SET_PDEATHSIG = 1


def _check(rc: int, what: str, *paths: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", *paths[:1])
    return rc


def renameat2(old: str, new: str, flags: int) -> None:
    """rename(2) with RENAME_* flags, which os.rename cannot pass (overlayfs needs them)."""
    if flags == 0:
        os.rename(old, new)
        return
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old, None, new)


def bind_mount(source: str, target: str) -> None:
    """mount(2) with MS_BIND: ``source`` shows at ``target``."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), None, ctypes.c_ulong(MS_BIND), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def umount(mountpoint: str, flags: int = 0) -> None:
    """umount2(2) (EBUSY while in use, EINVAL when not a mount)."""
    if _libc.umount2(os.fsencode(mountpoint), ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), mountpoint)


def die_with_parent() -> None:
    """In a child process: get SIGKILL when the parent dies (a killed publish stops copying)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def inotify_init() -> int:
    """A non-blocking, close-on-exec inotify descriptor."""
    return _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    return _check(_libc.inotify_add_watch(fd, os.fsencode(path), ctypes.c_uint32(mask)),
                  f"inotify_add_watch {path}")


def inotify_rm_watch(fd: int, wd: int) -> None:
    """Fails harmlessly when the kernel already dropped the watch."""
    _libc.inotify_rm_watch(fd, wd)


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def fs_type(path: str) -> int | None:
    """statfs(2)'s f_type (the filesystem's magic number), or None when it fails."""
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF
