"""A real distributed share for tests: a GlusterFS replica-3 volume on this host, its three
bricks in the test's tmp dir, mounted with the GlusterFS FUSE client — so that share faults are
the real thing (a brick lost, every brick hung, the volume stopped, glusterd restarted).

* glusterd is the system's (state in /var/lib/glusterd, port 24007). The fixture starts it
  (``glusterd -N``, our child) when it is not running and stops it at the end only then; a
  glusterd that was already running is left running (after ``restart_glusterd`` too: it is
  started again with its own command line). Fixtures of concurrent pytest processes take turns
  (an exclusive flock on /var/lib/glusterd), since glusterd's state is global.
* Every gluster CLI call is bounded (``timeout -k`` around ``gluster --mode=script --timeout``),
  and every wait for something to come up raises with the tail of the relevant log.
* The volume gets a unique name, ``network.ping-timeout`` of a few seconds (a hung brick then
  fails the client's requests with ENOTCONN after that long instead of 42 s), and is mounted with
  ``mount -t glusterfs`` (its client log in the tmp dir).
* Brick processes (``glusterfsd``) and the FUSE client (``glusterfs``) daemonize: they are found
  by their command lines in /proc (brick path, mountpoint) and killed by pid. They are left as
  zombies when PID 1 does not reap orphans (as in this container); zombies are not counted.

Teardown (``close``) always: SIGCONTs what was paused, unmounts the client (lazily if it must)
and kills its process, stops and deletes the volume, kills the volume's brick processes (and,
when the fixture started glusterd, the self-heal daemon and glusterd), takes out of
/var/lib/glusterd, /var/run/gluster and /var/log/glusterfs what appeared there for this volume
(everything new when the fixture started glusterd: the directories are as they were found; the
logs are moved to the tmp dir first), and removes the bricks. Each step is bounded in time and
runs even when an earlier one failed; what could not be done is raised at the end.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from graftfs.linux import MNT_DETACH, umount
from graftfs.node.mounts import find_mount, pid_alive

GLUSTERD = "/usr/sbin/glusterd"
GLUSTER = "/usr/sbin/gluster"
MOUNT_HELPER = "/usr/sbin/mount.glusterfs"
STATE_DIR = "/var/lib/glusterd"
#: Where glusterd, its bricks and daemons keep state, sockets and logs (all restored at the end).
GLUSTER_DIRS = (STATE_DIR, "/var/run/gluster", "/var/log/glusterfs")

CLI_TIMEOUT = 30.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOCK_TIMEOUT = 300.0
#: network.ping-timeout of the test volumes: a hung brick fails the client's requests after this.
PING_TIMEOUT = 3
BRICKS = 3

have_gluster = all(os.path.exists(p) for p in (GLUSTERD, GLUSTER, MOUNT_HELPER, STATE_DIR))
needs_gluster = pytest.mark.skipif(not have_gluster, reason="needs glusterfs-server and glusterfs-client "
                                   "(tools/install --test)")


# -- processes, from /proc ----------------------------------------------------------------------


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def find_processes(match: Callable[[list[str]], bool]) -> list[int]:
    """Live (not zombie) processes whose argv ``match`` accepts."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            argv = _argv(int(name))
            if argv and match(argv) and pid_alive(int(name)):
                out.append(int(name))
    return sorted(out)


def _arg_after(argv: list[str], option: str) -> str | None:
    """The value of ``option`` in ``argv``, given as ``--opt value`` or ``--opt=value``."""
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg[len(option) + 1:]
    return None


def _is_glusterd(argv: list[str]) -> bool:
    return os.path.basename(argv[0]) == "glusterd"


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_dead(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` is alive (zombies count as dead); the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _kill(pids: list[int], timeout: float = STOP_TIMEOUT) -> list[int]:
    """SIGCONT + SIGTERM, then SIGKILL what is left; the pids that still would not die."""
    _signal(pids, signal.SIGCONT)
    _signal(pids, signal.SIGTERM)
    left = _wait_dead(pids, timeout / 2)
    _signal(left, signal.SIGKILL)
    return _wait_dead(left, timeout / 2)


def _tail(path: str, chars: int = 3000) -> str:
    try:
        return f"--- {path} ---\n" + Path(path).read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"--- {path}: {e}"


def _snapshot(dirs: tuple[str, ...]) -> set[str]:
    out: set[str] = set()
    for top in dirs:
        for root, subdirs, files in os.walk(top):
            out.add(root)
            out.update(os.path.join(root, n) for n in subdirs + files)
    return out


# -- the share ----------------------------------------------------------------------------------


@dataclass
class GlusterShare:
    """A replica-3 volume ``volume`` with bricks below ``work``, mounted at ``mountpoint``."""

    work: str
    volume: str
    mountpoint: str
    host: str = field(default_factory=socket.gethostname)
    ping_timeout: int = PING_TIMEOUT
    glusterd: subprocess.Popen[bytes] | None = None  # the glusterd this fixture started
    started_glusterd: bool = False  # glusterd was not running: stop it and restore its dirs at the end
    foreign_argv: list[str] = field(default_factory=list)  # a glusterd we found running: its command line
    clients: list[str] = field(default_factory=list)  # FUSE client mountpoints
    paused: list[int] = field(default_factory=list)
    own_files: set[str] = field(default_factory=set)  # sockets, pid files, logs of this volume's processes
    timings: dict[str, float] = field(default_factory=dict)
    before: set[str] = field(default_factory=set)
    lock_fd: int = -1
    #: what the caller wants the final residue check (tests/residue.py) to cover too
    residue_kwargs: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def bricks(self) -> list[str]:
        return [os.path.join(self.work, f"b{i}", "brick") for i in range(BRICKS)]

    @property
    def log(self) -> str:
        return os.path.join(self.work, "glusterd.log")

    # -- the CLI ----------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``gluster --mode=script ARGS``, bounded in time (the CLI's own --timeout, and ours)."""
        argv = [GLUSTER, "--mode=script", f"--log-file={self.work}/cli.log", f"--timeout={int(timeout)}", *args]
        try:
            res = subprocess.run(["timeout", "-k", "2", str(timeout + 5), *argv], capture_output=True, text=True,
                                 timeout=timeout + 15, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"gluster {' '.join(args)} did not return in {timeout + 15:g} s") from e
        if check and res.returncode != 0:
            raise AssertionError(f"gluster {' '.join(args)} failed ({res.returncode}): {res.stdout}{res.stderr}\n"
                                 f"{_tail(self.log)}\n{_tail(os.path.join(self.work, 'cli.log'))}")
        return res

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str, *logs: str) -> float:
        """Wait for ``predicate``; the seconds it took, or an AssertionError with log tails."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if predicate():
                return time.monotonic() - started
            time.sleep(0.1)
        tails = "\n".join(_tail(p) for p in (self.log, *logs))
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{tails}")

    def _timed(self, name: str, started: float) -> None:
        self.timings[name] = round(time.monotonic() - started, 2)

    # -- glusterd ---------------------------------------------------------------------------

    def glusterd_pids(self) -> list[int]:
        return find_processes(_is_glusterd)

    def _cli_answers(self) -> bool:
        return self.cli("volume", "list", timeout=5, check=False).returncode == 0

    def _spawn_glusterd(self) -> None:
        with open(self.log, "ab") as log:
            self.glusterd = subprocess.Popen([GLUSTERD, "-N", "-p", os.path.join(self.work, "glusterd.pid"),
                                              "--log-file", self.log], stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=log, start_new_session=True)

        def up() -> bool:
            if self.glusterd is not None and self.glusterd.poll() is not None:
                raise AssertionError(f"glusterd exited with {self.glusterd.returncode}\n{_tail(self.log)}")
            return self._cli_answers()

        self._wait(up, START_TIMEOUT, "glusterd to answer")

    def start_glusterd(self) -> None:
        """Use the running glusterd, or start one (then it is ours to stop)."""
        running = self.glusterd_pids()
        if running:
            self.foreign_argv = self.foreign_argv or _argv(running[0])
            self._wait(self._cli_answers, START_TIMEOUT, "the running glusterd to answer")
            return
        self.started_glusterd = True
        self._spawn_glusterd()

    def stop_glusterd(self) -> None:
        """Stop glusterd (the bricks keep running: they are processes of their own)."""
        proc, self.glusterd = self.glusterd, None
        pids = self.glusterd_pids()
        left = _kill(pids)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT)
        assert not left, f"glusterd {left} would not die"

    def restart_glusterd(self) -> None:
        """glusterd goes away and comes back; the bricks and the client stay up meanwhile."""
        started = time.monotonic()
        self.stop_glusterd()
        if self.foreign_argv:  # not ours: back with its own command line, left running at the end
            proc = subprocess.Popen(self.foreign_argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # reaped when it daemonizes (a foreground one just runs on)
            self._wait(self._cli_answers, START_TIMEOUT, "glusterd to answer again")
        else:
            self._spawn_glusterd()
        self._wait(lambda: self._online() == [True] * BRICKS, START_TIMEOUT, "glusterd to see the bricks online")
        self._timed("restart_glusterd", started)

    # -- the volume -------------------------------------------------------------------------

    def create_volume(self) -> None:
        started = time.monotonic()
        for brick in self.bricks:
            os.makedirs(brick)
        self.cli("volume", "create", self.volume, "replica", str(BRICKS),
                 *(f"{self.host}:{b}" for b in self.bricks), "force")
        self.cli("volume", "set", self.volume, "network.ping-timeout", str(self.ping_timeout))
        self.start_volume()
        self._timed("create_volume", started)

    def volume_exists(self) -> bool:
        res = self.cli("volume", "list", timeout=10, check=False)
        return res.returncode == 0 and self.volume in res.stdout.split()

    def start_volume(self, *force: str) -> None:
        """``volume start`` (``force``: also restarts bricks that died); waits for every brick."""
        started = time.monotonic()
        self.cli("volume", "start", self.volume, *force)
        self._wait(lambda: len(self.brick_pids()) == BRICKS and self._online() == [True] * BRICKS, START_TIMEOUT,
                   "every brick to be online", *self.brick_logs())
        self.shd_pids()  # notes its files when it serves this volume
        self._timed("start_volume" + ("_force" if force else ""), started)

    def stop_volume(self) -> None:
        started = time.monotonic()
        self.resume_all()
        self.cli("volume", "stop", self.volume)
        self._wait(lambda: not self.brick_pids(), STOP_TIMEOUT, "the bricks to exit")
        self._timed("stop_volume", started)

    def _online(self) -> list[bool]:
        """Per brick, whether glusterd says it is online (all False when it does not answer)."""
        res = self.cli("volume", "status", self.volume, "--xml", timeout=10, check=False)
        try:
            nodes = ET.fromstring(res.stdout).iter("node")
        except ET.ParseError:
            return [False] * BRICKS
        status = {n.findtext("path"): n.findtext("status") == "1" for n in nodes}
        return [status.get(b, False) for b in self.bricks]

    def brick_logs(self) -> list[str]:
        return [os.path.join("/var/log/glusterfs/bricks", b.strip("/").replace("/", "-") + ".log")
                for b in self.bricks]

    # -- bricks -----------------------------------------------------------------------------

    def brick_pid(self, i: int) -> int | None:
        brick = self.bricks[i]
        found = find_processes(lambda a: os.path.basename(a[0]) == "glusterfsd"
                               and _arg_after(a, "--brick-name") == brick)
        if found:
            self._note_files(found[0])
        return found[0] if found else None

    def _note_files(self, pid: int) -> None:
        """Remember the socket, pid and log files of one of this volume's processes: they are
        this volume's to remove, even when glusterd (not ours) stays (socket names are hashes)."""
        argv = _argv(pid)
        self.own_files.update(f for f in (_arg_after(argv, o) for o in ("-S", "-p", "-l")) if f)

    def brick_pids(self) -> list[int]:
        """The live brick processes of the volume, in brick order (a dead brick is left out)."""
        return [p for p in (self.brick_pid(i) for i in range(BRICKS)) if p is not None]

    def kill_brick(self, i: int) -> int:
        """SIGKILL brick ``i`` (a replica lost); its pid.

        Its pid file goes too: the dead brick stays a zombie here (PID 1 does not reap
        orphans), and glusterd, which checks a brick's pid file with kill(pid, 0), would take
        the zombie for a running brick and never start it again (``discovered already-running
        brick``). On a host whose init reaps, the pid is gone and the file is ignored."""
        pid = self.brick_pid(i)
        assert pid is not None, f"brick {i} is not running"
        pidfile = _arg_after(_argv(pid), "-p")
        os.kill(pid, signal.SIGKILL)
        assert not _wait_dead([pid], STOP_TIMEOUT), f"brick {pid} survived SIGKILL"
        if pidfile:
            with contextlib.suppress(OSError):
                if Path(pidfile).read_text().strip() == str(pid):
                    os.unlink(pidfile)
        return pid

    def restart_brick(self) -> None:
        """Restart dead bricks (``volume start force``) and wait until the client uses them again."""
        self.start_volume("force")
        self.wait_clients_connected()

    def pause_all(self) -> list[int]:
        """SIGSTOP every brick: the server hangs (connections stay open, nothing answers)."""
        pids = self.brick_pids()
        self.paused = [*self.paused, *pids]
        _signal(pids, signal.SIGSTOP)
        return pids

    def resume_all(self) -> None:
        paused, self.paused = self.paused, []
        _signal(paused, signal.SIGCONT)

    def connected_clients(self) -> list[int]:
        """Per brick, how many clients (FUSE mounts, self-heal daemon) are connected to it."""
        res = self.cli("volume", "status", self.volume, "clients", "--xml", timeout=10, check=False)
        try:
            nodes = list(ET.fromstring(res.stdout).iter("node"))
        except ET.ParseError:
            return [0] * BRICKS
        counts = {n.findtext("path"): int(n.findtext("clientsStatus/clientCount") or 0) for n in nodes}
        return [counts.get(b, 0) for b in self.bricks]

    def wait_clients_connected(self, timeout: float = START_TIMEOUT) -> float:
        """Wait until every brick has each FUSE client (and the self-heal daemon) connected."""
        want = len(self.clients) + 1
        took = self._wait(lambda: min(self.connected_clients()) >= want, timeout,
                          f"{want} clients on every brick", *self.client_logs())
        return took

    # -- the FUSE client --------------------------------------------------------------------

    def client_logs(self) -> list[str]:
        return [os.path.join(self.work, f"client-{os.path.basename(m)}.log") for m in self.clients]

    def mount_client(self, mnt: str) -> str:
        """Mount the volume at ``mnt`` with the GlusterFS FUSE client (once it serves)."""
        started = time.monotonic()
        os.makedirs(mnt, exist_ok=True)
        log = os.path.join(self.work, f"client-{os.path.basename(mnt)}.log")
        self.clients.append(mnt)
        res = subprocess.run(["timeout", "-k", "2", str(START_TIMEOUT), "mount", "-t", "glusterfs", "-o",
                              f"log-file={log}", f"{self.host}:/{self.volume}", mnt], capture_output=True,
                             text=True, timeout=START_TIMEOUT + 10, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, f"mount -t glusterfs failed: {res.stdout}{res.stderr}\n{_tail(log)}"
        self._wait(lambda: self.serves(mnt), START_TIMEOUT, f"the client at {mnt} to serve", log)
        self._timed(f"mount {os.path.basename(mnt)}", started)
        return mnt

    def serves(self, mnt: str) -> bool:
        if find_mount(mnt) is None:
            return False
        res = subprocess.run(["timeout", "-k", "1", "5", "stat", "-f", mnt], capture_output=True, timeout=15,
                             stdin=subprocess.DEVNULL)
        return res.returncode == 0

    def client_pids(self, mnt: str | None = None) -> list[int]:
        mnts = [mnt] if mnt else self.clients
        return find_processes(lambda a: os.path.basename(a[0]) == "glusterfs" and _arg_after(a, "--process-name")
                              == "fuse" and a[-1] in mnts)

    def unmount_client(self, mnt: str) -> None:
        pids = self.client_pids(mnt)
        if find_mount(mnt) is not None:
            res = subprocess.run(["timeout", "-k", "2", str(STOP_TIMEOUT), "umount", mnt], capture_output=True,
                                 timeout=STOP_TIMEOUT + 10, stdin=subprocess.DEVNULL)
            if res.returncode != 0 and find_mount(mnt) is not None:
                with contextlib.suppress(OSError):
                    umount(mnt, MNT_DETACH)
        left = _wait_dead(pids, STOP_TIMEOUT / 2)  # the client exits once unmounted
        assert not _kill(left), f"the GlusterFS client of {mnt} would not die"
        assert find_mount(mnt) is None, f"{mnt} is still mounted"

    # -- teardown ---------------------------------------------------------------------------

    def hook_pids(self, op: str = "") -> list[int]:
        """glusterd's hook scripts running now (of operation ``op``, e.g. "delete", or any)."""
        hooks = os.path.join(STATE_DIR, "hooks", "1", op)
        return find_processes(lambda a: any(x.startswith(hooks) for x in a))

    def _wait_post_hooks(self, op: str, appear: float = 5.0) -> None:
        """glusterd runs an operation's post hooks after the CLI has its answer (the delete
        hook runs ``gluster system:: getwd``, and every gluster CLI runs ``gsyncd.py
        --version``, which creates /var/lib/glusterd/geo-replication): wait until the hook has
        come and gone, or did not come within ``appear`` seconds."""
        started = time.monotonic()
        seen = False
        while time.monotonic() - started < appear + STOP_TIMEOUT:
            if self.hook_pids(op):
                seen = True
            elif seen or time.monotonic() - started > appear:
                return
            time.sleep(0.05)
        raise AssertionError(f"glusterd's {op} hooks {self.hook_pids(op)} still run")

    def shd_pids(self) -> list[int]:
        """The self-heal daemon (one for all replicated volumes: glusterd stops it with the last)."""
        pids = find_processes(lambda a: os.path.basename(a[0]) == "glusterfs"
                              and _arg_after(a, "--process-name") == "glustershd")
        for pid in pids:
            if _arg_after(_argv(pid), "--volfile-id") == f"shd/{self.volume}":
                self._note_files(pid)
        return pids

    def close(self) -> None:
        """Teardown, whatever state the test left things in: every step runs, each bounded."""
        problems: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:
                problems.append(f"{what}: {e}")

        started = time.monotonic()
        self.resume_all()
        _signal(self.brick_pids(), signal.SIGCONT)  # whatever else stopped them
        for mnt in reversed(self.clients):
            step(f"unmount {mnt}", lambda m=mnt: self.unmount_client(m))  # type: ignore[misc]
        if not self.glusterd_pids():  # killed by the test: needed to delete the volume
            self.started_glusterd = True
            step("start glusterd", self._spawn_glusterd)
        if self.glusterd_pids():
            if self.volume_exists():
                if self.cli("volume", "stop", self.volume, check=False).returncode != 0:
                    step("volume stop force", lambda: self.cli("volume", "stop", self.volume, "force"))
                step("volume delete", lambda: self.cli("volume", "delete", self.volume))
                step("wait for the delete hooks", lambda: self._wait_post_hooks("delete"))
        else:
            problems.append("no glusterd to delete the volume")
        left = _kill(self.brick_pids())
        if left:
            problems.append(f"brick processes {left} would not die")
        if self.started_glusterd:
            left = _kill(self.shd_pids())
            if left:
                problems.append(f"self-heal daemon {left} would not die")
            step("stop glusterd", self.stop_glusterd)
            # glusterd runs hook scripts (glusterfind, samba, ...) after a volume operation,
            # asynchronously: they write below its dirs, so they must be done before restoring
            step("wait for hook scripts", lambda: self._wait(lambda: not self.hook_pids(), STOP_TIMEOUT,
                                                              "glusterd's hook scripts to finish"))
            step("restore the gluster dirs", self._restore_dirs)
        else:
            step("remove this volume's files", self._remove_own_files)
        for brick in self.bricks:
            shutil.rmtree(os.path.dirname(brick), ignore_errors=True)
        self._timed("teardown", started)
        self.release_lock()
        assert not problems, "gluster teardown:\n" + "\n".join(problems)

    def _new_paths(self) -> list[str]:
        return sorted(_snapshot(GLUSTER_DIRS) - self.before, reverse=True)  # children before parents

    def _restore_dirs(self) -> None:
        """Everything that appeared in glusterd's dirs since the fixture started it goes (the
        new logs are moved to ``work/gluster-logs`` first, for a post mortem)."""
        logs = os.path.join(self.work, "gluster-logs")
        for path in self._new_paths():
            if path.endswith(".log") and os.path.isfile(path):
                dst = os.path.join(logs, os.path.relpath(path, "/var/log/glusterfs").replace("/", "_"))
                os.makedirs(logs, exist_ok=True)
                with contextlib.suppress(OSError):
                    shutil.move(path, dst)
            _remove(path)

    def _remove_own_files(self) -> None:
        """With a glusterd that stays: only what names this volume or its bricks, and the files
        its processes were seen to use."""
        marks = [self.volume, *(os.path.basename(p)[:-4] for p in self.brick_logs())]
        in_use = {arg for pid in find_processes(lambda a: True) for arg in _argv(pid)}
        for path in self._new_paths():
            if (any(m in path for m in marks) or path in self.own_files) and path not in in_use:
                _remove(path)

    def leftovers(self) -> list[str]:
        """What of the share is still there after ``close`` (empty when clean)."""
        out = [f"gluster process left: {p} {' '.join(_argv(p))[:200]}" for p in
               find_processes(lambda a: any(self.volume in x or self.work in x for x in a))]
        out += [f"mount left: {m}" for m in self.clients if find_mount(m) is not None]
        if self.started_glusterd:
            out += [f"glusterd left: {p}" for p in self.glusterd_pids()]
            out += [f"new in the gluster dirs: {p}" for p in self._new_paths()]
        elif self.glusterd_pids() and self.volume_exists():
            out.append(f"volume {self.volume} still exists")
        out += [f"brick left: {b}" for b in self.bricks if os.path.exists(b)]
        return out

    # -- the lock between pytest processes -------------------------------------------------

    def take_lock(self) -> None:
        self.lock_fd = os.open(STATE_DIR, os.O_RDONLY | os.O_DIRECTORY)
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    self.release_lock()
                    raise AssertionError(f"another test holds {STATE_DIR} (flock) for too long") from e
                time.sleep(0.2)

    def release_lock(self) -> None:
        fd, self.lock_fd = self.lock_fd, -1
        if fd >= 0:
            os.close(fd)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


@contextlib.contextmanager
def gluster_share(tmp: Path, *, ping_timeout: int = PING_TIMEOUT) -> Iterator[GlusterShare]:
    """A started replica-3 volume mounted below ``tmp``; always torn down."""
    if not have_gluster:
        pytest.skip("needs glusterfs-server and glusterfs-client (tools/install --test)")
    work = tmp / "gluster"
    work.mkdir()
    share = GlusterShare(str(work), f"graftfs-{uuid.uuid4().hex[:10]}", str(tmp / "glustermnt"),
                         ping_timeout=ping_timeout)
    share.take_lock()
    try:
        share.before = _snapshot(GLUSTER_DIRS)
        started = time.monotonic()
        share.start_glusterd()
        share._timed("start_glusterd", started)
        share.create_volume()
        share.mount_client(share.mountpoint)
        yield share
    finally:
        share.close()


@pytest.fixture(name="gluster_share")
def gluster_share_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GlusterShare]:
    """A GlusterFS share for the test; afterwards nothing of it, nor anything below the test's
    tmp dir (process, mount; graftfs temp files and runtime records the test names in
    ``residue_kwargs``), is left (tests/residue.py). The client's ping-timeout is PING_TIMEOUT
    unless the test parametrizes the fixture (``indirect=True``) with another one."""
    from residue import residue

    with gluster_share(tmp_path, ping_timeout=int(getattr(request, "param", PING_TIMEOUT))) as share:
        yield share
    print(f"gluster timings (s): {share.timings}")
    kwargs = dict(share.residue_kwargs)
    tops = [str(tmp_path), *kwargs.pop("tops", [])]
    left = share.leftovers() + residue(tops, **kwargs)
    assert not left, "left behind:\n" + "\n".join(left)
