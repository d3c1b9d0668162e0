"""Shared test fixtures and the skip-or-fail rule for missing privileges and features.

A test that needs root, overlayfs, loop devices or dockerd calls one of the
``require_*`` helpers. On a machine without the feature the test is skipped with the
reason; with ``LAMINA_TEST_STRICT=1`` (set by ``.ci/run``) it fails instead, so CI can
never go green by skipping what it was meant to test.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

STRICT = os.environ.get("LAMINA_TEST_STRICT") == "1"
REPO = Path(__file__).resolve().parent.parent


def skip_or_fail(reason: str) -> None:
    """Skip with ``reason``; in strict mode (CI) fail with it instead."""
    if STRICT:
        pytest.fail(f"LAMINA_TEST_STRICT=1 and a required feature is missing: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root")


def _overlay_works() -> str | None:
    if os.geteuid() != 0:
        return "overlayfs mounts need root"
    try:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                return "kernel has no overlayfs"
    except OSError as e:
        return f"cannot read /proc/filesystems: {e}"
    return None


def require_overlay() -> None:
    reason = _overlay_works()
    if reason:
        skip_or_fail(reason)


@functools.cache
def _packages() -> dict[str, str]:
    """tool -> the Debian package that has it, from ``scripts/system-deps.sh tools``: the
    one list that ``make test`` and CI install from, so a reason never names another."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "system-deps.sh"), "tools"],
                         capture_output=True, text=True, check=True).stdout
    return {tool: pkg for pkg, tool in (line.split() for line in out.splitlines())}


def missing_tool(tool: str) -> str:
    """The skip reason for a missing ``tool``: which package has it, and how to get it."""
    pkg = _packages().get(tool)
    where = f" (Debian package {pkg}; scripts/system-deps.sh install)" if pkg else ""
    return f"{tool} not installed{where}"


def require_loop() -> None:
    require_root()
    if not os.path.exists("/dev/loop-control"):
        skip_or_fail("no loop devices here (/dev/loop-control missing)")
    for tool in ("losetup", "mkfs.ext4"):
        require_tool(tool)


def require_dockerd() -> None:
    require_root()
    require_tool("dockerd")


def require_tool(name: str) -> None:
    if not shutil.which(name):
        skip_or_fail(missing_tool(name))


def require_module(name: str) -> types.ModuleType:
    """Import ``name``, a pinned dependency: a venv without it is broken, not a machine
    without a feature, but a developer's odd environment gets a skip that says so."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        skip_or_fail(f"{name} is not importable ({e}): it is pinned in pyproject.toml; make venv")
        raise  # not reached: skip_or_fail raises


def require_user_xattrs(path: Path) -> None:
    """``user.*`` extended attributes on the filesystem of ``path`` (tmpfs before Linux
    6.6 has none, nor do some overlay setups)."""
    try:
        os.setxattr(path, "user.lamina-probe", b"1")
        os.removexattr(path, "user.lamina-probe")
    except OSError as e:
        skip_or_fail(f"no user xattrs on the filesystem of {path}: {e.strerror or e}")


@pytest.fixture(params=["native", "python"])
def native_mode(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Run the test with the archive engine's C speedups on, then with them off.

    The pure-Python code is the fallback where no compiler built the extension and the
    specification the C code must agree with, so every archive test runs both ways.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("native_mode")``. Without
    the built extension the native half is skipped (a failure in strict mode).
    """
    from lamina.archive import native

    if request.param == "native" and not native.available():
        skip_or_fail("the C speedups (lamina.archive._speedups) are not built: "
                     "pip install -e . needs gcc and the Python headers")
    saved = native.ext
    native.use(request.param == "native")
    try:
        yield request.param
    finally:
        native.ext = saved


@pytest.fixture
def tmp_root(tmp_path: Path) -> Path:
    """A fresh directory to hold one store."""
    root = tmp_path / "store"
    return root


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A file beside the store that hostile input must never touch."""
    p = tmp_path / "canary.txt"
    p.write_text("untouched\n")
    return p


def run_cli(*args: str, root: Path | None = None, input: bytes | None = None,
            env: dict[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m lamina`` as a separate process, as a user would."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    cmd = [sys.executable, "-m", "lamina"]
    if root is not None:
        cmd += ["--root", str(root)]
    cmd += list(args)
    return subprocess.run(cmd, input=input, capture_output=True, env=full_env, check=check)


@pytest.fixture(scope="session")
def scratch_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="lamina-test-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def require_containerd() -> None:
    """containerd, ctr and runc (Debian's containerd and runc packages), as root."""
    require_root()
    for tool in ("containerd", "ctr", "runc"):
        require_tool(tool)


def layer_hold(locks_dir: Path, recorded: set[str]):  # type: ignore[no-untyped-def]
    """A :class:`lamina.drivers.base.LayerHold` for a driver tested without a store:
    the layers in ``recorded`` have records, and the work locks in ``locks_dir`` say
    who is at work (take ``WorkLocks(locks_dir).busy(id)`` to play a maker)."""
    from lamina.worklocks import WorkLocks

    locks_dir.mkdir(parents=True, exist_ok=True)
    locks = WorkLocks(locks_dir)

    @contextlib.contextmanager
    def hold(layer_id: str) -> Iterator[bool | None]:
        with locks.idle(layer_id) as free:
            yield (layer_id in recorded) if free else None

    return hold


def write_file(p: Path, data: bytes | str = b"x", mode: int | None = None) -> Path:
    """Write ``data`` to ``p`` (parents made), with ``mode`` if given; return ``p``."""
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(p, mode)
    return p
