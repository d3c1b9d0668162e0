"""A store on a small loop-mounted ext4 filled with layers until the disk says ENOSPC
(stress/fulldisk.py): blocks run out in one round, inodes in the other.

What must hold: the failed apply leaves nothing (no record, no directory, nothing in
tmp/, cleanup idle, check clean), the layers applied before are all there, and the
store goes on working (remove, apply, diff back byte for byte, mount). The error itself
must be one typed line naming the layer; see ``test_full_disk_error_is_one_typed_line``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import require_loop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from stress import fulldisk  # noqa: E402


@pytest.fixture(scope="module")
def rounds() -> dict[str, fulldisk.Round]:
    require_loop()
    return {r.name: r for r in fulldisk.run(size_mib=32)}


@pytest.mark.root
@pytest.mark.parametrize("name", ["blocks", "inodes"])
def test_full_disk_leaves_no_partial_layer_and_store_usable(rounds: dict[str, fulldisk.Round],
                                                             name: str) -> None:
    rnd = rounds[name]
    assert rnd.layers_applied >= 1, "the filesystem filled before a single layer fit"
    assert rnd.error, "the disk never filled"
    assert rnd.problems == []


@pytest.mark.root
@pytest.mark.parametrize("name", ["blocks", "inodes"])
def test_full_disk_error_is_one_typed_line(rounds: dict[str, fulldisk.Round], name: str) -> None:
    rnd = rounds[name]
    assert rnd.error_problems == [], rnd.line()
