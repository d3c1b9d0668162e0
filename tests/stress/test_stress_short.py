"""The stress harnesses in short, for CI (the full runs are ``make stress``).

* crash injection (stress/crash.py): each operation SIGKILLed at 10 points (20 for the
  snapshotter's few-ms calls) spread over its real work, with ``cleanup`` and ``check``
  after every kill;
* concurrency (stress/concurrency.py): 4 processes of mixed operations on one store for
  10 s, on vfs and on overlay.

The full disk harness has its own tests (tests/stress/test_fulldisk.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import require_overlay

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from stress import concurrency, crash  # noqa: E402

POINTS = 10


#: the snapshotter's calls go to a server already up and last a few ms: twice the points,
#: so that the share of kills landing inside so short a window does not hang on one or two
WARM_OPS = ("snap-prepare", "snap-commit", "snap-import")


@pytest.mark.parametrize("op", crash.OPERATIONS)
def test_crash_short(op: str) -> None:
    lines: list[str] = []
    points = 2 * POINTS if op in WARM_OPS else POINTS
    (fig,) = crash.run([op], points, files=300, file_size=512, driver=None, log=lines.append)
    report = "\n".join(lines)
    assert fig.problems == [], report
    # the kills must have landed in the work, or the run proved nothing
    assert fig.kills >= POINTS // 2, report
    assert fig.in_work >= POINTS // 3, report
    # create-rw's work is a few ms: kills there mostly come after it; a Commit is one
    # transaction, so a killed one leaves nothing half-made to mend; an import's kills
    # mostly land while the client unpacks into a whole active snapshot
    if op not in ("create-rw", "snap-commit", "snap-prepare", "snap-import"):
        assert fig.mended >= 1, report


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_concurrency_short(driver: str) -> None:
    if driver == "overlay":
        require_overlay()
    result = concurrency.run(4, 10, driver)
    assert result.failures == [], result.line() + "\n" + "\n".join(result.failures[:20])
    for op in ("apply", "mount", "umount", "rm", "changes", "diff"):
        assert result.ops[op] > 0, f"no {op} ever succeeded: {result.line()}"
    assert result.released_by_cleanup == result.held_at_end
