"""A real network share for tests: a directory served by a test-private sshd on loopback and
mounted with sshfs, so that share faults are the real thing (a server that is gone, a server
that hangs) rather than a mock.

* sshd runs as ``sshd -D -f <config>`` in a subprocess, on 127.0.0.1 and a free port, with a host
  key, a client key and authorized_keys generated in the test's tmp dir (root login by key only,
  no PAM, StrictModes off since pytest's tmp dirs are not laid out for it). The sftp side is
  ``internal-sftp``: one process per connection, so stopping the connection's processes stops
  the whole server side.
* sshd puts each connection in a session of its own (setsid), so killing the listener's process
  group would leave the connection running: ``stop`` and ``pause`` walk /proc for the listener's
  descendants instead (the listener is stopped first, so that it forks no new one meanwhile).
* sshfs runs in the foreground (``-f``) as our child, with ServerAliveInterval=1 and
  ServerAliveCountMax=2: a SIGSTOP'd server makes ssh drop the connection after ~3 s, and
  ConnectTimeout=2 bounds each reconnect attempt (``reconnect``), so requests on a hung or
  stopped server fail with EIO in seconds instead of hanging. ``keepalive=False`` leaves those
  out: then the sshfs mount hangs for as long as the server is stopped, like an NFS hard mount,
  and only graftfs' own time limit answers.

Teardown (``close``) always resumes a stopped server first (a stopped process does not die of
SIGTERM, and a hung sshfs would block the unmount), then detaches the sshfs mount and kills
sshfs and sshd, each step bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from graftfs.linux import MNT_DETACH, umount
from graftfs.node.mounts import find_mount

SSHD = "/usr/sbin/sshd"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

have_sshfs = os.path.exists(SSHD) and os.path.exists("/usr/bin/sshfs")
needs_sshfs = pytest.mark.skipif(not have_sshfs, reason="needs openssh-server and sshfs (tools/install --test)")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc: sshd's connections are in sessions of their own)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(name))
    return out


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid``, parents before their children."""
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children_of(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@dataclass
class SshShare:
    """``export`` (a local directory) served by sshd and mounted with sshfs at ``mnt``."""

    export: str
    mnt: str
    work: str
    keepalive: bool = True
    port: int = 0
    sshd: subprocess.Popen[bytes] | None = None
    sshfs: subprocess.Popen[bytes] | None = None
    paused: list[int] = field(default_factory=list)

    # -- the server -------------------------------------------------------------------------

    def _keys(self) -> None:
        for name in ("host", "client"):
            key = os.path.join(self.work, name)
            if not os.path.exists(key):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"graftfs-test-{name}",
                                "-f", key], check=True, timeout=30, stdin=subprocess.DEVNULL)
        Path(self.work, "authorized_keys").write_text(Path(self.work, "client.pub").read_text())

    def _config(self) -> str:
        path = os.path.join(self.work, "sshd_config")
        Path(path).write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.work}/host",
            "PidFile none",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            f"AuthorizedKeysFile {self.work}/authorized_keys",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "Subsystem sftp internal-sftp",
            "LogLevel ERROR",
            "",
        ]))
        return path

    def start_sshd(self) -> None:
        """Start the server (again, on the same port when it ran before)."""
        assert self.sshd is None, "sshd is already running"
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self._keys()
        for _ in range(5):
            if not self.port:
                self.port = free_port()
            log = open(os.path.join(self.work, "sshd.log"), "ab")  # noqa: SIM115 - handed to the child
            with log:
                proc = subprocess.Popen([SSHD, "-D", "-e", "-f", self._config()], stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=log, start_new_session=True)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and proc.poll() is None:
                with socket.socket() as s, contextlib.suppress(OSError):
                    s.settimeout(1)
                    s.connect(("127.0.0.1", self.port))
                    self.sshd = proc
                    return
                time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
            if self.sshfs is None:  # nothing depends on the port yet: try another one
                self.port = 0
            else:
                time.sleep(0.5)
        raise AssertionError(f"sshd did not start:\n{Path(self.work, 'sshd.log').read_text(errors='replace')}")

    def server_pids(self) -> list[int]:
        """The listener and every connection it serves."""
        if self.sshd is None:
            return []
        return [self.sshd.pid, *descendants(self.sshd.pid)]

    def stop_sshd(self) -> None:
        """The server goes away, with every connection it serves.

        The listener is stopped first, so that it cannot fork a new connection while we kill the
        others (sshfs reconnects at once: a connection forked during the kill survived it once,
        and the "stopped" server went on serving), then killed (its socket closes: later
        connects are refused), then its connections. They are left as zombies when PID 1 does
        not reap orphans (as in this container); the residue check ignores zombies."""
        if self.sshd is None:
            return
        self.resume()
        proc, self.sshd = self.sshd, None
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)
        conns = descendants(proc.pid)
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)
        _signal_all(conns[::-1], signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP the server and its connections: the share hangs (the listener first, so that
        it forks no connection that would escape the stop)."""
        assert self.sshd is not None, "no sshd to stop"
        os.kill(self.sshd.pid, signal.SIGSTOP)
        self.paused = self.server_pids()
        _signal_all(self.paused, signal.SIGSTOP)

    def resume(self) -> None:
        paused, self.paused = self.paused, []
        _signal_all(paused, signal.SIGCONT)

    # -- the client -------------------------------------------------------------------------

    def sshfs_options(self) -> str:
        opts = [
            "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", f"IdentityFile={self.work}/client",
            f"Port={self.port}", "BatchMode=yes", "LogLevel=ERROR",
            # attributes and listings are fetched again each time, as graftfs' poller needs to
            # see a share's changes (NFS with close-to-open consistency behaves alike)
            "dir_cache=no",
        ]
        if self.keepalive:
            opts += ["reconnect", "ServerAliveInterval=1", "ServerAliveCountMax=2", "ConnectTimeout=2"]
        return ",".join(opts)

    def mount_sshfs(self) -> None:
        assert self.sshfs is None
        os.makedirs(self.mnt, exist_ok=True)
        log = open(os.path.join(self.work, "sshfs.log"), "ab")  # noqa: SIM115 - handed to the child
        with log:
            self.sshfs = subprocess.Popen(["sshfs", "-f", "-o", self.sshfs_options(),
                                           f"root@127.0.0.1:{self.export}", self.mnt],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.sshfs.poll() is not None:
                raise AssertionError(f"sshfs exited with {self.sshfs.returncode}:\n"
                                     f"{Path(self.work, 'sshfs.log').read_text(errors='replace')}")
            if find_mount(self.mnt) is not None:
                return
            time.sleep(0.05)
        raise AssertionError("sshfs did not mount in time")

    def unmount_sshfs(self) -> None:
        proc, self.sshfs = self.sshfs, None
        if find_mount(self.mnt) is not None:
            res = subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True, timeout=STOP_TIMEOUT)
            if res.returncode != 0 and find_mount(self.mnt) is not None:
                with contextlib.suppress(OSError):
                    umount(self.mnt, MNT_DETACH)
        if proc is not None:
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
            # its ssh client may outlive it for a moment: it is in sshfs' process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        """Teardown, whatever state the test left things in."""
        self.resume()
        try:
            self.unmount_sshfs()
        finally:
            self.stop_sshd()


@contextlib.contextmanager
def ssh_share(tmp: Path, export: str, keepalive: bool = True) -> Iterator[SshShare]:
    """Serve ``export`` over sshfs below ``tmp``; always torn down."""
    work = tmp / "ssh"
    work.mkdir(exist_ok=True)
    share = SshShare(export, str(tmp / "sshfs"), str(work), keepalive)
    try:
        share.start_sshd()
        share.mount_sshfs()
        yield share
    finally:
        share.close()
