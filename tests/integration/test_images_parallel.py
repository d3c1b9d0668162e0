"""Layers of an image unpacked side by side (overlay): the serial result, or nothing.

``lamina image load`` unpacks the layers above the bottom one in worker processes while
the ones below are still being written (:mod:`lamina.chainapply`). These tests load the
same images with ``jobs=1`` and with several jobs into two overlay stores and compare
everything a user can see: layer IDs, parents, DiffIDs, sizes, the tar a diff gives back
(tar-split), each layer's own directory and the mounted view; a failure in a middle
layer, a hostile entry and a killed load must leave what the serial load leaves.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lamina
from conftest import REPO, require_overlay, run_cli
from images_support import MTIME, Image, docker_save, oci_layout, sha
from lamina import chainapply
from lamina.applyworker import decode_error, encode_error
from lamina.errors import DiffIDMismatch, ImageError, InvalidArchive, LaminaError, NoSpace
from lamina.images import chain_ids, images, load
from lamina.images.digest import layer_id
from lamina.store import Store

pytestmark = pytest.mark.usefixtures("overlay")


@pytest.fixture
def overlay() -> None:
    require_overlay()


def _open(root: Path) -> Store:
    return lamina.open(root, driver="overlay")


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    serial, parallel = _open(tmp_path / "serial"), _open(tmp_path / "parallel")
    yield serial, parallel
    for s in (serial, parallel):
        s.cleanup(unmount_all=True)
        s.close()


# -- making layer tars ---------------------------------------------------------------------


class Tar:
    """A layer tar built entry by entry (tarfile, PAX: what Docker writes)."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = kind, mode, MTIME, 0, 0
        return ti

    def dir(self, name: str, mode: int = 0o755) -> Tar:
        self._tar.addfile(self._info(name, tarfile.DIRTYPE, mode))
        return self

    def file(self, name: str, data: bytes, mode: int = 0o644, uid: int = 0) -> Tar:
        ti = self._info(name, tarfile.REGTYPE, mode)
        ti.size, ti.uid = len(data), uid
        self._tar.addfile(ti, io.BytesIO(data))
        return self

    def symlink(self, name: str, target: str) -> Tar:
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self._tar.addfile(ti)
        return self

    def hardlink(self, name: str, target: str) -> Tar:
        ti = self._info(name, tarfile.LNKTYPE, 0o644)
        ti.linkname = target
        self._tar.addfile(ti)
        return self

    def whiteout(self, name: str) -> Tar:
        head, _, base = name.rpartition("/")
        return self.file((f"{head}/" if head else "") + f".wh.{base}", b"")

    def opaque(self, directory: str) -> Tar:
        return self.file(f"{directory}/.wh..wh..opq", b"")

    def bytes(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()


def _blob(seed: str, size: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed.encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def _rich_image() -> Image:
    """Four layers using everything that reaches below: hardlinks copied up from a
    lower layer, whiteouts, an opaque directory, a parent directory the tar does not
    list (checked against the lowers), symlinks, modes, owners and a large file."""
    base = (Tar().dir("etc").dir("usr").dir("usr/bin").dir("usr/lib").dir("var").dir("var/cache")
            .file("etc/os-release", b"ID=test\n").file("usr/bin/tool", _blob("tool", 300_000), 0o755)
            .file("usr/lib/libx.so", _blob("lib", 2_000_000), 0o644, uid=7)
            .symlink("usr/lib/libx.so.1", "libx.so").file("var/cache/a", b"a" * 5000)
            .file("var/cache/b", b"b" * 7000).hardlink("usr/bin/tool2", "usr/bin/tool")
            .file("usr/lib/big.bin", _blob("big", 3_000_000)).bytes())
    mid = (Tar().dir("etc").file("etc/app.conf", b"a=1\n").whiteout("etc/os-release")
           .dir("usr").dir("usr/lib").hardlink("usr/lib/libx-copy.so", "usr/lib/libx.so")
           .dir("var").dir("var/cache").opaque("var/cache").file("var/cache/c", b"c")
           .file("srv/implied/data", _blob("data", 500_000)).bytes())
    top = (Tar().dir("usr").dir("usr/bin").hardlink("usr/bin/tool3", "usr/bin/tool2")
           .file("srv/implied/more", b"more\n").dir("opt").file("opt/x", b"x" * 123_456, 0o600).bytes())
    last = Tar().dir("etc").file("etc/motd", b"hi\n").whiteout("usr/lib/big.bin").bytes()
    return Image([base, mid, top, last], ["rich/app:1"])


def _ids(img: Image) -> list[str]:
    return [layer_id(c) for c in chain_ids([sha(t) for t in img.layers])]


# -- what a user can see of a store --------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything about a directory tree that an unpack decides: per path its type,
    mode, owner, size, mtime, link count, link target, content hash and xattrs."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode):
                content = st.st_rdev
            xattrs = sorted((a, os.getxattr(p, a, follow_symlinks=False))
                            for a in os.listxattr(p, follow_symlinks=False))
            # a whiteout is made when it is applied (no time of its own); a mount touches dirs
            whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
            mtime = None if stat.S_ISDIR(st.st_mode) or whiteout else st.st_mtime_ns
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_size if not stat.S_ISDIR(st.st_mode) else None, mtime, st.st_nlink
                        if not stat.S_ISDIR(st.st_mode) else None, content, tuple(xattrs))
    return out


def _picture(store: Store, ids: list[str]) -> list[object]:
    """Records, tar-split replay and files of each layer, and the top's mounted view."""
    pic: list[object] = []
    for lid in ids:
        rec = store.layer(lid)
        with store.diff(lid) as d:
            tar = d.read()
        pic.append((lid, rec.parent, rec.diff_id, rec.size, sha(tar),
                    _tree(store.driver.layer_dir(lid) / "diff")))
    with store.mounted(ids[-1]) as view:
        pic.append(_tree(view))
    return pic


def _nothing_left(store: Store) -> None:
    assert store.layers() == []
    assert images(store) == []
    assert list((store.root / "tmp").iterdir()) == []
    assert not [p for p in (store.root / "images").iterdir() if ".load-" in p.name]
    assert list((store.root / "layers").iterdir()) == []


def _workers_of(pid: int) -> list[int]:
    """Apply workers started by process ``pid`` that are still alive."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lamina.applyworker" in argv and str(pid).encode() in argv:
            found.append(int(entry.name))
    return found


@pytest.fixture
def worker_count(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The layers applied by worker processes during the test; every layer above the
    bottom one goes to a worker, however small (the tests' layers are)."""
    monkeypatch.setattr(chainapply, "WORKER_MIN", 0)
    started: list[str] = []
    real = chainapply.ChainApply._start_worker

    def spy(self: chainapply.ChainApply, layer: chainapply._Layer, plan: object) -> None:
        started.append(layer.id)
        real(self, layer, plan)  # type: ignore[arg-type]

    monkeypatch.setattr(chainapply.ChainApply, "_start_worker", spy)
    return started


# -- the same result ---------------------------------------------------------------------------


def test_small_layers_above_the_bottom_go_on_threads(stores: tuple[Store, Store], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers under WORKER_MIN are unpacked side by side on threads of the load itself
    (no process start): the same result all the same."""
    started: list[str] = []
    real = chainapply.ChainApply._start_here

    def spy(self: chainapply.ChainApply, layer: chainapply._Layer, plan: object) -> None:
        started.append(layer.id)
        real(self, layer, plan)  # type: ignore[arg-type]

    monkeypatch.setattr(chainapply.ChainApply, "_start_here", spy)
    serial, parallel = stores
    img = _rich_image()
    archive = docker_save(tmp_path / "a.tar", [img])
    load(serial, archive, jobs=1)
    assert started == []
    load(parallel, archive, jobs=4)
    ids = _ids(img)
    assert started == ids
    assert _picture(serial, ids) == _picture(parallel, ids)


@pytest.mark.parametrize("fmt", ["docker-save", "oci-gzip"])
def test_parallel_load_is_the_serial_load(stores: tuple[Store, Store], tmp_path: Path, fmt: str,
                                          worker_count: list[str]) -> None:
    serial, parallel = stores
    img = _rich_image()
    if fmt == "docker-save":
        archive = docker_save(tmp_path / "a.tar", [img])
    else:
        archive = oci_layout(tmp_path / "layout", [img], ["gzip"] * len(img.layers))
    one = load(serial, archive, jobs=1)
    assert worker_count == []
    many = load(parallel, archive, jobs=4)
    ids = _ids(img)
    assert worker_count == ids[1:]  # every layer above the bottom one in a worker
    assert [r.id for r in one.images] == [r.id for r in many.images] == [img.id]
    assert one.layers_loaded == many.layers_loaded == 4
    assert one.bytes_read == many.bytes_read
    assert [r.id for r in serial.layers()] == [r.id for r in parallel.layers()] == ids
    assert _picture(serial, ids) == _picture(parallel, ids)
    for lid, tar in zip(ids, img.layers, strict=True):  # tar-split: the very bytes loaded
        with parallel.diff(lid) as d:
            assert d.read() == tar
    view = _picture(parallel, ids)[-1]
    assert isinstance(view, dict)
    assert view["usr/lib/libx-copy.so"][7] == hashlib.sha256(_blob("lib", 2_000_000)).hexdigest()
    assert view["usr/bin/tool3"][6] == 2  # tool2 copied up from below, tool3 linked to the copy
    assert "var/cache/a" not in view and "var/cache/c" in view and "etc/os-release" not in view
    assert "usr/lib/big.bin" not in view
    assert list((parallel.root / "tmp").iterdir()) == []


def test_two_jobs_load_more_layers_than_jobs(stores: tuple[Store, Store], tmp_path: Path,
                                             worker_count: list[str]) -> None:
    serial, parallel = stores
    layers = [Tar().dir(f"d{i}").file(f"d{i}/f", _blob(str(i), 200_000)).bytes() for i in range(7)]
    img = Image(layers, ["seven:1"])
    archive = docker_save(tmp_path / "a.tar", [img])
    load(serial, archive, jobs=1)
    load(parallel, archive, jobs=2)
    ids = _ids(img)
    assert _picture(serial, ids) == _picture(parallel, ids)
    assert len(worker_count) >= 3


def test_reused_base_then_parallel(stores: tuple[Store, Store], tmp_path: Path) -> None:
    """A second image on a base already in the store: its new layers go side by side
    over a ready parent."""
    serial, parallel = stores
    first = _rich_image()
    second = Image([*first.layers[:2], Tar().file("x", b"x" * 70_000).bytes(),
                    Tar().file("y", b"y").bytes()], ["second:1"])
    for store, jobs in ((serial, 1), (parallel, 3)):
        load(store, docker_save(tmp_path / f"first{jobs}.tar", [first]), jobs=jobs)
        result = load(store, docker_save(tmp_path / f"second{jobs}.tar", [second]), jobs=jobs)
        assert (result.layers_reused, result.layers_loaded) == (2, 2)
    ids = _ids(second)
    assert _picture(serial, ids) == _picture(parallel, ids)


@pytest.mark.parametrize("where", ["worker", "thread"])
def test_waits_for_a_lower_still_being_written(tmp_path: Path, where: str) -> None:
    """The child hardlinks to a file its parent writes last, slowly: the child (in a
    worker, or on a thread here when it is small) must wait for the whole parent before
    copying it up."""
    store = _open(tmp_path / "s")
    big = _blob("slow", 4_000_000)
    lower = Tar().dir("data").file("data/early", b"e").file("data/big", big).bytes()
    upper = Tar().dir("data").hardlink("data/link", "data/big").bytes()
    released = threading.Event()

    class Slow(io.RawIOBase):
        """The parent's tar, held back before its last megabytes until the child ran."""

        def __init__(self, data: bytes) -> None:
            self._data, self._pos = data, 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
            if self._pos > len(self._data) // 2:
                released.wait(30)
            n = min(len(b), 65536, len(self._data) - self._pos)
            b[:n] = self._data[self._pos:self._pos + n]
            self._pos += n
            return n

    try:
        with store.chain_apply(2) as batch:
            batch.add("low", None, Slow(lower), expected_diff_id=sha(lower))  # type: ignore[arg-type]
            hint = len(upper) if where == "thread" else None
            batch.add("up", "low", io.BytesIO(upper), expected_diff_id=sha(upper), size_hint=hint)
            time.sleep(1.0)  # the child's worker reaches its hardlink and asks for its lowers
            assert not store.exists("up")
            released.set()
            batch.finish("low")
            batch.finish("up")
        with store.mounted("up") as view:
            assert (view / "data/link").read_bytes() == big
        assert (store.driver.layer_dir("up") / "diff/data/big").read_bytes() == big
    finally:
        released.set()
        store.cleanup(unmount_all=True)
        store.close()


# -- failures leave nothing ----------------------------------------------------------------------


def _failing_image(kind: str) -> Image:
    good = [Tar().dir(f"d{i}").file(f"d{i}/f", _blob(str(i), 300_000)).bytes() for i in range(4)]
    if kind == "diff-id":
        img = Image(good, ["bad:1"])
        bad = Tar().dir("d1").file("d1/f", _blob("other", 300_000)).bytes()
        img.layers[1] = bad  # the config still names the good layer's DiffID
        return img
    if kind == "hostile":
        good[1] = Tar().dir("d1").file("d1/f", b"x").file("../escape", b"evil").bytes()
    elif kind == "lower-symlink":
        good[0] = Tar().dir("d0").symlink("etc", "/etc").bytes()
        good[1] = Tar().file("etc/passwd", b"root::0:0::/:/bin/sh\n").bytes()  # no dir entry: implied
    return Image(good, ["bad:1"])


@pytest.mark.parametrize("kind", ["diff-id", "hostile", "lower-symlink"])
def test_a_failing_middle_layer_leaves_nothing(stores: tuple[Store, Store], tmp_path: Path,
                                               kind: str, worker_count: list[str]) -> None:
    serial, parallel = stores
    img = _failing_image(kind)
    archive = docker_save(tmp_path / "a.tar", [img])
    errors = []
    for store, jobs in ((serial, 1), (parallel, 4)):
        with pytest.raises(ImageError) as info:
            load(store, archive, jobs=jobs)
        errors.append(str(info.value))
        _nothing_left(store)
    assert errors[0] == errors[1]  # the same refusal, naming the same entry
    assert worker_count  # the failing layer and those above it ran in workers
    assert _workers_of(os.getpid()) == []
    if kind == "hostile":
        assert "../escape" in errors[1]
    if kind == "lower-symlink":
        assert "etc/passwd" in errors[1] and "symlink in a lower layer" in errors[1]
    # the store is usable: the good image loads afterwards
    good = Image([Tar().file("ok", b"ok").bytes(), Tar().file("ok2", b"2").bytes()], ["good:1"])
    assert load(parallel, docker_save(tmp_path / "good.tar", [good]), jobs=4).layers_loaded == 2


def test_a_damaged_gzip_layer_names_itself(stores: tuple[Store, Store], tmp_path: Path) -> None:
    """A blob that breaks while a worker is fed: the decompressor's error, not the
    worker's truncated tar, is what the load reports (as the serial load does)."""
    serial, parallel = stores
    img = _failing_image("none")
    layout = oci_layout(tmp_path / "layout", [img], ["gzip"] * 4)
    blobs = sorted((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    victim = max(blobs, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
    victim.write_bytes(bytes(data))
    errors = []
    for store, jobs in ((serial, 1), (parallel, 4)):
        with pytest.raises(ImageError) as info:
            load(store, layout, jobs=jobs)
        errors.append(str(info.value))
        _nothing_left(store)
    assert errors[0] == errors[1]


def test_busy_layer_refused_at_add_leaves_nothing(tmp_path: Path) -> None:
    store = _open(tmp_path / "s")
    try:
        tar = Tar().file("a", b"a").bytes()
        with store.work_locks.busy("second"), pytest.raises(LaminaError, match="in use"), \
                store.chain_apply(2) as batch:
            batch.add("first", None, io.BytesIO(tar))
            batch.add("second", "first", io.BytesIO(tar))
        assert store.layers() == []
        assert list((store.root / "layers").iterdir()) == []
    finally:
        store.close()


# -- a killed load ---------------------------------------------------------------------------------


def test_killed_parallel_load_is_recovered(tmp_path: Path) -> None:
    """SIGKILL the CLI while several layers are being unpacked: its workers die with it,
    and cleanup leaves no layer of the image."""
    root = tmp_path / "store"
    _open(root).close()
    layers = [Tar().dir(f"d{i}").file(f"d{i}/f", _blob(str(i), 40_000_000)).bytes() for i in range(3)]
    img = Image(layers, ["big:1"])
    archive = docker_save(tmp_path / "a.tar", [img])
    ids = _ids(img)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "lamina", "--root", str(root), "image", "load",
                             "-j", "3", str(archive)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(_workers_of(proc.pid)) < 2:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the load never had two workers at once"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, err = proc.communicate()  # EOF once the workers (which share stderr) are gone too
    deadline = time.monotonic() + 10
    while _workers_of(proc.pid):
        assert time.monotonic() < deadline, "apply workers outlived the load"
        time.sleep(0.01)
    out = run_cli("cleanup", root=root)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert any(ln.startswith("dropped half-made layer") for ln in lines), lines
    store = _open(root)
    try:
        assert not any(store.exists(i) for i in ids)
        _nothing_left(store)
        assert run_cli("check", root=root).returncode == 0
        assert load(store, archive, jobs=3).layers_loaded == 3  # and it loads whole now
    finally:
        store.cleanup(unmount_all=True)
        store.close()


# -- small parts ---------------------------------------------------------------------------------


def test_worker_errors_cross_the_process_boundary() -> None:
    bad = InvalidArchive("path escapes the root", "../x")
    back = decode_error(encode_error(bad))
    assert type(back) is InvalidArchive and str(back) == str(bad) and back.entry == "../x"  # type: ignore[attr-defined]
    full = NoSpace("no space left on device while writing tar entry 'a'", 28)
    back = decode_error(encode_error(full))
    assert type(back) is NoSpace and back.errno == 28 and str(back) == str(full)
    plain = PermissionError(13, "Permission denied", "x")
    plain.add_note("while applying tar entry 'x'")
    back = decode_error(encode_error(plain))
    assert type(back) is PermissionError and str(back) == str(plain)
    assert back.__notes__ == ["while applying tar entry 'x'"]
    mismatch = DiffIDMismatch("l", "sha256:a", "sha256:b")
    assert str(decode_error(encode_error(mismatch))) == str(mismatch)
    odd = decode_error({"type": "Popen", "module": "subprocess", "message": "m"})
    assert type(odd) is LaminaError and str(odd) == "m"


def test_cli_jobs_option(tmp_path: Path) -> None:
    img = Image([Tar().file("a", b"a").bytes(), Tar().file("b", b"b").bytes()], ["j:1"])
    archive = docker_save(tmp_path / "a.tar", [img])
    out = run_cli("image", "load", "-j", "0", str(archive), root=tmp_path / "s")
    assert out.returncode == 2 and b"1 or more" in out.stderr
    out = run_cli("image", "load", "-j", "2", str(archive), root=tmp_path / "s")
    assert out.returncode == 0, out.stderr
