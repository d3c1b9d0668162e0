"""Support for tests that talk to servers on unix sockets and start daemons.

One HTTP-over-unix-socket connection and one start-and-wait loop, shared by the dockerd
harness, the plugin process harness, the protocol tests and the crash harness.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a unix socket. The Host header is the name dockerd sends to
    plugins (ignored by dockerd's own API)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 60.0) -> None:
        super().__init__("plugin.moby.localhost", timeout=timeout)
        self._path = os.fspath(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def start_logged(cmd: Sequence[str], log_path: Path, env: Mapping[str, str],
                 banner: str = "") -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session with stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        log.write(f"\n==== start {time.strftime('%H:%M:%S')}{': ' + banner if banner else ''}\n".encode())
        log.flush()
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=dict(env), start_new_session=True)


def wait_until(proc: subprocess.Popen[bytes], ready: Callable[[], bool], *, timeout: float,
               what: str, log_tail: Callable[[], str], give_up: Callable[[], object],
               error: type[Exception] = RuntimeError, poll: float = 0.05) -> None:
    """Wait for ``ready()``; raise ``error`` with the log's tail if the process exits
    first or ``timeout`` passes (then ``give_up()`` stops it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise error(f"{what} exited with {proc.returncode} at start\n{log_tail()}")
        if ready():
            return
        time.sleep(poll)
    give_up()
    raise error(f"{what} did not answer within {timeout:.0f}s\n{log_tail()}")
