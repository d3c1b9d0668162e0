"""``make demo``'s script, run as a user runs it: it must pass on the default driver,
on vfs, and unprivileged (where the default falls back to vfs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from unprivileged import nobody_python

DEMO = REPO / "scripts" / "demo.py"


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    env.pop("LAMINA_DRIVER", None)
    return subprocess.run([sys.executable, str(DEMO), *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd="/")


def check_passed(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, f"demo failed (rc={r.returncode}):\n{r.stdout}\n{r.stderr}"
    assert "OK: every check held" in r.stdout
    assert "FAIL" not in r.stdout
    # the story is told in steps a reader can follow
    for step in ("apply the image's layers", "the container's changes", "compare the two views"):
        assert step in r.stdout


@pytest.mark.parametrize("driver", [None, "vfs"], ids=["default", "vfs"])
def test_demo(driver: str | None) -> None:
    r = run_demo(*(["--driver", driver] if driver else []))
    check_passed(r)
    if driver is None:
        expected = "overlay" if os.geteuid() == 0 else "vfs"
        assert f"(driver: {expected})" in r.stdout
    assert "A /app/data/state.json" in r.stdout and "D /var/cache" in r.stdout


def test_demo_unprivileged() -> None:
    """As root, drop to uid 65534; the demo must pick vfs and still pass.

    The demo and lamina run from copies that user can read (tests/unprivileged.py): the
    venv's interpreter and the checkout may be out of its reach (here /root is 700)."""
    with nobody_python() as nobody:
        shutil.copy2(DEMO, nobody.work / "demo.py")
        os.chmod(nobody.work / "demo.py", 0o644)
        r = nobody.run(str(nobody.work / "demo.py"))
    check_passed(r)
    assert "(driver: vfs)" in r.stdout


def test_demo_fails_loudly_when_views_differ() -> None:
    """The comparison must be able to fail: feed it two views that differ."""
    sys.path.insert(0, str(DEMO.parent))
    try:
        import demo
    finally:
        sys.path.remove(str(DEMO.parent))
    a = {"/x": ("file", 0o644, 0, 0, 3, "abc"), "/y": ("dir", 0o755, 0, 0)}
    b = {"/x": ("file", 0o600, 0, 0, 3, "abc"), "/z": ("dir", 0o755, 0, 0)}
    problems = demo.compare(a, b)
    assert problems == [
        "differs: /x: ('file', 420, 0, 0, 3, 'abc') != ('file', 384, 0, 0, 3, 'abc')",
        "only in the container's view: /y",
        "only in the copy: /z",
    ]
    assert demo.compare(a, dict(a)) == []
