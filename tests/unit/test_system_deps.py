"""The one list of system packages (scripts/system-deps.sh) covers what the tests use.

``make test`` and ``.ci/run`` both install from that list, so a tool a test looks for
that is missing from it would make a newcomer's suite quietly smaller than CI's.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, STRICT

SCRIPT = REPO / "scripts" / "system-deps.sh"

#: how tests and benches ask for a program: require_tool("x") or shutil.which("x")
_ASKS = re.compile(r"""(?:require_tool|shutil\.which)\(\s*["']([A-Za-z0-9._-]+)["']""")

#: programs every Debian/Ubuntu base system has (coreutils, systemd-less basics)
_BASE_SYSTEM = {"cp", "true", "sh", "bash", "ls"}


def _listed_tools() -> dict[str, str]:
    out = subprocess.run(["bash", str(SCRIPT), "tools"], capture_output=True, text=True,
                         check=True).stdout
    return {tool: pkg for pkg, tool in (line.split() for line in out.splitlines())}


def _asked_tools() -> dict[str, Path]:
    asked: dict[str, Path] = {}
    for top in ("tests", "bench", "stress", "scripts"):
        for path in (REPO / top).rglob("*.py"):
            if path == Path(__file__).resolve():
                continue
            for name in _ASKS.findall(path.read_text()):
                asked.setdefault(name, path)
    return asked


def test_every_tool_a_test_asks_for_is_in_the_list() -> None:
    listed = _listed_tools()
    unlisted = {name: str(path.relative_to(REPO)) for name, path in _asked_tools().items()
                if name not in listed and name not in _BASE_SYSTEM}
    assert not unlisted, f"add these to scripts/system-deps.sh: {unlisted}"


def test_the_list_names_the_tools_conftest_requires() -> None:
    listed = _listed_tools()
    for tool in ("dockerd", "losetup", "mkfs.ext4", "mkfs.xfs", "busybox", "zstd"):
        assert tool in listed, tool


def test_ci_installs_from_the_same_list() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/system-deps.sh install" in ci
    assert "apt-get install" not in ci, ".ci/run must not keep a package list of its own"
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^test: system-deps\b", make, re.M)


def test_nothing_is_missing_in_strict_mode() -> None:
    """In CI (and as root after make test installed them) every package is present."""
    res = subprocess.run(["bash", str(SCRIPT), "check"], capture_output=True, text=True)
    if res.returncode != 0 and not STRICT:
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0, res.stdout


def test_opt_out_installs_nothing() -> None:
    """With the opt-out the script runs no program at all (PATH leads nowhere)."""
    env = dict(os.environ, LAMINA_NO_SYSTEM_DEPS="1", PATH="/nonexistent")
    res = subprocess.run(["/bin/bash", str(SCRIPT), "install"], capture_output=True,
                         text=True, env=env)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""
