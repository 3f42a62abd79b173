"""Check the repo's Vagrantfile (the share/node1/node2 test cluster).

Booting the VMs is far too slow and needs a hypervisor, but ``vagrant validate``
runs offline in about a second and catches Ruby errors and misspelt settings, so
the Vagrantfile cannot silently rot.  The validate tests skip when vagrant is not
installed; the text test always runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANTFILE = Path(__file__).resolve().parent.parent / "Vagrantfile"

NO_PROVIDER = "No usable default provider"
GRAFTFS_FSTAB_LINE = (
    "none /var/lib/containers/storage graftfs "
    "rw=/var/lib/graftfs/rw,ro=/mnt/graftfs-share,layout=containers-storage,"
    "x-systemd.after=/mnt/graftfs-share,_netdev 0 0"
)


def _vagrant() -> str:
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        pytest.skip("vagrant is not installed (Debian package vagrant)")
    return vagrant


def _validate(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``vagrant validate`` on ``text`` in a scratch dir holding only that Vagrantfile."""
    vagrant = _vagrant()
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "Vagrantfile").write_text(text)
    env = dict(os.environ)
    env.pop("VAGRANT_CWD", None)
    env.pop("VAGRANT_VAGRANTFILE", None)
    env.update(
        VAGRANT_HOME=str(tmp_path / "vagrant-home"),
        VAGRANT_CHECKPOINT_DISABLE="1",
        VAGRANT_NO_COLOR="1",
    )
    return subprocess.run(
        [vagrant, "validate", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"{proc.args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_vagrantfile_validates(tmp_path: Path) -> None:
    proc = _validate(tmp_path, VAGRANTFILE.read_text())
    if proc.returncode != 0 and NO_PROVIDER in proc.stdout + proc.stderr:
        # vagrant without any usable provider (e.g. no vagrant-libvirt plugin)
        # refuses to validate anything; still check everything but the
        # provider blocks.
        proc = _validate(tmp_path, VAGRANTFILE.read_text(), "--ignore-provider")
    assert proc.returncode == 0, _describe(proc)


def test_validate_catches_bogus_setting(tmp_path: Path) -> None:
    """The validate test above can fail: a misspelt setting makes vagrant exit non-zero."""
    head, end, tail = VAGRANTFILE.read_text().rstrip().rpartition("\nend")
    assert end and not tail.strip(), "Vagrantfile should end with the configure block's `end`"
    broken = f"{head}\n  config.vm.bogus_setting = 1{end}\n"
    # --ignore-provider so the failure comes from the bogus setting, not from a
    # missing provider.
    proc = _validate(tmp_path, broken, "--ignore-provider")
    assert proc.returncode != 0, _describe(proc)
    assert "bogus_setting" in proc.stdout + proc.stderr, _describe(proc)


def test_vagrantfile_text() -> None:
    text = VAGRANTFILE.read_text()
    machines = set(re.findall(r'config\.vm\.define[\s(]+"([^"]+)"', text))
    assert machines == {"share", "node1", "node2"}
    assert "/sbin/mount.graftfs" in text
    assert GRAFTFS_FSTAB_LINE in text
    assert "debian/bookworm64" in text
