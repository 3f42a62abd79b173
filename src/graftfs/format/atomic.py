"""The one way graftfs writes a whole file: under a temporary name, durable, renamed into place;
and the one way it reads back a JSON state file of its own.

Readers (other nodes, the runtime, the next mount) then see the old file or the new one, never
part of one. The temporary name starts with a dot and ends in ``.tmp``: never shown by a mount
when it sits at the top of a share (``.graftfs-*``), and found by the residue checks if a
crash leaves it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid

log = logging.getLogger(__name__)


def temp_name(path: str) -> str:
    """A unique temporary name beside ``path`` (same directory, so a rename can place it)."""
    directory, base = os.path.split(path)
    dot = "" if base.startswith(".") else "."
    return os.path.join(directory, f"{dot}{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_file_atomically(path: str, data: str | bytes, mode: int = 0o644, sync: bool = True) -> None:
    """Write ``data`` as the whole of ``path``: a temporary file, fsync'ed (unless ``sync`` is
    False, for files only this host reads), renamed over ``path``. A failure leaves ``path`` as
    it was and no temporary file."""
    tmp = temp_name(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with open(fd, "wb") as f:
            f.write(raw)  # one write: readers of a share must never see a piece
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json_state(path: str, otherwise: str) -> object | None:
    """A JSON state file graftfs wrote itself; None when it is missing or damaged (logged, with
    ``otherwise`` saying what happens instead: such a file never decides anything by itself)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s); %s", path, e, otherwise)
        return None
