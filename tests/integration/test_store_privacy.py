"""The store's own metadata is private (issue 16): files 0600, directories 0700, root 0711.

meta.db and its WAL files, lamina.json, overlay's l/ links and the tar-splits used to be
readable by every local user (layer IDs, parents, mount paths). New stores make them
private whatever the umask; older stores are narrowed when opened; and an overlay view
still works for a container process that dropped to an unprivileged uid.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import lamina
from conftest import require_overlay, require_root

MTIME = 1_700_000_000


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, m, data in [("etc", tarfile.DIRTYPE, 0o755, None),
                                    ("etc/hosts", tarfile.REGTYPE, 0o644, b"127.0.0.1 localhost\n"),
                                    ("tmp", tarfile.DIRTYPE, 0o1777, None),
                                    ("home", tarfile.DIRTYPE, 0o755, None),
                                    ("home/user", tarfile.DIRTYPE, 0o755, None),
                                    ("home/user/notes", tarfile.REGTYPE, 0o644, b"mine\n")]:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, m, MTIME
            if name.startswith("home/user"):
                info.uid = info.gid = 1000
            if data is None:
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """umask 0: the modes below come from the store, not from a kind umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(params=["vfs", "overlay"])
def driver(request: pytest.FixtureRequest) -> str:
    if request.param == "overlay":
        require_overlay()
    return str(request.param)


def expected(root: Path, driver: str) -> dict[Path, int]:
    want = {root: 0o711, root / "meta.db": 0o600, root / "meta.db-wal": 0o600,
            root / "meta.db-shm": 0o600, root / "lamina.json": 0o600}
    for sub in ("layers", "tmp", "locks", "tarsplit"):
        want[root / sub] = 0o700
    want.update({p: 0o600 for p in (root / "tarsplit").iterdir()})
    if driver == "overlay":
        want[root / "l"] = 0o700
        want[root / "overlay"] = 0o700
    return want


def test_a_new_store_is_private_whatever_the_umask(tmp_path: Path, driver: str, loose_umask: None) -> None:
    root = tmp_path / "store"
    with lamina.open(root, driver=driver) as s:
        s.apply_diff("base", None, io.BytesIO(layer_tar()))
        assert list((root / "tarsplit").iterdir())
        got = {p: mode(p) for p in expected(root, driver)}
        assert got == expected(root, driver)


def test_an_older_store_is_narrowed_when_opened(tmp_path: Path, driver: str) -> None:
    root = tmp_path / "store"
    with lamina.open(root, driver=driver) as s:
        s.apply_diff("base", None, io.BytesIO(layer_tar()))
    want = expected(root, driver)
    for p, m in want.items():  # as an older lamina (or a careless hand) left them
        if p.exists():
            os.chmod(p, 0o755 if m & 0o100 else 0o644)
    with lamina.open(root) as s:
        assert s.exists("base")
        for p, m in want.items():
            if p.exists() and p.parent != root / "tarsplit":
                assert mode(p) == m, p
    # tar-splits already there are not swept (their directory is 0700); new ones are born 0600
    with lamina.open(root) as s:
        s.apply_diff("next", "base", io.BytesIO(layer_tar()))
        assert mode(s.tarsplits.path("next")) == 0o600


def test_only_bits_are_taken_away(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir(mode=0o700)
    os.chmod(root, 0o700)
    lamina.open(root, driver="vfs").close()
    assert mode(root) == 0o700


def test_an_overlay_view_serves_a_container_process_of_any_uid(tmp_path: Path) -> None:
    """What runc does: enter the view as root, then drop to the image's user. The store's
    private directories above the view must not matter; inside, the image's modes do."""
    require_root()
    require_overlay()
    with lamina.open(tmp_path / "store", driver="overlay") as s:
        s.apply_diff("base", None, io.BytesIO(layer_tar()))
        s.apply_diff("mid", "base", io.BytesIO(b""))
        s.create_rw("ctr", "mid")
        with s.mounted("ctr") as view:
            assert mode(s.root / "layers") == 0o700
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the container's process
                code = 1
                try:
                    os.close(read)
                    os.chdir(view)
                    os.setgroups([])
                    os.setresgid(1000, 1000, 1000)
                    os.setresuid(1000, 1000, 1000)
                    seen = [Path("etc/hosts").read_text(), ",".join(sorted(os.listdir("."))),
                            Path("home/user/notes").read_text()]
                    Path("tmp/scratch").write_text("x")         # a 1777 dir of a lower
                    Path("home/user/notes").write_text("edited\n")  # copy-up of its own file
                    try:
                        Path("etc/hosts").write_text("evil")
                        seen.append("wrote etc/hosts")
                    except PermissionError:
                        seen.append("etc/hosts refused")
                    os.write(write, "|".join(seen).encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(write)
            with os.fdopen(read, "rb") as f:
                out = f.read().decode()
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert out == "127.0.0.1 localhost\n|etc,home,tmp|mine\n|etc/hosts refused"
            assert (view / "home/user/notes").read_text() == "edited\n"
        s.remove("ctr")
