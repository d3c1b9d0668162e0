"""``lamina serve docker-plugin`` as a separate process, for dockerd tests and benchmarks.

The server runs exactly as an operator would run it (``python -m lamina serve
docker-plugin``), on a socket in ``/run/docker/plugins`` under a name unique to this
run, so that a private dockerd started with ``-s <name>`` finds it and nothing else
does. It can be stopped gracefully, killed (a crash), and started again with the same
name and state file, which is what the restart and crash tests need.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from procs import UnixHTTPConnection, start_logged, wait_until

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIR = Path("/run/docker/plugins")


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
        self.proc = start_logged(self.command(), self.log_path, env)
        wait_until(self.proc, self.answers, timeout=timeout, what="plugin", log_tail=self.log_tail,
                   give_up=self.kill)

    def answers(self) -> bool:
        """True if the socket answers /Plugin.Activate."""
        try:
            conn = UnixHTTPConnection(self.socket, timeout=5)
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
