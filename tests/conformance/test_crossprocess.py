"""Mount counts and crash recovery across processes, for every driver.

The CLI's ``mount`` and ``umount`` are separate processes, dockerd may talk to a plugin
that restarted, and a process may die in the middle of an import: the store's records,
not any process's memory, must hold the truth. Each test drives a real child process
(``python -c``) that opens the same store.
"""

from __future__ import annotations

import io
import os
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from lamina.errors import LayerBusy
from lamina.fs.mount import is_mountpoint
from lamina.records import LayerState

from . import tarbuild as tb

#: a child that opens the store and obeys one command per stdin line, answering each
#: on stdout: "get", "get-persistent", "put", "put-persistent", "exit"
CHILD = r"""
import sys
import lamina
store = lamina.open(root=sys.argv[1], driver=sys.argv[2])
layer = sys.argv[3]
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "get":
        print(store.get(layer), flush=True)
    elif cmd == "get-persistent":
        print(store.get(layer, persistent=True), flush=True)
    elif cmd == "put":
        print(store.put(layer), flush=True)
    elif cmd == "put-persistent":
        print(store.put(layer, persistent=True), flush=True)
    elif cmd == "exit":
        break
store.close()
"""

#: a child that applies a layer tar read from a path (a FIFO in the crash test)
APPLIER = r"""
import sys
import lamina
store = lamina.open(root=sys.argv[1], driver=sys.argv[2])
with open(sys.argv[4], "rb") as f:
    store.apply_diff(sys.argv[3], None, f)
"""

TIMEOUT = 60.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Child:
    """A store-holding child process driven line by line."""

    def __init__(self, store, layer: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(store.root), store.driver.name, layer],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=_env(),
        )
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f"child process gave no answer; stderr:\n{err}")
        return line.strip()

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._line()

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.ask_exit()
        assert self.proc.wait(TIMEOUT) == 0, self.proc.stderr.read() if self.proc.stderr else ""

    def ask_exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(TIMEOUT)


def _stacked(store, layer: str) -> None:
    """A read-write layer over a base, so a union driver has to really mount."""
    store.create(f"{layer}-base")
    store.create_rw(layer, f"{layer}-base")


def _assert_mounted_while_referenced(store, layer: str, path: Path) -> None:
    if store.driver.name == "overlay":
        assert is_mountpoint(path), f"{path} should be an overlay mount while referenced"
    assert path.is_dir()


def test_get_put_counted_across_two_processes(store) -> None:
    _stacked(store, "shared")
    child = Child(store, "shared")
    try:
        path = Path(child.ask("get"))
        assert store.layer("shared").mount_count == 1
        _assert_mounted_while_referenced(store, "shared", path)

        assert Path(store.get("shared")) == path, "a second get must return the same path"
        assert store.layer("shared").mount_count == 2
        store.put("shared")
        assert store.layer("shared").mount_count == 1
        _assert_mounted_while_referenced(store, "shared", path)  # the child's ref holds it

        assert child.ask("put") == "True"
        assert store.layer("shared").mount_count == 0
        assert not is_mountpoint(path)
        assert not store.driver.is_mounted("shared")
    finally:
        child.finish()


def test_persistent_reference_outlives_its_process(store) -> None:
    """The CLI pattern: ``lamina mount`` in one process, ``lamina umount`` in another."""
    _stacked(store, "cli")
    first = Child(store, "cli")
    path = Path(first.ask("get-persistent"))
    first.finish()
    assert store.cleanup() == [], "a persistent reference is not stale"
    assert store.layer("cli").mount_count == 1
    _assert_mounted_while_referenced(store, "cli", path)
    with pytest.raises(LayerBusy):
        store.remove("cli")

    second = Child(store, "cli")
    assert second.ask("put-persistent") == "True"
    second.finish()
    assert store.layer("cli").mount_count == 0
    assert not is_mountpoint(path)
    store.remove("cli")


def test_reference_of_a_killed_process_is_released_by_cleanup(store) -> None:
    _stacked(store, "orphaned")
    child = Child(store, "orphaned")
    path = Path(child.ask("get"))
    child.kill()
    mended = store.cleanup()
    assert any("orphaned" in line for line in mended), mended
    assert store.layer("orphaned").mount_count == 0
    assert not is_mountpoint(path)
    store.remove("orphaned")
    assert not store.exists("orphaned")


def test_remove_refused_while_another_process_has_it_mounted(store) -> None:
    _stacked(store, "theirs")
    child = Child(store, "theirs")
    try:
        path = Path(child.ask("get"))
        with pytest.raises(LayerBusy):
            store.remove("theirs")
        assert store.exists("theirs") and path.is_dir()
        assert child.ask("put") == "True"
    finally:
        child.finish()
    store.remove("theirs")


# -- a crash in the middle of apply_diff ------------------------------------------------


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    """Write ``data`` into a non-blocking FIFO, waiting for the reader, up to a deadline."""
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail("the applying child stopped reading the FIFO")
        _, writable, _ = select.select([], [fd], [], left)
        if writable:
            view = view[os.write(fd, view):]


def _open_fifo_for_writing(fifo: Path, proc: subprocess.Popen, deadline: float) -> int:
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:  # ENXIO: the child has not opened its end yet
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"applying child never opened the FIFO ({e}): {proc.stderr.read()!r}")
            time.sleep(0.02)


def test_cleanup_drops_a_layer_half_applied_by_a_killed_process(store, tmp_path: Path) -> None:
    big = os.urandom(8 * 1024 * 1024)
    entries = [tb.dir_("etc"), tb.reg("etc/first", b"first"), tb.reg("big", big), tb.reg("last", b"z")]
    tar = tb.build(entries)
    fifo = tmp_path / "layer.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-c", APPLIER, str(store.root), store.driver.name, "half", str(fifo)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )
    deadline = time.monotonic() + TIMEOUT
    fd = _open_fifo_for_writing(fifo, proc, deadline)
    try:
        # 2 MiB into the big file: a pipe holds 64 KiB, so once this write returns the
        # child has read (and is unpacking) well past the first entries
        _write_all(fd, tar[: 2 * 1024 * 1024], deadline)
        with store.records.read() as db:
            rec = db.layer("half")
        assert rec is not None and rec.state is LayerState.CREATING, rec
        assert not store.exists("half")
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
    finally:
        os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    mended = store.cleanup()
    assert any("half" in line for line in mended), mended
    assert not store.exists("half")
    with store.records.read() as db:
        assert db.layer("half") is None, "the half-made record must be gone"
    leftovers = [p.name for p in (store.root / "layers").iterdir() if p.name.startswith("half")]
    assert leftovers == []
    assert list((store.root / "tmp").iterdir()) == []
    assert not [p for p in (store.root / "tarsplit").iterdir() if p.name.startswith("half")]
    assert store.cleanup() == [], "a second cleanup has nothing left to mend"

    # the ID is free again and a whole apply works
    assert store.apply_diff("half", None, io.BytesIO(tar)) == tb.content_size(entries)
    with store.mounted("half") as root:
        assert (Path(root) / "big").read_bytes() == big
        assert stat.S_ISREG(os.lstat(Path(root) / "last").st_mode)
