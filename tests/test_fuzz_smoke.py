"""The fuzzer runs, bounded in time, seeded with the hostile corpus (CI's short run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, skip_or_fail


def test_fuzz_apply_bounded(tmp_path: Path) -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        skip_or_fail("atheris not installed (pip install -e '.[test]')")
    corpus = tmp_path / "corpus"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "fuzz.corpus", str(corpus)], cwd=REPO, env=env, check=True)
    seconds = os.environ.get("LAMINA_FUZZ_SECONDS", "20")
    proc = subprocess.run(
        [sys.executable, "fuzz/fuzz_apply.py", f"-max_total_time={seconds}", "-rss_limit_mb=2048",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=REPO, env=env, capture_output=True, timeout=int(seconds) + 120,
    )
    tail = proc.stderr.decode(errors="replace")[-3000:]
    assert proc.returncode == 0, f"fuzzer found a problem:\n{tail}"
    assert "Done" in tail or "INITED" in tail, tail
