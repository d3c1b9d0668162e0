"""The archive benchmark runs end to end in its quick mode and prints its ratios.

Not a measurement (the numbers of a quick run mean little): it keeps
``bench/bench_archive.py`` working as the engine and the store change under it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, require_tool


def test_bench_archive_quick_prints_ratios(tmp_path: Path) -> None:
    require_tool("tar")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_archive.py"), "--quick", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # one ratio per lamina measurement, against tar -xf (apply) and tar -cf (diff)
    assert re.search(r"tar -xf\s+\d+\.\d+ s", out) and re.search(r"tar -cf\s+\d+\.\d+ s", out)
    assert len(re.findall(r"ratio \d+\.\d+x", out)) >= 4, out
    summary = re.search(r"^summary: (.*)$", out, re.M)
    assert summary, out
    keys = dict(kv.split("=") for kv in summary.group(1).split())
    assert set(keys) >= {"small.apply", "small.diff", "big.apply", "big.diff"}
    assert all(re.fullmatch(r"\d+\.\d+x", v) for v in keys.values())
    # the work directory is cleaned up
    assert list(tmp_path.iterdir()) == []


def test_bench_registry_quick_prints_ratios() -> None:
    """bench_registry.py --quick: docker pull, lamina pull, skopeo + load, both pushes."""
    from conftest import require_dockerd, require_root
    from registry_support import have_registry

    require_root()
    require_dockerd()
    missing = have_registry()
    if missing:
        from conftest import skip_or_fail

        skip_or_fail(f"needs {missing}")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_registry.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"pull: lamina / docker pull\s+\d+\.\d+x .*target <= 0\.8x: (ok|OVER)", out), out
    assert re.search(r"push: lamina / skopeo\s+\d+\.\d+x .*target <= 1\.0x: (ok|OVER)", out), out
    summary = re.search(r"^summary: (.*)$", out, re.M)
    assert summary, out
    keys = dict(kv.split("=") for kv in summary.group(1).split())
    assert set(keys) >= {"pull", "pull.cpu", "push", "push.cpu", "pull.via_skopeo"}


def test_bench_containerd_quick_prints_ratios(tmp_path: Path) -> None:
    from conftest import require_containerd

    require_containerd()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_containerd.py"), "--quick", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for what in ("import", "run"):
        assert re.search(rf"^{what}\s.*ratio \d+\.\d+x\s+target <= 1\.1x\s+(ok|OVER)$", out, re.M), out
    assert len(re.findall(r"^rpc lamina .* p50 +\d+\.\d+ ms", out, re.M)) == 4, out
    summary = re.search(r"^summary: (.*)$", out, re.M)
    assert summary and "import=" in summary.group(1), out


def test_bench_containerd_calls_only_times_lamina_socket(tmp_path: Path) -> None:
    """--calls-only --quick: Prepare+Mounts and Commit on lamina's socket alone, each
    with its p50, p90, target and ok/OVER (no containerd needed)."""
    from conftest import require_overlay

    require_overlay()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_containerd.py"), "--calls-only", "--quick",
         "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for call in ("prepare\\+mounts", "commit"):
        assert re.search(rf"^rpc lamina direct {call}\s+p50 +\d+\.\d+ ms\s+p90 +\d+\.\d+ ms .*"
                         rf"target p50 <= 5\.0 ms\s+(ok|OVER)$", out, re.M), out
    summary = re.search(r"^summary: (.*)$", out, re.M)
    assert summary and "lamina_direct.prepare+mounts=" in summary.group(1), out


def test_bench_docker_quick_times_plugin_calls() -> None:
    """bench_docker.py --quick: Exists and Get+Put over the plugin's socket against a
    bare aiohttp handler, each with its ratio, target and ok/OVER (no dockerd needed)."""
    from conftest import require_root

    require_root()  # the plugin's socket lives in /run/docker/plugins
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_docker.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"bare aiohttp \{\} handler: \d+\.\d+ ms", out), out
    assert re.search(r"Exists\s+p50\s+\d+\.\d+ ms\s+ratio\s+\d+\.\d+x .*target <= 0\.15 ms: (ok|OVER)$", out, re.M), out
    assert re.search(r"Get \+ Put\s+p50\s+\d+\.\d+ ms\s+ratio\s+\d+\.\d+x .*target <= 0\.3 ms: (ok|OVER)$", out, re.M), out
    summary = re.search(r"^summary: (.*)$", out, re.M)
    assert summary and "exists=" in summary.group(1) and "get_put=" in summary.group(1), out


def test_bench_images_quick_prints_every_target() -> None:
    """bench_images.py --quick: load against docker load on both filesystems, -j1, gzip
    layout, decompressors, peak memory; each figure with its target and ok/OVER."""
    from conftest import require_dockerd, require_root

    require_root()
    require_dockerd()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_images.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    targets = re.findall(r"target <= [\d.]+x: (ok|OVER)", out)
    # overlay side by side and -j1, on both filesystems
    assert len(re.findall(r"^load overlay .*of docker load\s+target <= 0\.5x: (ok|OVER)", out, re.M)) == 4, out
    assert len(re.findall(r"^gzip load .*target <= 0\.5x: (ok|OVER)", out, re.M)) == 2, out
    assert len(targets) >= 8, out
    assert re.search(r"^side by side, overlay, .* -j1 \d+\.\d+ s -> default \d+\.\d+ s", out, re.M), out
    assert re.search(r"ISA-L igzip \(isal\)\s+\d+ MB/s cpu", out), out
    assert re.search(r"^lamina decompresses gzip with .*: (ok|OVER)$", out, re.M), out
    assert len(re.findall(r"^memory .*target <= \+?\d+ MiB: (ok|OVER)$", out, re.M)) == 4, out
    summary = re.search(r"^summary: (.*)$", out, re.M)
    assert summary, out
    keys = dict(kv.split("=") for kv in summary.group(1).split())
    assert {"load.overlay.fresh", "load.overlay.own", "parallel_gain.fresh", "gzip_load.own",
            "rss_mib.fresh"} <= set(keys)
