"""Helpers of moby's graphtest (daemon/graphdriver/graphtest/testutil*.go), over a store.

Every helper brackets its work with a get/put of the layer (``store.mounted``) and writes
or reads through the view, exactly as the Go helpers do with Get/Put; so they exercise
mounting as much as the tests that call them. Names follow the Go helpers in Python style.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.archive.change import Change, ChangeKind

if TYPE_CHECKING:
    from lamina.store import Store


def random_content(size: int, seed: int) -> bytes:
    """Deterministic bytes for (size, seed): files are always written and checked by
    this same function, so any deterministic generator does (Go's math/rand is not
    needed)."""
    return random.Random(seed).randbytes(size)


def random_id() -> str:
    """A 64-hex layer ID like stringid.GenerateRandomID (first 12 chars not all digits)."""
    while True:
        value = uuid.uuid4().hex + uuid.uuid4().hex
        if not value[:12].isdigit():
            return value


def read_dir(path: Path) -> list[str]:
    """Names in ``path``, with ext4's lost+found hidden (Go's readDir)."""
    return sorted(n for n in os.listdir(path) if n != "lost+found")


def write_file(path: Path, content: bytes, mode: int = 0o755) -> None:
    """Create or truncate ``path`` with ``content``; the mode is set explicitly (umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, content)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def add_file(store: Store, layer: str, name: str, content: bytes) -> None:
    with store.mounted(layer) as root:
        write_file(Path(root) / name, content)


def check_file(store, layer: str, name: str, content: bytes) -> None:
    with store.mounted(layer) as root:
        got = (Path(root) / name).read_bytes()
    assert got == content, f"layer {layer}: {name} has {got[:40]!r}, want {content[:40]!r}"


def add_directory(store: Store, layer: str, name: str) -> None:
    with store.mounted(layer) as root:
        os.makedirs(Path(root) / name, 0o755, exist_ok=True)


def remove_all(store: Store, layer: str, *names: str) -> None:
    with store.mounted(layer) as root:
        for name in names:
            p = Path(root) / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()


def check_file_removed(store: Store, layer: str, name: str) -> None:
    with store.mounted(layer) as root:
        p = Path(root) / name
        assert not os.path.lexists(p), f"layer {layer}: {name} should be gone"


def add_files(store: Store, layer: str, seed: int) -> None:
    """file-a (64 B), dir-b/file-b (128 B), file-c (16 KiB), all 0755."""
    with store.mounted(layer) as root:
        root = Path(root)
        write_file(root / "file-a", random_content(64, seed))
        os.makedirs(root / "dir-b", 0o755, exist_ok=True)
        write_file(root / "dir-b" / "file-b", random_content(128, seed + 1))
        write_file(root / "file-c", random_content(128 * 128, seed + 2))


def check_files(store: Store, layer: str, seed: int) -> None:
    check_file(store, layer, "file-a", random_content(64, seed))
    check_file(store, layer, "dir-b/file-b", random_content(128, seed + 1))
    check_file(store, layer, "file-c", random_content(128 * 128, seed + 2))


def _many_files(count: int) -> Iterable[tuple[int, int]]:
    """(i, j) for blocks of 100 files: directory-<i>/file-<i+j>."""
    for i in range(0, count, 100):
        for j in range(100):
            if i + j >= count:
                break
            yield i, j


def add_many_files(store: Store, layer: str, count: int, seed: int) -> None:
    with store.mounted(layer) as root:
        for i, j in _many_files(count):
            d = Path(root) / f"directory-{i}"
            if j == 0:
                os.makedirs(d, 0o755, exist_ok=True)
            write_file(d / f"file-{i + j}", random_content(64, seed + i + j))


def check_many_files(store: Store, layer: str, count: int, seed: int) -> None:
    with store.mounted(layer) as root:
        for i, j in _many_files(count):
            p = Path(root) / f"directory-{i}" / f"file-{i + j}"
            assert p.read_bytes() == random_content(64, seed + i + j), f"layer {layer}: {p} differs"


def change_many_files(store: Store, layer: str, count: int, seed: int) -> list[Change]:
    """Overwrite, add or delete files by ``j % 3``; return the changes Docker expects."""
    expected: list[Change] = []
    with store.mounted(layer) as root:
        for i, j in _many_files(count):
            d = Path(root) / f"directory-{i}"
            if j == 0:
                os.makedirs(d, 0o755, exist_ok=True)
                expected.append(Change(f"/directory-{i}", ChangeKind.MODIFY))
            content = random_content(64, seed + i + j)
            if j % 3 == 0:
                write_file(d / f"file-{i + j}", content)
                expected.append(Change(f"/directory-{i}/file-{i + j}", ChangeKind.MODIFY))
            elif j % 3 == 1:
                write_file(d / f"file-{seed}-{i + j}", content)
                expected.append(Change(f"/directory-{i}/file-{seed}-{i + j}", ChangeKind.ADD))
            else:
                os.unlink(d / f"file-{i + j}")
                expected.append(Change(f"/directory-{i}/file-{i + j}", ChangeKind.DELETE))
    return expected


def check_changes(expected: list[Change], actual: list[Change]) -> None:
    """Same length and, sorted by (path, kind), the same paths and kinds."""
    want = sorted((c.path, int(c.kind)) for c in expected)
    got = sorted((c.path, int(c.kind)) for c in actual)
    assert got == want


def add_layer_files(store, layer: str, parent: str, i: int) -> None:
    with store.mounted(layer) as root:
        root = Path(root)
        write_file(root / "top-id", layer.encode())
        os.makedirs(root / f"layer-{i}", 0o755, exist_ok=True)
        write_file(root / f"layer-{i}" / "layer-id", layer.encode())
        write_file(root / f"layer-{i}" / "parent-id", parent.encode())


def add_many_layers(store: Store, base: str, count: int) -> str:
    """Stack ``count`` read-only layers on ``base``; return the top ID."""
    last = base
    for i in range(1, count + 1):
        layer = random_id()
        store.create(layer, last)
        add_layer_files(store, layer, last, i)
        last = layer
    return last


def check_many_layers(store: Store, top: str, count: int) -> None:
    with store.mounted(top) as root:
        root = Path(root)
        assert (root / "top-id").read_bytes() == top.encode()
        expected = top
        for i in range(count, 0, -1):
            d = root / f"layer-{i}"
            assert (d / "layer-id").read_bytes() == expected.encode(), f"layer-{i}/layer-id"
            expected = (d / "parent-id").read_bytes().decode()


def verify_file(path: Path, mode: int, uid: int, gid: int) -> None:
    """Go's verifyFile: stat (following links), then type, perm, sticky, setuid, setgid,
    owner, each checked on its own so a failure says which one is wrong."""
    st = os.stat(path)
    assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(mode), f"{path}: file type {st.st_mode:o}"
    assert stat.S_IMODE(st.st_mode) & 0o777 == mode & 0o777, f"{path}: perm {st.st_mode:o}"
    for bit, what in ((stat.S_ISVTX, "sticky"), (stat.S_ISUID, "setuid"), (stat.S_ISGID, "setgid")):
        assert bool(st.st_mode & bit) == bool(mode & bit), f"{path}: {what} bit {st.st_mode:o}"
    assert (st.st_uid, st.st_gid) == (uid, gid), f"{path}: owner {st.st_uid}:{st.st_gid}"


def create_base(store: Store, name: str) -> None:
    """A read-write base with a sticky dir owned 1:2 and a setuid file, made at umask 0."""
    old = os.umask(0)
    try:
        store.create_rw(name)
        with store.mounted(name) as root:
            subdir = Path(root) / "a subdir"
            os.mkdir(subdir, 0o1705)
            os.chmod(subdir, 0o1705)
            os.lchown(subdir, 1, 2)
            f = Path(root) / "a file"
            fd = os.open(f, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o4222)
            try:
                os.write(fd, b"Some data")
            finally:
                os.close(fd)
            os.chmod(f, 0o4222)
    finally:
        os.umask(old)


def verify_base(store: Store, name: str) -> None:
    with store.mounted(name) as root:
        root = Path(root)
        verify_file(root / "a subdir", stat.S_IFDIR | 0o1705, 1, 2)
        verify_file(root / "a file", stat.S_IFREG | 0o4222, 0, 0)
        assert read_dir(root) == ["a file", "a subdir"]
