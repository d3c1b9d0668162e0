"""A private dockerd for tests and benchmarks: its own data-root, exec-root, socket.

Why a harness of our own: the tests must run beside whatever dockerd the machine may
already have, leave nothing behind, and show dockerd's log when something fails. Each
:class:`DockerDaemon` gets every path dockerd writes to (data-root, exec-root, pidfile,
API socket, daemon.json), runs with ``--iptables=false --bridge=none`` so it never touches
the host's network, and starts its own containerd (dockerd's managed one lives under the
exec-root), so two daemons never share state.

Typical use::

    with DockerDaemon(tmp_path, storage_driver="lamina-t1") as d:
        d.docker("import", str(rootfs_tar), "busybox:test")
        print(d.docker("run", "--rm", "--network", "none", "busybox:test", "echo", "hi").stdout)

:func:`ensure_cgroups` makes ``docker run`` possible on a machine whose
``/sys/fs/cgroup`` holds no cgroup filesystem (a bare tmpfs, as in some VMs);
:func:`busybox_rootfs_tar` builds a small image root from the static busybox of Debian's
``busybox-static``, since the tests have no network to pull from.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from procs import UnixHTTPConnection, start_logged, wait_until

#: dockerd's own drivers; any other ``-s`` name is a plugin and needs --experimental
BUILTIN_DRIVERS = frozenset({"overlay2", "vfs", "btrfs", "zfs", "devicemapper", "fuse-overlayfs", "aufs"})

#: unix socket paths must fit in sun_path (108 bytes); containerd adds ~30 characters
_MAX_EXEC_ROOT = 60


class DockerError(RuntimeError):
    """A docker command or the daemon failed; the message carries dockerd's log tail."""


def docker_client() -> str:
    """The docker CLI to use: Debian's (same version as its dockerd) when present."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise DockerError("no docker CLI found (Debian package docker.io)")


def _cgroup_mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every cgroup/cgroup2 mount under /sys/fs/cgroup."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split(" ")[4]
            fstype = right.split(" ", 1)[0]
            if fstype in ("cgroup", "cgroup2") and (point == "/sys/fs/cgroup" or point.startswith("/sys/fs/cgroup/")):
                found.append((point, fstype))
    return found


def ensure_cgroups() -> str:
    """Make sure a cgroup hierarchy is mounted where runc looks for it; say what was done.

    runc (and so ``docker run``) needs ``/sys/fs/cgroup`` to be either cgroup2 or the
    cgroup v1 layout. Some VMs boot with a bare tmpfs there. We then mount cgroup2 on
    top, which needs no per-controller knowledge and which dockerd 20.10+ supports; if
    the kernel refuses (controllers held by v1 elsewhere do not stop it, a missing
    cgroup2 does), the v1 layout is mounted controller by controller.
    """
    if _cgroup_mounts():
        return "cgroups already mounted"
    if os.geteuid() != 0:
        raise DockerError("no cgroup filesystem under /sys/fs/cgroup and not root to mount one")
    os.makedirs("/sys/fs/cgroup", exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"], check=True, capture_output=True)
        return "mounted cgroup2 on /sys/fs/cgroup"
    except subprocess.CalledProcessError:
        pass
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "cgroup", "/sys/fs/cgroup"], check=True)
    with open("/proc/cgroups") as f:
        controllers = [ln.split()[0] for ln in f if not ln.startswith("#") and ln.split()[3] == "1"]
    for name in controllers:
        os.makedirs(f"/sys/fs/cgroup/{name}", exist_ok=True)
        subprocess.run(["mount", "-t", "cgroup", "-o", name, "cgroup", f"/sys/fs/cgroup/{name}"], check=False)
    os.makedirs("/sys/fs/cgroup/systemd", exist_ok=True)
    subprocess.run(["mount", "-t", "cgroup", "-o", "none,name=systemd", "cgroup", "/sys/fs/cgroup/systemd"], check=False)
    return "mounted cgroup v1 hierarchies: " + ", ".join(controllers)


def busybox_rootfs_tar(dest: Path, *, busybox: str = "/bin/busybox", extra: Mapping[str, bytes] | None = None) -> Path:
    """Write an image root (a plain tar) holding a static busybox and its applet links.

    ``extra`` maps paths inside the image to file contents, to make images that differ.
    Entries have fixed times and owners, so the same inputs give the same bytes.
    """
    bb = Path(busybox)
    if not bb.exists():
        raise DockerError(f"{busybox} missing (Debian package busybox-static)")
    applets = subprocess.run([str(bb), "--list-full"], check=True, capture_output=True, text=True).stdout.split()
    mtime = 1_700_000_000

    def info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.size, ti.linkname, ti.mtime = kind, mode, size, link, mtime
        return ti

    dirs = {"bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "proc", "sys", "dev", "var", "tmp"}
    files = {
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
    }
    files.update(extra or {})
    for name in files:
        parent = os.path.dirname(name)
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            tar.addfile(info(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755))
        with open(bb, "rb") as f:
            tar.addfile(info("bin/busybox", tarfile.REGTYPE, 0o755, bb.stat().st_size), f)
        for name, data in sorted(files.items()):
            tar.addfile(info(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
        for path in sorted(set(applets)):
            if path == "bin/busybox" or os.path.dirname(path) not in dirs:
                continue
            tar.addfile(info(path, tarfile.SYMTYPE, 0o777, link="/bin/busybox"))
    return dest


class DockerDaemon:
    """One private dockerd; start/stop/restart it and run ``docker`` against it."""

    def __init__(
        self,
        tmpdir: Path,
        storage_driver: str | None = None,
        env: Mapping[str, str] | None = None,
        *,
        experimental: bool | None = None,
        extra_args: Sequence[str] = (),
        log_level: str = "info",
    ) -> None:
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_root = self.dir / "data"
        exec_root = self.dir / "exec"
        if len(str(exec_root)) > _MAX_EXEC_ROOT:
            exec_root = Path(tempfile.mkdtemp(prefix="dockerd-", dir="/tmp"))
            self._own_exec_root = True
        else:
            self._own_exec_root = False
        self.exec_root = exec_root
        self.pidfile = self.dir / "dockerd.pid"
        self.socket = self.exec_root / "docker.sock"
        self.config_file = self.dir / "daemon.json"
        self.client_config = self.dir / "client"
        self.log_path = self.dir / "dockerd.log"
        self.storage_driver = storage_driver
        self.experimental = (
            experimental if experimental is not None
            else storage_driver is not None and storage_driver not in BUILTIN_DRIVERS
        )
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self._client = docker_client()

    # -- lifecycle ----------------------------------------------------------------

    def command(self) -> list[str]:
        """The dockerd command line this daemon runs."""
        cmd = [
            shutil.which("dockerd") or "dockerd",
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.pidfile),
            "--host", f"unix://{self.socket}",
            "--config-file", str(self.config_file),
            "--iptables=false", "--ip-masq=false", "--bridge=none",
            "--userland-proxy=false",
            "--exec-opt", "native.cgroupdriver=cgroupfs",
            "--log-level", self.log_level,
        ]
        if self.storage_driver:
            cmd += ["--storage-driver", self.storage_driver]
        if self.experimental:
            cmd.append("--experimental")
        return cmd + self.extra_args

    def start(self, timeout: float = 90.0) -> None:
        """Start dockerd and wait until its API answers /_ping."""
        if self.proc and self.proc.poll() is None:
            return
        if os.geteuid() == 0:
            ensure_cgroups()
        self.exec_root.mkdir(parents=True, exist_ok=True)
        self.client_config.mkdir(exist_ok=True)
        if not self.config_file.exists():
            self.config_file.write_text("{}\n")
        env = dict(os.environ)
        env.update(self.env)
        self.proc = start_logged(self.command(), self.log_path, env, " ".join(self.command()))
        wait_until(self.proc, self.ping, timeout=timeout, what="dockerd", log_tail=self.log_tail,
                   give_up=self.stop, error=DockerError, poll=0.1)

    def ping(self) -> bool:
        """True if the daemon's API answers."""
        try:
            conn = UnixHTTPConnection(self.socket, timeout=2)
            conn.request("GET", "/_ping")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def stop(self, timeout: float = 60.0) -> None:
        """Stop dockerd (SIGTERM, then SIGKILL), its containerd and any mounts it left."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self._kill_leftovers()
        self._unmount_leftovers()

    def restart(self, timeout: float = 90.0) -> None:
        self.stop()
        self.start(timeout)

    def kill(self) -> None:
        """SIGKILL dockerd, as a crash would (containerd and shims are cleaned up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stop()

    def close(self) -> None:
        """Stop and remove the exec-root we made outside ``tmpdir``."""
        self.stop()
        if self._own_exec_root:
            shutil.rmtree(self.exec_root, ignore_errors=True)

    def __enter__(self) -> DockerDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kill_leftovers(self) -> None:
        """Kill processes this daemon started that outlived it: its containerd, found by
        pidfile, and shims whose command line names this daemon's exec-root."""
        pids: set[int] = set()
        ctr_pid = self.exec_root / "containerd" / "containerd.pid"
        with contextlib.suppress(OSError, ValueError):
            pids.add(int(ctr_pid.read_text().strip()))
        marker = str(self.exec_root).encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                if marker + b"/" in cmdline or marker + b"\0" in cmdline:
                    pids.add(int(entry))
        pids.discard(os.getpid())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _unmount_leftovers(self) -> None:
        for prefix in (self.data_root, self.exec_root):
            for point in _mounts_under(prefix):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)

    # -- use --------------------------------------------------------------------------

    def client_env(self) -> dict[str, str]:
        """Environment that points a docker CLI at this daemon."""
        env = dict(os.environ)
        env.update(DOCKER_HOST=f"unix://{self.socket}", DOCKER_CONFIG=str(self.client_config))
        env.pop("DOCKER_CONTEXT", None)
        return env

    def docker(
        self, *args: str, input: bytes | str | None = None, check: bool = True, timeout: float = 300.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker ARGS`` against this daemon; raise :class:`DockerError` (with the
        command's stderr and dockerd's log tail) if it fails and ``check`` is set."""
        data = input.encode() if isinstance(input, str) else input
        res = subprocess.run(
            [self._client, *args], input=data, capture_output=True, env=self.client_env(), timeout=timeout,
        )
        out = subprocess.CompletedProcess(
            res.args, res.returncode, res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace"),
        )
        if check and res.returncode != 0:
            raise DockerError(
                f"docker {' '.join(args)} exited {res.returncode}: {out.stderr.strip()}\n{self.log_tail()}"
            )
        return out

    def docker_popen(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``docker ARGS`` without waiting (for killing something mid-way)."""
        return subprocess.Popen([self._client, *args], env=self.client_env(), **kwargs)  # type: ignore[call-overload]

    def info(self) -> dict[str, object]:
        """``docker info`` as a dict."""
        return json.loads(self.docker("info", "--format", "{{json .}}").stdout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return "---- dockerd log tail ----\n" + "\n".join(tail)


def _mounts_under(prefix: Path) -> list[str]:
    """Mount points at or below ``prefix``, deepest first."""
    root = os.path.realpath(prefix)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ")[4].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)
