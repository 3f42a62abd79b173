"""Telling systemd how a Type=notify service stands (graftfs@.service), through sdnotify.

One message per call, with every field in it (``READY=1`` and its ``STATUS=`` together, as
systemd reads them), sent only when the service manager gave a ``NOTIFY_SOCKET``. sdnotify encodes
messages as Latin-1, so a mountpoint with other characters is escaped rather than making the
message fail and the readiness with it.
"""

from __future__ import annotations

import os

from sdnotify import SystemdNotifier


def notify(strict: bool = False, **fields: str) -> bool:
    """Send ``fields`` (``READY="1"``, ``STATUS=...``, ``MAINPID=...``); False without a service
    manager. ``strict``: an error sending raises OSError instead of being ignored (the daemon
    ignores it, as sd_notify(3) callers do; ``graftfs remount`` must know)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    text = "\n".join(f"{key}={value}" for key, value in fields.items())
    notifier = SystemdNotifier(debug=strict)
    try:
        notifier.notify(text.encode("latin-1", "backslashreplace").decode("latin-1"))
    finally:
        if notifier.socket is not None:
            notifier.socket.close()
    return True
