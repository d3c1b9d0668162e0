"""The one list of system packages (scripts/system-deps.sh) covers what the tests use.

``make test`` and ``.ci/run`` both install from that list, so a tool a test looks for
that is missing from it would make a newcomer's suite quietly smaller than CI's.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from conftest import REPO, skip_or_fail

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
    if res.returncode != 0:
        skip_or_fail(res.stdout.strip())


def test_opt_out_installs_nothing() -> None:
    """With the opt-out the script runs no program at all (PATH leads nowhere)."""
    env = dict(os.environ, LAMINA_NO_SYSTEM_DEPS="1", PATH="/nonexistent")
    res = subprocess.run(["/bin/bash", str(SCRIPT), "install"], capture_output=True,
                         text=True, env=env)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""



# -- what a developer without root is told ------------------------------------------------------


def _fake_dpkg_query(bin_dir: Path, missing: set[str]) -> None:
    """A dpkg-query that reports ``missing`` packages as not installed, the rest as installed."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    fake = bin_dir / "dpkg-query"
    cases = " | ".join(sorted(missing))
    fake.write_text("#!/bin/sh\nfor pkg; do :; done\n"  # the last argument is the package
                    f'case "$pkg" in {cases}) echo "dpkg-query: no packages found matching $pkg" >&2; exit 1 ;;\n'
                    'esac\nprintf "install ok installed"\n')
    fake.chmod(0o755)


def test_install_without_root_lists_what_is_missing_and_the_tests_it_costs() -> None:
    """``system-deps.sh install`` as a user who is not root: nothing is installed, and one
    line per missing package says what it is for, the next which tests need it, and the
    last how to install them. Run as uid 65534 when we are root (from a copy of the
    script that user can read: pytest's tmp_path is private to root), else as ourselves."""
    with tempfile.TemporaryDirectory(prefix="lamina-sysdeps-") as tmp:
        work = Path(tmp)
        script = work / "system-deps.sh"
        script.write_text(SCRIPT.read_text())
        _fake_dpkg_query(work / "bin", {"xfsprogs", "skopeo"})
        for p in (work, work / "bin", script):
            p.chmod(0o755)
        env = {"PATH": f"{work / 'bin'}:/usr/bin:/bin", "PYTHON": "/bin/true"}  # true: has ensurepip
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        res = subprocess.run([*prefix, "bash", str(script), "install"], capture_output=True, text=True,
                             env=env, cwd=work)
    assert res.returncode == 0 and res.stdout == "", res
    assert res.stderr.splitlines() == [
        "system-deps: not installing (needs root and apt-get); tests that need these skip:",
        "  skopeo           an independent registry client to check pull and push",
        "                   needed by: test_registry test_registry_pipeline test_bench_smoke",
        "  xfsprogs         xfs filesystems and project quotas",
        "                   needed by: test_quota",
        "  to install: sudo apt-get install skopeo xfsprogs   (or run make test as root)",
    ], res.stderr


#: helpers through which a test asks for a package's tools without naming them
_HELPER_PACKAGES = {"require_dockerd": {"docker.io"}, "require_containerd": {"containerd", "runc"},
                    "have_registry": {"docker-registry", "skopeo"},
                    "_require_registry": {"docker-registry", "skopeo"},
                    "require_loop": {"util-linux", "e2fsprogs"}, "nobody_python": {"util-linux"}}


def test_the_tests_column_names_real_tests_and_every_test_that_asks() -> None:
    """The list's "tests" column names test files that exist, and every test file that
    asks for a package's tool (require_tool, shutil.which, or a conftest helper that
    does) is named under that package."""
    out = subprocess.run(["bash", str(SCRIPT), "tests"], capture_output=True, text=True, check=True).stdout
    listed = {tuple(line.split()) for line in out.splitlines()}
    files = {p.stem: p for p in (REPO / "tests").rglob("test_*.py")}
    assert {name for _, name in listed} <= set(files), {name for _, name in listed} - set(files)
    tools = _listed_tools()
    unlisted = set()
    for stem, path in files.items():
        text = path.read_text()
        wanted = {tools[t] for t in _ASKS.findall(text) if t in tools}
        for helper, pkgs in _HELPER_PACKAGES.items():
            if re.search(rf"\b{helper}\(", text):
                wanted |= pkgs
        unlisted |= {(pkg, stem) for pkg in wanted if (pkg, stem) not in listed}
    assert not unlisted, f"name these in scripts/system-deps.sh's tests column: {sorted(unlisted)}"


def test_skip_reasons_name_the_package_from_the_one_list() -> None:
    from conftest import missing_tool

    assert missing_tool("mkfs.xfs") == ("mkfs.xfs not installed (Debian package xfsprogs; "
                                        "scripts/system-deps.sh install)")
    assert missing_tool("setpriv").startswith("setpriv not installed (Debian package util-linux;")
    assert missing_tool("no-such-tool") == "no-such-tool not installed"

# -- strict mode has no way around it ---------------------------------------------------------

#: a skip that ignores LAMINA_TEST_STRICT: pytest.skip( and importorskip, and skip markers
_BARE_SKIP = re.compile(r"pytest\.skip\(|importorskip\(|pytest\.mark\.skip(?:if)?\b")

#: the plain skips that are by design, not a missing feature or privilege: (file under
#: tests/, text on the skip's line) -> why. Each also says so in a comment where it is.
ALLOWED_SKIPS = {
    ("conftest.py", "pytest.skip(reason)"): "skip_or_fail itself, outside strict mode",
    ("integration/test_overlay_driver.py", "accepts overlay upper directories on overlay"):
        "the refusal can only be checked on a kernel that refuses",
    ("integration/test_quota.py", "this store limits sizes with"):
        "the test is about loop-device limits; a store with project quotas is tested elsewhere",
    ("integration/test_quota.py", "this filesystem has project quotas on"):
        "the claim is about a filesystem without project quotas",
    ("integration/test_quota.py", "this kernel was built without quota support"):
        "a kernel without CONFIG_QUOTA (CI's) is nothing a package can add; loop-device "
        "limits are tested everywhere instead",
    ("conformance/test_graphtest.py", "pytest.skip(reason)"):
        "a driver that declares fewer than 500 layers is not asked for 500 (strict for the "
        "drivers that promise them)",
    ("conformance/test_graphtest.py", "does not support quotas"):
        "a driver whose contract has no quotas (vfs), as in moby's graphtest",
}


def test_no_skip_ignores_strict_mode() -> None:
    """Every skip for a missing feature or privilege goes through conftest's skip_or_fail
    (failing under LAMINA_TEST_STRICT=1); a plain skip is allowed only where the
    condition is by design, and listed above with why."""
    found: set[tuple[str, str]] = set()
    bare: list[str] = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        rel = str(path.relative_to(REPO / "tests"))
        if path == Path(__file__).resolve():
            continue  # this test's own patterns
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not _BARE_SKIP.search(line):
                continue
            key = next((k for k in ALLOWED_SKIPS if k[0] == rel and k[1] in line), None)
            if key is None:
                bare.append(f"{rel}:{n}: {line.strip()}")
            else:
                found.add(key)
    assert not bare, "use conftest.skip_or_fail (or allow-list a by-design skip):\n" + "\n".join(bare)
    assert found == set(ALLOWED_SKIPS), f"allow-listed skips no longer there: {set(ALLOWED_SKIPS) - found}"
