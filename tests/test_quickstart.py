"""The README, as a user meets it: its quick start runs verbatim and prints what it says, its
set-up commands stay as they are, and its links (and those of docs/) lead somewhere.

The quick start is every ```sh block between ``<!-- quickstart -->`` and ``<!-- /quickstart -->``,
run in order in one ``bash -euo pipefail`` from the checkout, with only ``QS`` (the directory
everything goes below) set to a short directory of the test's own. A ``#> TEXT`` line in a block
is output the README promises: some line the block printed must be TEXT (``...`` stands for
anything), in the order shown. Whatever happens, the test leaves nothing behind: podman's
containers and mounts below QS, both graftfs mounts and every process naming QS are removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, force_unmount, needs_mount
from graftfs.linux import MNT_DETACH, umount
from graftfs.node.mounts import FSTYPE, mount_table, pid_alive

README = REPO / "README.md"
DOCS = REPO / "docs"
SET_UP_COMMANDS = ("tools/install && .venv/bin/graftfs demo",
                   "tools/install --test && .venv/bin/python -m pytest -q")
START, END = "<!-- quickstart -->", "<!-- /quickstart -->"
BLOCK_MARK = "@@quickstart-block-{}@@"
RUN_TIMEOUT = 100.0


def quickstart_blocks(text: str) -> list[str]:
    """The ```sh blocks of the README's quick start, in order."""
    assert text.count(START) == 1 and text.count(END) == 1, f"the README needs one {START} ... {END}"
    section = text.split(START, 1)[1].split(END, 1)[0]
    return re.findall(r"^```sh\n(.*?)^```$", section, re.S | re.M)


def expected_lines(block: str) -> list[str]:
    return [line.strip()[2:].strip() for line in block.splitlines() if line.strip().startswith("#>")]


def _pattern(expected: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in expected.split("...")))


def check_block_output(index: int, block: str, output: str) -> list[str]:
    """The ``#>`` lines of one block that its output does not show (in order); empty when all do."""
    lines = [line.strip() for line in output.splitlines()]
    missing, pos = [], 0
    for expected in expected_lines(block):
        pattern = _pattern(expected)
        for i in range(pos, len(lines)):
            if pattern.fullmatch(lines[i]):
                pos = i + 1
                break
        else:
            missing.append(f"block {index + 1}: no line {expected!r} (after line {pos})")
    return missing


def test_readme_keeps_the_set_up_commands() -> None:
    """A newcomer's two commands are in the README verbatim, and CI runs the second one."""
    text = README.read_text()
    for command in SET_UP_COMMANDS:
        assert f"    {command}\n" in text, f"README lost its set-up command: {command}"
    assert f'"{SET_UP_COMMANDS[1]}"' in (REPO / ".ci" / "run").read_text()


def test_quickstart_is_well_formed() -> None:
    """Enough blocks with promises to be worth running, and only QS taken from outside."""
    blocks = quickstart_blocks(README.read_text())
    assert len(blocks) >= 5, blocks
    assert sum(len(expected_lines(b)) for b in blocks) >= 10
    assert 'QS=${QS:-' in blocks[0]
    # what a block must print is checked against what it printed (the checker itself works)
    assert check_block_output(0, "echo a\n#> a ... c\n#> d\n", "x\na b c\nd\n") == []
    assert check_block_output(0, "#> d\n#> a\n", "a\nd\n") == ["block 1: no line 'a' (after line 2)"]


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"`|\*\*|\[([^]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.S | re.M)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_readme_and_docs_links_lead_somewhere() -> None:
    """Every relative link of README.md and docs/*.md names a file that exists, and a heading in
    it when it names one."""
    pages = [README, *sorted(DOCS.glob("*.md"))]
    assert len(pages) >= 3, "the README's internals live in docs/"
    broken = []
    for page in pages:
        text = re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no {dest})")
            elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest)):
                broken.append(f"{page.name}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


# --- running the quick start -----------------------------------------------------------------

def _mounts_below(top: str) -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount below ``top``, deepest first."""
    found = [(m.mountpoint, m.fstype) for m in mount_table() if m.mountpoint.startswith(top + "/")]
    return sorted(found, key=lambda m: -len(m[0]))


def _own_processes(top: str) -> list[int]:
    """Processes whose command line names ``top`` (a directory only this test uses)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if top.encode() in Path(entry.path, "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


def _podman_nodes(qs: str) -> list[dict[str, str]]:
    """The environment of each node the quick start configured (its two podman config files)."""
    envs = []
    for storage in sorted(Path(qs).glob("*/storage.conf")):
        containers = storage.with_name("containers.conf")
        if containers.exists():
            envs.append({**os.environ, "CONTAINERS_STORAGE_CONF": str(storage), "CONTAINERS_CONF": str(containers)})
    return envs


def _clean_up(qs: str) -> None:
    """Remove whatever the quick start left below ``qs``, even half-way through."""
    if any(fstype == FSTYPE for _, fstype in _mounts_below(qs)):
        for env in _podman_nodes(qs):  # containers first: they hold overlays below the graphs
            for args in (["rm", "-af", "-t", "0"], ["unmount", "-a"]):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    subprocess.run(["timeout", "-k", "5", "60", "podman", *args], env=env, timeout=75,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for mnt, fstype in _mounts_below(qs):
        if fstype == FSTYPE:
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run([sys.executable, "-m", "graftfs", "umount", mnt], timeout=60,
                               stdin=subprocess.DEVNULL, capture_output=True)
    for mnt, _ in _mounts_below(qs):  # what refused: container overlays, binds, then the mounts
        with contextlib.suppress(OSError):
            umount(mnt, MNT_DETACH)
        force_unmount(mnt)
    deadline = time.monotonic() + 15
    while (pids := _own_processes(qs)) and time.monotonic() < deadline:
        time.sleep(0.2)  # daemons exit once their mount is gone
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _run(script: str, qs: str) -> tuple[int | None, str]:
    """Run the script in its own session; output goes to a file (podman waits for conmon at exit
    when its output is a pipe). Returns the exit status (None when it timed out) and the output."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env={**os.environ, "QS": qs},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            code = None
        out.seek(0)
        return code, out.read()


@needs_mount
@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("podman") is None or shutil.which("runc") is None,
                    reason="needs podman and runc (tools/install --test)")
@pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="needs busybox-static (tools/install --test)")
@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "graftfs").exists(), reason="needs tools/install's .venv")
def test_quickstart_runs_verbatim() -> None:
    blocks = quickstart_blocks(README.read_text())
    script = "".join(f"echo {BLOCK_MARK.format(i)}\n{block}\n" for i, block in enumerate(blocks))
    # short: podman's run state and conmon's sockets live below it
    qs = tempfile.mkdtemp(prefix="gqs-", dir="/tmp")
    try:
        code, output = _run(script, qs)
        left_mounted = _mounts_below(qs)
        deadline = time.monotonic() + 10  # podman's cleanup processes may outlive the script briefly
        while (left_running := _own_processes(qs)) and time.monotonic() < deadline:
            time.sleep(0.2)
        parts = re.split("^" + BLOCK_MARK.format(r"(\d+)") + "$", output, flags=re.M)
        outputs = {int(parts[i]): parts[i + 1] for i in range(1, len(parts), 2)}
        tail = output[-4000:]
        assert code is not None, f"the quick start did not finish in {RUN_TIMEOUT:g} s:\n{tail}"
        assert code == 0, f"the quick start failed (exit {code}) in block {max(outputs, default=-1) + 1}:\n{tail}"
        assert sorted(outputs) == list(range(len(blocks))), f"not every block ran:\n{tail}"
        missing = [m for i, block in enumerate(blocks) for m in check_block_output(i, block, outputs[i])]
        assert not missing, "the README promises output the quick start did not print:\n" + "\n".join(missing) + (
            f"\n--- output:\n{output[-6000:]}")
        # what the README says besides: node 2 stored none of the image; unmounted, nothing is left
        assert any(p.name == "greeting" for p in Path(qs, "node1", "rw").rglob("*"))
        assert not any(p.name == "greeting" for p in Path(qs, "node2", "rw").rglob("*"))
        assert not left_mounted, f"mounted after the quick start's umount: {left_mounted}"
        assert not left_running, f"running after the quick start's umount: {left_running}"
    finally:
        _clean_up(qs)
        still = _mounts_below(qs)
        if not still:  # never remove a tree with something mounted below it (a share's layers)
            shutil.rmtree(qs, ignore_errors=True)
        assert not still, f"could not unmount {still}"
        assert not [p for p in _own_processes(qs) if pid_alive(p)]
