"""What every lamina server needs around its socket: a clean start, and systemd's word.

Shared by the Docker graph-driver plugin and the containerd snapshotter, so that both
refuse a live socket the same way, clear a stale one, and tell systemd (``Type=notify``)
only once their socket accepts calls.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from lamina.errors import LaminaError


def prepare_socket(path: Path) -> None:
    """Make the socket's directory; clear a stale socket, refuse a live one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise LaminaError(f"{path} exists and is not a socket; remove it first")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: left by a crashed server
    else:
        raise LaminaError(f"another server is listening on {path}")
    finally:
        probe.close()


def notify_systemd(state: str) -> None:
    """Send ``state`` (``READY=1``, ``STOPPING=1``) to systemd's notify socket, if any,
    so that units ordered after this one start only once the socket is served."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), address)
