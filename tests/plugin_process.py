"""``lamina serve docker-plugin`` as a separate process, for dockerd tests and benchmarks.

The server runs exactly as an operator would run it (``python -m lamina serve
docker-plugin``), on a socket in ``/run/docker/plugins`` under a name unique to this
run, so that a private dockerd started with ``-s <name>`` finds it and nothing else
does. It can be stopped gracefully, killed (a crash), and started again with the same
name and state file, which is what the restart and crash tests need.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIR = Path("/run/docker/plugins")


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("plugin.moby.localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class PluginProcess:
    """One lamina plugin server process; ``name`` is the dockerd ``-s`` value."""

    def __init__(self, workdir: Path, *, name: str | None = None, driver: str | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name or f"lamina-t{uuid.uuid4().hex[:10]}"
        self.socket = PLUGIN_DIR / f"{self.name}.sock"
        self.state = self.workdir / "plugin-state.json"
        self.log_path = self.workdir / "plugin.log"
        self.driver = driver
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "lamina", "serve", "docker-plugin",
               "--socket", str(self.socket), "--state", str(self.state)]
        if self.driver:
            cmd += ["--driver", self.driver]
        return cmd + self.extra_args

    def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"plugin exited with {self.proc.returncode}\n{self.log_tail()}")
            if self.answers():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"plugin did not answer within {timeout:.0f}s\n{self.log_tail()}")

    def answers(self) -> bool:
        """True if the socket answers /Plugin.Activate."""
        try:
            conn = _Unix(str(self.socket))
            conn.request("POST", "/Plugin.Activate", body=b"")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash: the socket file is left behind, as it would be."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    def store_root(self, data_root: Path) -> Path:
        """Where dockerd's Init puts the store: ``<data-root>/<name>``."""
        return Path(data_root) / self.name

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "---- plugin log tail ----\n" + "\n".join(self.log_text().splitlines()[-lines:])
