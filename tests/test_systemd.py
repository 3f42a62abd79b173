"""graftfs@.service (tools/systemd/): systemd accepts the units as written; the daemon tells a
Type=notify unit READY=1 only once the mount answers and its binds are made, and STOPPING=1 on
SIGTERM; `graftfs remount`, the unit's reload, hands the service manager the new daemon's pid
(and says so when it cannot); and under a real systemd,
booted as PID 1 of namespaces of its own, the unit starts before the runtime, outlives the
runtime's and the share's restarts, reloads, comes back after a crash and stops cleanly."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, GraftMount, Sample, force_unmount, graftfs_cmd, needs_mount, wait_for
from graftfs.node.binds import BIND_DIRS
from graftfs.node.mounts import find_mount, mount_table, pid_alive, read_runtime
from graftfs.view.lock_tokens import LOCK_FILES

UNITS_DIR = REPO / "tools" / "systemd"
UNIT = UNITS_DIR / "graftfs@.service"
UNIT_SUFFIXES = (".service", ".mount", ".socket", ".target", ".path", ".timer")
#: The graftfs command of this checkout's venv (what tools/install links to /usr/local/bin/graftfs).
VENV_GRAFTFS = Path(sys.executable).parent / "graftfs"
SYSTEMD = Path("/usr/lib/systemd/systemd")
READY_TIMEOUT = 30.0


def unit_files() -> list[Path]:
    return sorted(p for p in UNITS_DIR.iterdir() if p.suffix in UNIT_SUFFIXES)


def exec_programs(unit: Path) -> list[str]:
    """The programs a unit's Exec*= lines run (systemd's prefixes -@:+! taken off)."""
    programs = []
    for line in unit.read_text().splitlines():
        key, eq, value = line.partition("=")
        if eq and key.strip().startswith("Exec") and value.strip():
            programs.append(value.strip().lstrip("-@:+!").split()[0])
    return programs


def verify_root(tmp_path: Path, units: list[Path]) -> Path:
    """A root for `systemd-analyze verify --root`: this host's own vendor units (the targets
    ours name), ours in etc/, and a stand-in for each program they run, so that what verify
    says is about our units as they are written and not about what this host has installed."""
    root = tmp_path / "root"
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    etc = root / "etc" / "systemd" / "system"
    etc.mkdir(parents=True)
    for unit in units:
        shutil.copy(unit, etc)
        for program in exec_programs(unit):
            stub = root / program.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    return root


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_says_nothing(tmp_path: Path) -> None:
    """Any line from verify is a finding (it is silent on a clean unit); the template is checked
    both as verify instantiates it and as an instance the README names."""
    units = unit_files()
    assert UNIT in units
    root = verify_root(tmp_path, units)
    names = [u.name for u in units] + ["graftfs@podman.service"]
    for name in names:
        res = subprocess.run(["systemd-analyze", "verify", f"--root={root}", name], capture_output=True,
                             text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert res.returncode == 0 and res.stdout == res.stderr == "", f"{name}:\n{res.stdout}{res.stderr}"


def test_unit_programs_exist_where_installed() -> None:
    """verify runs against stand-ins; the real programs are this host's own, or put at exactly
    that path by tools/install."""
    install = (REPO / "tools" / "install").read_text()
    for unit in unit_files():
        for program in exec_programs(unit):
            if program.startswith("/usr/local/"):
                assert f" {program}\n" in install or f" {program} " in install, f"tools/install never makes {program}"
            else:
                assert os.access(program, os.X_OK), f"{unit.name} runs {program}, not on this host"


def test_reload_is_graftfs_remount() -> None:
    reload = [line.partition("=")[2].split() for line in UNIT.read_text().splitlines()
              if line.startswith("ExecReload=")]
    assert reload == [["/usr/local/bin/graftfs", "remount", "${GRAFTFS_MOUNTPOINT}"]], reload


# --- the notify protocol, with this test as the service manager -----------------------------------


@dataclass
class Notification:
    text: str
    sender: int  # pid, from the kernel's credentials on the datagram

    @property
    def fields(self) -> dict[str, str]:
        return dict(line.partition("=")[::2] for line in self.text.splitlines() if line)


class NotifySocket:
    """An AF_UNIX datagram socket in place of systemd's: what NOTIFY_SOCKET names."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float, alive: subprocess.Popen[bytes] | None = None) -> Notification:
        """The next message within ``timeout`` s; fails early when ``alive`` exits meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(min(0.5, max(0.01, deadline - time.monotonic())))
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("iII")))
            except TimeoutError:
                if alive is not None and alive.poll() is not None:
                    raise AssertionError(f"the sender exited with {alive.returncode} before telling anything") from None
                continue
            return Notification(data.decode(), _sender(ancillary))
        raise AssertionError(f"no notification within {timeout:g} s")

    def close(self) -> None:
        self.sock.close()


def _sender(ancillary: list[tuple[int, int, bytes]]) -> int:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            return int(struct.unpack("iII", data[: struct.calcsize("iII")])[0])
    raise AssertionError("a notification without the sender's credentials")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


@pytest.fixture
def notified_mount(sample: Sample, tmp_path: Path, notify_socket: NotifySocket) -> Iterator[GraftMount]:
    """The sample mounted by `graftfs mount --foreground` as a Type=notify unit starts it (its own
    session, NOTIFY_SOCKET set); not yet ready. Unmounted and reaped at teardown, whatever happened."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    gm = GraftMount(str(mnt), sample.rw, [sample.share_ro], str(tmp_path / "mnt.log"))
    argv = [sys.executable, "-m", "graftfs", "mount", "--foreground", "--layout", "containers-storage",
            "--rw", gm.rw, "--ro", gm.ro[0], "--log-file", gm.log, gm.mnt]
    gm.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "NOTIFY_SOCKET": notify_socket.path})
    try:
        yield gm
    finally:
        gm.stop()


def expected_binds(mnt: str) -> set[str]:
    """What graftfs binds over a containers-storage view (graftfs.node.binds)."""
    return {os.path.join(mnt, *vpath) for vpath in (*BIND_DIRS, *LOCK_FILES)}


def mounted_below(mnt: str, mountinfo: str = "/proc/self/mountinfo") -> set[str]:
    return {e.mountpoint for e in mount_table(mountinfo) if e.mountpoint.startswith(mnt + "/")}


@needs_mount
@pytest.mark.timeout(90)
def test_ready_only_once_mounted_and_bound_then_stopping(notified_mount: GraftMount,
                                                         notify_socket: NotifySocket) -> None:
    gm = notified_mount
    assert gm.proc is not None
    ready = notify_socket.receive(READY_TIMEOUT, alive=gm.proc)
    os.kill(gm.proc.pid, signal.SIGSTOP)  # what is true now was true when READY=1 was sent
    try:
        assert ready.fields.get("READY") == "1" and ready.sender == gm.proc.pid, ready
        assert ready.fields.get("STATUS") == f"serving {gm.mnt}", ready
        entry = find_mount(gm.mnt)
        assert entry is not None and entry.fstype == "fuse.graftfs", mount_table()
        assert mounted_below(gm.mnt) == expected_binds(gm.mnt), gm.log_text()[-3000:]
        recorded = (read_runtime(gm.mnt) or {}).get("binds")  # what graftfs umount removes
        assert isinstance(recorded, list) and set(recorded) == expected_binds(gm.mnt), recorded
    finally:
        os.kill(gm.proc.pid, signal.SIGCONT)
    assert os.path.isdir(gm.path("overlay-images"))  # the mount answers
    gm.proc.send_signal(signal.SIGTERM)
    stopping = notify_socket.receive(READY_TIMEOUT)
    assert stopping.fields == {"STOPPING": "1"} and stopping.sender == gm.proc.pid, stopping
    assert gm.proc.wait(timeout=30) == 0, gm.log_text()[-3000:]
    assert find_mount(gm.mnt) is None and not mounted_below(gm.mnt), mount_table()


@needs_mount
@pytest.mark.timeout(120)
def test_remount_tells_the_new_daemons_pid(notified_mount: GraftMount, notify_socket: NotifySocket) -> None:
    """ExecReload: `graftfs remount`, whose new daemon says READY=1 itself, and MAINPID= from
    remount, the unit's reload command, naming the daemon that now serves the mount."""
    gm = notified_mount
    assert gm.proc is not None
    notify_socket.receive(READY_TIMEOUT, alive=gm.proc)  # the first daemon's READY=1
    remount = subprocess.Popen([str(VENV_GRAFTFS), "remount", gm.mnt], stdin=subprocess.DEVNULL,
                               env={**os.environ, "NOTIFY_SOCKET": notify_socket.path},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    new = 0
    try:
        # both before remount exits: it waits for the old daemon after telling
        got = [notify_socket.receive(60, alive=remount), notify_socket.receive(30, alive=remount)]
        ready = next(n for n in got if "READY" in n.fields)
        mainpid = next(n for n in got if "MAINPID" in n.fields)
        new = ready.sender
        out, _ = remount.communicate(timeout=20)
        assert remount.returncode == 0, out
        assert f"replaced by {new}" in out, out
        assert ready.fields.get("READY") == "1" and new not in (gm.proc.pid, remount.pid), ready
        assert mainpid.fields == {"MAINPID": str(new), "STATUS": f"serving {gm.mnt}"}, mainpid
        assert mainpid.sender == remount.pid, mainpid
        status = json.loads(graftfs_cmd("status", "--json", gm.mnt, check=True).stdout)
        assert status["pid"] == new and (read_runtime(gm.mnt) or {}).get("pid") == new
        assert gm.proc.wait(timeout=30) == 0, gm.log_text()[-3000:]  # the old daemon let go
    finally:
        if remount.poll() is None:
            remount.kill()
            remount.wait(timeout=30)
        force_unmount(gm.mnt)
        _reap_stray(new)


@needs_mount
@pytest.mark.timeout(120)
def test_remount_says_when_systemd_was_not_told(notified_mount: GraftMount, notify_socket: NotifySocket,
                                                tmp_path: Path) -> None:
    """A NOTIFY_SOCKET nobody listens on: the new daemon serves (sdnotify drops its READY=1
    silently), and remount says in one line that systemd was not told and exits 1, as the unit
    would stop when the old daemon exits."""
    gm = notified_mount
    assert gm.proc is not None
    notify_socket.receive(READY_TIMEOUT, alive=gm.proc)  # the first daemon's READY=1
    res = subprocess.run([str(VENV_GRAFTFS), "remount", gm.mnt], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=90, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "nobody")})
    new = (read_runtime(gm.mnt) or {}).get("pid")
    try:
        assert res.returncode == 1, res.stdout + res.stderr
        assert isinstance(new, int) and new != gm.proc.pid and f"replaced by {new}" in res.stdout, res.stdout
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and "systemd could not be told the new daemon's pid" in lines[0], res.stderr
        assert "No such file or directory" in lines[0], res.stderr
        assert json.loads(graftfs_cmd("status", "--json", gm.mnt, check=True).stdout)["pid"] == new
    finally:
        force_unmount(gm.mnt)
        _reap_stray(new if isinstance(new, int) else 0)


def _reap_stray(pid: int) -> None:
    """A daemon started by `graftfs remount` is nobody's child here: it exits once unmounted, or
    is killed."""
    if pid <= 0:
        return
    deadline = time.monotonic() + 15
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


# --- a real systemd, booted in namespaces of its own ------------------------------------------------

#: PID 1 of the new namespaces. It lets go of its copies of the host's mounts (a copy of a FUSE
#: mount held here would keep that mount's daemon serving after the host unmounted it) except the
#: ones the test needs, shows systemd only the vendor targets (no .wants: nothing of the host's
#: starts), the test's units, and the install locations tools/install fills, then becomes systemd.
INIT_SCRIPT = r"""
set -eu
W=$1; shift
keep() {
    case "$1" in /|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*) return 0 ;; esac
    for k in "$@"; do
        case "$k/" in "$1"/*) return 0 ;; esac
    done
    return 1
}
mount --make-rprivate /
findmnt -rn -o TARGET | tac | while read -r t; do
    t=$(printf '%b' "$t")
    keep "$t" "$@" || umount -l "$t" 2>/dev/null || true
done
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /sys/fs/cgroup
mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mount --bind "$W/vendor" /usr/lib/systemd/system
mount --bind "$W/generators" /usr/lib/systemd/system-generators
mount --bind "$W/etc" /etc/systemd/system
mount --bind "$W/local-bin" /usr/local/bin
mount --bind "$W/local-lib" /usr/local/lib
export container=graftfs-test
exec /usr/lib/systemd/systemd --system --unit=multi-user.target
"""


def hybrid_cgroups() -> bool:
    """The cgroup layout the namespace is set up for: v1 name=systemd beside v2 'unified'."""
    table = {(e.mountpoint, e.fstype) for e in mount_table()}
    return {("/sys/fs/cgroup/systemd", "cgroup"), ("/sys/fs/cgroup/unified", "cgroup2")} <= table


needs_systemd = pytest.mark.skipif(
    os.geteuid() != 0 or not SYSTEMD.exists() or not all(shutil.which(c) for c in ("unshare", "nsenter", "setpriv"))
    or not hybrid_cgroups(),
    reason="needs root, systemd, unshare, nsenter, setpriv and the hybrid cgroup layout")


@dataclass
class Systemd:
    """systemd as PID 1 of its own pid, mount, cgroup, uts, ipc and net namespaces."""

    work: Path
    launcher: subprocess.Popen[bytes]
    cgroups: list[Path]
    init: int = 0  # its pid on the host

    def run(self, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside its namespaces (pids there are the namespace's)."""
        cmd = ["nsenter", "-t", str(self.init), "-m", "-p", "-C", "-u", "-i", "-n", *argv]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {res.returncode}\n{res.stdout}{res.stderr}")
        return res

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str) -> dict[str, str]:
        props = "MainPID,ActiveState,SubState,Result,NRestarts,ExecMainStatus"
        out = self.systemctl("show", "-p", props, unit).stdout
        return dict(line.partition("=")[::2] for line in out.splitlines() if line)

    def daemon_pid(self, mnt: str) -> int:
        out = self.run(str(VENV_GRAFTFS), "status", "--json", mnt).stdout
        return int(json.loads(out)["pid"])

    def mounts(self) -> list[str]:
        return [e.mountpoint for e in mount_table(f"/proc/{self.init}/mountinfo")]

    def stop(self) -> None:
        """Kill it (the kernel then kills everything in its pid namespace) and remove its cgroups."""
        if self.init and pid_alive(self.init):
            os.kill(self.init, signal.SIGKILL)
        try:
            self.launcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.launcher.kill()
            self.launcher.wait(timeout=30)
        for top in self.cgroups:
            wait_for(functools.partial(_cgroup_empty, top), 30, f"the processes of {top} to exit")
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                d.rmdir()
            top.rmdir()


def _cgroup_empty(top: Path) -> bool:
    return all(not (d / "cgroup.procs").read_text().strip() for d in [top, *top.rglob("*")] if d.is_dir())


def _vendor_units(dest: Path) -> None:
    """The host's vendor units without their .wants/.requires (nothing of the host's starts) and
    without default.target (booted into multi-user.target)."""
    shutil.copytree("/usr/lib/systemd/system", dest, symlinks=True,
                    ignore=lambda _d, names: [n for n in names if n.endswith((".wants", ".requires"))])
    (dest / "default.target").unlink(missing_ok=True)


def _install_locations(work: Path) -> None:
    """/usr/local as tools/install leaves it, linked to this checkout; the units are the test's
    own (an empty /usr/local/lib hides any this host installed)."""
    (work / "local-bin").mkdir()
    (work / "local-bin" / "graftfs").symlink_to(VENV_GRAFTFS)
    (work / "local-lib").mkdir()


def boot_systemd(work: Path, keep: list[str]) -> Systemd:
    """Boot systemd with ``work/etc`` as /etc/systemd/system; ``keep``: host paths it must see."""
    _vendor_units(work / "vendor")
    (work / "generators").mkdir()
    _install_locations(work)
    script = work / "init.sh"
    script.write_text(INIT_SCRIPT)
    name = f"graftfs-test-{os.getpid()}"
    cgroups = [Path("/sys/fs/cgroup/systemd") / name, Path("/sys/fs/cgroup/unified") / name]
    for cg in cgroups:
        cg.mkdir(exist_ok=True)
    enter = " ".join(f"echo $$ > {cg}/cgroup.procs;" for cg in cgroups)
    # should this test process die without its teardown (a timeout), unshare dies with it, and
    # systemd with unshare: nothing is left running
    unshare = ["setpriv", "--pdeathsig", "KILL", "unshare", "--kill-child=SIGKILL", "--pid", "--fork",
               "--mount-proc", "--mount", "--cgroup", "--uts", "--ipc", "--net", "--propagation", "private",
               "sh", str(script), str(work), *keep]
    launcher = subprocess.Popen(["sh", "-c", f'{enter} exec "$@"', "sh", *unshare], stdin=subprocess.DEVNULL,
                                stdout=open(work / "systemd.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                start_new_session=True)
    sd = Systemd(work, launcher, cgroups)
    wait_for(lambda: _find_init(sd), 30, "systemd to start")
    wait_for(lambda: sd.systemctl("is-system-running", check=False).stdout.strip() in ("running", "degraded"),
             60, "systemd to finish booting")
    return sd


def _find_init(sd: Systemd) -> bool:
    """The launcher's child (unshare forks PID 1 of the new namespace), once it is systemd."""
    if sd.launcher.poll() is not None:
        raise AssertionError(f"the namespace ended: {(sd.work / 'systemd.log').read_text()[-3000:]}")
    try:
        children = Path(f"/proc/{sd.launcher.pid}/task/{sd.launcher.pid}/children").read_text().split()
        sd.init = int(children[0]) if children else 0
        return bool(sd.init) and Path(f"/proc/{sd.init}/comm").read_text().strip() == "systemd"
    except (OSError, ValueError):
        return False


def escape_path(path: str, suffix: str) -> str:
    res = subprocess.run(["systemd-escape", "--path", f"--suffix={suffix}", path], capture_output=True,
                         text=True, check=True, timeout=30)
    return res.stdout.strip()


def write_test_units(work: Path, sample: Sample, mnt: str) -> tuple[str, str]:
    """The units under test in ``work/etc``: graftfs@.service as shipped, with a drop-in that only
    moves its options file (instance "test") and its output into ``work`` and shortens RestartSec;
    a stand-in for crio that records whether the graph's binds were there when it started; a
    target wanting both, as multi-user.target does at boot; the share as a mount unit of its own.
    Returns the graftfs unit and the share's."""
    etc = work / "etc"
    etc.mkdir()
    shutil.copy(UNIT, etc)
    options = f"rw={sample.rw},ro={work / 'share'},layout=containers-storage,lease=0"  # a read-only share
    (work / "test.conf").write_text(f"GRAFTFS_MOUNTPOINT={mnt}\nGRAFTFS_OPTIONS={options}\n")
    (etc / "graftfs@.service.d").mkdir()
    (etc / "graftfs@.service.d" / "test.conf").write_text(
        f"[Service]\nEnvironmentFile=\nEnvironmentFile={work}/%i.conf\n"
        f"StandardOutput=append:{work}/graftfs.log\nStandardError=inherit\nRestartSec=1\n")
    lock = os.path.join(mnt, "storage.lock")
    (etc / "crio.service").write_text(
        "[Unit]\nDescription=a runtime's stand-in\n[Service]\n"
        f"ExecStartPre=/bin/sh -c 'findmnt -n -M {lock} >/dev/null && echo bound > {work}/crio-saw || "
        f"echo not-bound > {work}/crio-saw'\nExecStart=/bin/sleep infinity\n")
    # what boot does: one target wants both, so both start jobs are in one transaction
    (etc / "node.target").write_text("[Unit]\nWants=crio.service graftfs@test.service\n")
    share_unit = escape_path(str(work / "share"), "mount")
    (work / "share").mkdir()
    (etc / share_unit).write_text(f"[Mount]\nWhat={sample.share_ro}\nWhere={work / 'share'}\nOptions=bind,ro\n")
    return "graftfs@test.service", share_unit


@pytest.fixture
def booted(sample: Sample, tmp_path: Path) -> Iterator[tuple[Systemd, str, str, str]]:
    work = tmp_path / "sd"
    work.mkdir()
    mnt = str(tmp_path / "graph")
    os.mkdir(mnt)
    unit, share_unit = write_test_units(work, sample, mnt)
    keep = [str(tmp_path), str(REPO), os.path.realpath(sys.executable), sample.share_ro]
    sd = boot_systemd(work, keep)
    try:
        yield sd, unit, share_unit, mnt
    finally:
        sd.stop()


def _logs(sd: Systemd) -> str:
    out = [f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sd.work.glob("*.log")]
    return "\n".join(out)


@needs_mount
@needs_systemd
@pytest.mark.timeout(180)
def test_unit_under_systemd(booted: tuple[Systemd, str, str, str]) -> None:
    sd, unit, share_unit, mnt = booted
    sd.systemctl("start", share_unit)
    sd.systemctl("start", "node.target")
    state = sd.show(unit)
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), _logs(sd)
    assert (sd.work / "crio-saw").read_text() == "bound\n"  # crio started once the binds were there
    first = int(state["MainPID"])
    assert sd.daemon_pid(mnt) == first

    # neither the runtime's nor the share's restarts or stops reach the daemon
    sd.systemctl("restart", "crio.service")
    sd.systemctl("stop", "crio.service")
    sd.systemctl("restart", share_unit, check=False)  # may fail (in use): it must not matter
    assert sd.show(unit)["MainPID"] == str(first) and sd.daemon_pid(mnt) == first

    # a remount by hand would leave systemd to stop the unit with the old daemon: refused
    by_hand = sd.run(str(VENV_GRAFTFS), "remount", mnt, check=False)
    assert by_hand.returncode == 1 and f"run: systemctl reload {unit}" in by_hand.stderr, by_hand.stderr
    assert sd.daemon_pid(mnt) == first

    # reload: a new daemon, and systemd follows it
    sd.systemctl("reload", unit)
    state = sd.show(unit)
    assert state["ActiveState"] == "active" and state["MainPID"] not in ("0", str(first)), (state, _logs(sd))
    assert sd.daemon_pid(mnt) == int(state["MainPID"])
    wait_for(lambda: sd.run("kill", "-0", str(first), check=False).returncode != 0, 30, "the old daemon to exit")
    assert sd.show(unit)["ActiveState"] == "active"

    # a daemon that dies: its dead mount is cleared and a new one mounted
    sd.run("kill", "-KILL", state["MainPID"])
    wait_for(lambda: sd.show(unit)["NRestarts"] == "1" and sd.show(unit)["SubState"] == "running", 60,
             "the unit to be started again")
    assert sd.daemon_pid(mnt) == int(sd.show(unit)["MainPID"])
    assert sd.mounts().count(mnt) == 1, sd.mounts()

    # stop: the daemon removes its binds and unmounts, and exits 0
    sd.systemctl("stop", unit)
    state = sd.show(unit)
    assert (state["ActiveState"], state["Result"], state["ExecMainStatus"]) == ("inactive", "success", "0"), state
    assert not [m for m in sd.mounts() if m == mnt or m.startswith(mnt + "/")], sd.mounts()


@needs_mount
@needs_systemd
@pytest.mark.timeout(180)
def test_unit_stop_umount_and_bad_options_under_systemd(booted: tuple[Systemd, str, str, str]) -> None:
    """What README says of stopping: `graftfs umount` refuses while a container's mount is below
    the graph, while a stop of the unit unmounts anyway, detaching it; `graftfs umount` of a graph
    not in use ends the unit, not restarted; options that do not parse are not retried."""
    sd, unit, share_unit, mnt = booted
    sd.systemctl("start", share_unit)
    sd.systemctl("start", unit)
    volume = os.path.join(mnt, "volumes", "v1", "_data")  # where podman mounts a volume
    sd.run("mkdir", "-p", volume)
    sd.run("mount", "-t", "tmpfs", "tmpfs", volume)
    refused = sd.run(str(VENV_GRAFTFS), "umount", mnt, check=False)
    assert refused.returncode == 1 and "1 container mount below it" in refused.stderr, refused.stderr
    sd.systemctl("stop", unit)
    state = sd.show(unit)
    assert (state["ActiveState"], state["Result"], state["ExecMainStatus"]) == ("inactive", "success", "0"), state
    assert not [m for m in sd.mounts() if m == mnt or m.startswith(mnt + "/")], sd.mounts()

    sd.systemctl("start", unit)
    sd.run(str(VENV_GRAFTFS), "umount", mnt)
    wait_for(lambda: sd.show(unit)["ActiveState"] == "inactive", 30, "the unit to end with its daemon")
    time.sleep(2)  # past the test's RestartSec=1
    state = sd.show(unit)
    assert (state["ActiveState"], state["Result"], state["NRestarts"]) == ("inactive", "success", "0"), state

    conf = sd.work / "test.conf"
    conf.write_text(conf.read_text().replace("layout=containers-storage", "layout=bogus"))
    assert sd.systemctl("start", unit, check=False).returncode != 0
    time.sleep(2)
    state = sd.show(unit)
    assert (state["ActiveState"], state["ExecMainStatus"], state["NRestarts"]) == ("failed", "2", "0"), state


def test_notify_sends_one_message_whatever_the_mountpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """READY=1 and its status go in one message, also for a mountpoint sdnotify cannot encode as
    it is (Latin-1 only): the status is escaped, the readiness never lost."""
    from graftfs.node import systemd

    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.notify(READY="1", STATUS="serving /mnt/\u56fe")
        assert sock.recv(4096).decode("latin-1") == "READY=1\nSTATUS=serving /mnt/\\u56fe"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.notify(READY="1")  # no service manager: nothing sent, nothing raised


def test_remount_by_hand_of_a_unit_daemon_points_at_systemctl_reload(tmp_path: Path) -> None:
    """A remount outside the unit would leave systemd to stop the unit when the old daemon exits
    (the new one serving outside it): the daemon's control group says which unit it is."""
    from graftfs.cli.remount import service_unit

    proc = tmp_path / "proc"
    for pid, cgroup in ((10, "0::/system.slice/system-graftfs.slice/graftfs@podman.service\n"),
                        (11, "9:name=systemd:/system.slice/system-graftfs.slice/graftfs@crio.service\n4:pids:/\n"),
                        (12, "0::/user.slice/user-0.slice/session-3.scope\n"),
                        (13, "0::/system.slice/gitlab-runner.service\n"), (14, "9:name=systemd:/\n")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(cgroup)
    assert [service_unit(pid, str(proc)) for pid in (10, 11, 12, 13, 14, 15)] == [
        "graftfs@podman.service", "graftfs@crio.service", None, None, None, None]
