"""A private containerd for tests and benchmarks, with lamina as a proxy snapshotter.

Everything containerd writes is under the test's directory (root, state, config, log),
its sockets under a short directory in /tmp (sun_path holds 108 bytes), CRI is disabled,
so it runs beside any system containerd (and beside the private ones dockerd starts)
and leaves nothing behind. ``ctr`` is run against its socket in its own namespace.

Typical use::

    with ContainerdDaemon(tmp_path, proxy={"lamina": lamina_socket}) as c:
        c.ctr("images", "import", "--snapshotter", "lamina", "img.tar")
        c.ctr("run", "--snapshotter", "lamina", "--rm", IMAGE, "t1", "true")

The runc shims put their sockets in /run/containerd/s/, named by a hash that includes
this daemon's address, so two daemons never share one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from procs import start_logged, wait_until

#: the namespace the tests work in (ctr -n)
NAMESPACE = "lamina-test"


class ContainerdError(RuntimeError):
    """A ctr command or the daemon failed; the message carries containerd's log tail."""


class ContainerdDaemon:
    """One private containerd; start/stop/restart it and run ``ctr`` against it."""

    def __init__(self, workdir: Path, *, proxy: Mapping[str, Path] | None = None,
                 log_level: str = "info") -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.sockdir = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
        self.socket = self.sockdir / "c.sock"
        self.config = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        self.proxy = dict(proxy or {})
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        lines = [
            "version = 2",
            f'root = "{self.root}"',
            f'state = "{self.state}"',
            # no CRI (it wants networking and a sandbox image), no snapshotters that
            # probe for devices or filesystems this machine does not have
            'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",'
            ' "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",'
            ' "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp",'
            ' "io.containerd.internal.v1.tracing"]',
            "[grpc]",
            f'  address = "{self.socket}"',
            "[ttrpc]",
            f'  address = "{self.socket}.ttrpc"',
            "[debug]",
            f'  level = "{self.log_level}"',
            "[metrics]",
            '  address = ""',
            # garbage collection only when a test asks for it (images rm --sync): ctr's
            # own leases end with each command, and a GC on its schedule would take a
            # snapshot a test just made with ctr snapshots prepare/view
            '[plugins."io.containerd.gc.v1.scheduler"]',
            "  mutation_threshold = 1000000",
            "  deletion_threshold = 0",
        ]
        if self.proxy:
            lines.append("[proxy_plugins]")
            for name, sock in self.proxy.items():
                lines += [f"  [proxy_plugins.{name}]", '    type = "snapshot"', f'    address = "{sock}"']
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> None:
        binary = shutil.which("containerd")
        if binary is None:
            raise ContainerdError("containerd is not installed (Debian package containerd)")
        self.write_config()
        env = dict(os.environ)
        self.proc = start_logged([binary, "--config", str(self.config)], self.log_path, env)
        wait_until(self.proc, self._answers, timeout=timeout, what="containerd", log_tail=self.log_tail,
                   give_up=self.kill, error=ContainerdError)

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        return self.ctr("version", check=False).returncode == 0

    def ctr(self, *args: str, check: bool = True, timeout: float = 300,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        cmd = ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              input=input.decode() if input is not None else None)
        if check and done.returncode != 0:
            raise ContainerdError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}\n"
                                  f"{self.log_tail()}")
        return done

    def stop(self, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def close(self) -> None:
        """Stop every task of the namespace, then containerd; unmount what it left."""
        if self.proc is not None and self.proc.poll() is None:
            tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
            for task in tasks:
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
            for task in tasks:
                self.ctr("tasks", "delete", "-f", task, check=False)
        self.stop()
        for base in (self.state, self.root):
            with open("/proc/self/mountinfo") as f:
                points = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(base))]
            for point in sorted(points, reverse=True):
                subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        return "---- containerd log tail ----\n" + "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ContainerdDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.close()
