"""Every tar of the hostile corpus (fuzz/corpus.py) through the store, per driver.

Each case either fails with InvalidArchive naming its culprit, or is contained; in both
ways the canaries outside the layer stay untouched and no half layer remains.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuzz.corpus import Case, cases, million_empty_entries  # noqa: E402

import lamina  # noqa: E402
from conftest import require_overlay, require_root  # noqa: E402
from lamina.check import check  # noqa: E402
from lamina.errors import InvalidArchive  # noqa: E402
from lamina.streams import open_chunks  # noqa: E402

# the C speedups and the pure-Python path must behave alike: every test runs in both
pytestmark = pytest.mark.usefixtures("native_mode")

CANARY_DIR = Path("/tmp/lamina-hostile-canary")
CASES = list(cases())


def _snapshot(paths: list[Path]) -> dict[str, str]:
    out = {}
    for base in paths:
        for dirpath, dirnames, filenames in os.walk(base):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                digest = ""
                if os.path.isfile(p) and not os.path.islink(p):
                    digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
                out[p] = f"{st.st_mode:o}:{st.st_size}:{st.st_mtime_ns}:{digest}"
    return out


@pytest.fixture(params=["vfs", "overlay"])
def store(request, tmp_path):
    require_root()
    if request.param == "overlay":
        require_overlay()
    CANARY_DIR.mkdir(exist_ok=True)
    (CANARY_DIR / "passwd").write_text("root:x:0:0\n")
    (CANARY_DIR / "shadow").write_text("secret\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_text("untouched\n")
    s = lamina.open(tmp_path / "store", driver=request.param)
    parent_tar = _parent_tar()
    s.apply_diff("parent", None, io.BytesIO(parent_tar))
    yield s, [CANARY_DIR, outside]
    s.close()


def _parent_tar() -> bytes:
    from fuzz.rawtar import DIR, SYM, entry, tar

    return tar(entry("etc", typeflag=DIR, mode=0o755), entry("etc/passwd", b"root:x:0:0\n"),
               entry("usr", typeflag=DIR, mode=0o755), entry("usr/lib", typeflag=DIR, mode=0o755),
               entry("lib", typeflag=SYM, linkname="usr/lib"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_tar(store, case: Case) -> None:
    s, watched = store
    before = _snapshot(watched)
    parent = "parent" if case.needs_parent else None
    try:
        s.apply_diff("victim", parent, io.BytesIO(case.data))
    except InvalidArchive as e:
        msg = str(e)
        assert "\n" not in msg, "errors are one line"
        if case.expect == "error":
            assert case.culprit in msg, f"message {msg!r} does not name {case.culprit!r}"
        assert not s.exists("victim")
    else:
        assert case.expect == "contained", f"{case.name} was applied but must be refused"
        # what was applied is what the tar says: check compares the tree with the tar's
        # headers (issue 16) and must find nothing, whatever the tar was
        assert [str(p) for p in check(s)[0]] == []
        s.remove("victim")
    assert _snapshot(watched) == before, "something outside the layer changed"
    assert not (s.root / "layers" / "victim").exists()
    assert not list((s.root / "tmp").iterdir()), "work files left in tmp/"


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert sum(c.expect == "error" for c in CASES) >= 30


def test_many_empty_entries_bounded(tmp_path) -> None:
    """A flood of empty entries applies in bounded time and memory (a million in make stress)."""
    count = int(os.environ.get("LAMINA_FLOOD_ENTRIES", "100000"))
    s = lamina.open(tmp_path / "store", driver="vfs")
    tracemalloc.start()
    t = time.monotonic()
    s.apply_diff("flood", None, open_chunks(million_empty_entries(count)))
    elapsed = time.monotonic() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 << 20, f"peak Python memory {peak >> 20} MiB for {count} entries"
    assert elapsed < count / 2000 + 30, f"{count} entries took {elapsed:.1f} s"
    assert os.listdir(s.driver.layer_dir("flood")) == ["same-empty-file"]
    s.close()
