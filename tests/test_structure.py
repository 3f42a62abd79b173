"""The code's shape, checked: the commands that do not mount load neither pyfuse3 nor trio, and
the import direction holds (import-linter's contracts in pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", ["graftfs.cli", "graftfs.share.gc", "graftfs.share.publish", "graftfs.share.fsck",
                                    "graftfs.share.stats", "graftfs.cli.status", "graftfs.node.mounts"])
def test_commands_that_do_not_mount_load_no_fuse(module: str) -> None:
    code = (f"import importlib, sys; importlib.import_module({module!r}); "
            "loaded = sorted({'pyfuse3', 'trio'} & set(sys.modules)); print(loaded); sys.exit(bool(loaded))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{module} loads {res.stdout.strip()} {res.stderr}"


def test_mounting_loads_fuse() -> None:
    """The check above can fail: the daemon's module does load them."""
    code = "import graftfs.node.daemon, sys; sys.exit(0 if 'pyfuse3' in sys.modules else 1)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_import_contracts_hold() -> None:
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    res = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "broken" not in res.stdout.lower().split("contracts:")[-1].replace("0 broken", "")
