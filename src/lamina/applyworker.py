"""The worker process of a chain apply: unpacks one layer tar, read from a pipe.

Started by :mod:`lamina.chainapply` as ``python -m lamina.applyworker PARENT_PID`` with a
``SOCK_SEQPACKET`` socket as its stdin, ahead of need: it imports the archive engine
first, then waits for its job, so the process start overlaps the layers below (a cold
start took 0.1-0.25 s here, longer than a small layer). The job is one message carrying
two descriptors (``SCM_RIGHTS``): the read end of the pipe the parent fills with the
uncompressed layer tar, and the layer's work lock. A worker whose parent closes the
socket without a job exits quietly. With a job, it does what the store's ``apply_diff``
does between *creating* and *ready*, and nothing of the records:

* hashes the whole tar to the very end (the DiffID), unpacks it with the archive engine
  into the directory and with the options its driver planned
  (:class:`lamina.drivers.base.ApplyPlan`), and records the tar-split into the store's
  staging file for it;
* before the engine first looks at the layers below (a hardlink's target to copy up, a
  parent directory a lower symlink may shadow) it asks the parent and waits until every
  layer below is whole (:attr:`ApplyOptions.wait_for_lowers`);
* answers with one message: ``{"done": {"size", "diff_id"}}`` or ``{"error": ...}``
  (the exception, encoded so the parent raises the same type with the same message).

It never commits anything: syncing, keeping the tar-split and marking the layer ready
are the parent's, in chain order. It holds the layer's work lock with the parent (the
lock's open file description is passed to it), so cleanup never takes the layer for
half-made while it still writes there; and it dies with the parent
(``PR_SET_PDEATHSIG``), so a killed load leaves nobody writing into its layers.
"""

from __future__ import annotations

import builtins
import ctypes
import io
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import IO, Any

from lamina import errors

PR_SET_PDEATHSIG = 1
#: bytes of each read from the pipe
_READ = 1 << 20


# -- errors across the process boundary --------------------------------------------------


def encode_error(exc: BaseException) -> dict[str, Any]:
    """An exception as JSON that :func:`decode_error` turns back into the same type and
    message (pickle cannot: lamina's errors take other arguments than they keep)."""
    cls = type(exc)
    out: dict[str, Any] = {"type": cls.__name__, "module": cls.__module__, "message": str(exc)}
    if isinstance(exc, OSError):
        out.update(errno=exc.errno, strerror=exc.strerror, filename=exc.filename)
    entry = getattr(exc, "entry", None)
    if isinstance(entry, str):
        out["entry"] = entry
    notes = getattr(exc, "__notes__", None)
    if notes:
        out["notes"] = [str(n) for n in notes]
    return out


def decode_error(doc: dict[str, Any]) -> BaseException:
    """The exception :func:`encode_error` described: lamina's own types and Python's
    built-in ones; anything else becomes a :class:`LaminaError` with the same message."""
    source = {"lamina.errors": errors, "builtins": builtins}.get(str(doc.get("module")))
    cls = getattr(source, str(doc.get("type")), None) if source is not None else None
    message = str(doc.get("message", "unknown error"))
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return errors.LaminaError(message)
    if issubclass(cls, OSError) and doc.get("errno") is not None:
        args = [doc["errno"], doc.get("strerror") or message]
        if doc.get("filename") is not None:
            args.append(doc["filename"])
        # OSError reads its arguments in __new__, or in __init__ for a subclass with an
        # __init__ of its own (NoSpace): give them to both
        exc = cls.__new__(cls, *args)
        OSError.__init__(exc, *args)
    else:
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)
    if "entry" in doc:
        exc.entry = doc["entry"]  # type: ignore[attr-defined]
    for note in doc.get("notes", ()):
        exc.add_note(note)
    return exc


# -- the worker ---------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the one that started it dies; exit at once if it has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - Linux only, like the store
        pass
    if os.getppid() != parent:
        os._exit(3)


#: the largest message either side sends (a job names every lower directory)
MAX_MESSAGE = 1 << 20


class Channel:
    """JSON messages over a ``SOCK_SEQPACKET`` socket, one per packet (both sides)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, doc: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(doc).encode()
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.send(data)

    def receive(self, maxfds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
        """The next message and the descriptors it carried; (None, []) once the other
        side has closed."""
        data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, maxfds)
        if not data:
            for fd in fds:
                os.close(fd)
            return None, []
        doc = json.loads(data)
        assert isinstance(doc, dict)
        return doc, fds


def _wait_for_lowers(channel: Channel) -> None:
    channel.send({"need": "lowers"})
    answer, _ = channel.receive()
    if answer is None or answer.get("lowers") != "ready":
        raise errors.LaminaError("a layer below this one failed; not applying it")


def run(job: dict[str, Any], stream: IO[bytes], channel: Channel) -> dict[str, Any]:
    """Unpack ``stream`` as ``job`` says; the result for the parent."""
    from lamina.archive.apply import ApplyOptions, apply_tar
    from lamina.streams import HashingReader
    from lamina.tarsplits import TarSplits

    opts = job["options"]
    options = ApplyOptions(
        whiteouts=opts["whiteouts"], opaque_xattr=opts["opaque_xattr"],
        uid_map=[tuple(m) for m in opts["uid_map"]], gid_map=[tuple(m) for m in opts["gid_map"]],
        privileged=opts["privileged"], lower_roots=[Path(p) for p in opts["lower_roots"]],
        wait_for_lowers=lambda: _wait_for_lowers(channel))
    hashed = HashingReader(stream)
    try:
        with TarSplits(Path(job["store_root"])).recording(job["layer"]) as ts:
            options.tarsplit = ts
            size = apply_tar(Path(job["root"]), hashed, options)  # type: ignore[arg-type]
        hashed.drain()
        return {"done": {"size": size, "diff_id": hashed.digest()}}
    finally:
        hashed.close()


def main(argv: list[str]) -> int:
    parent = int(argv[0])
    _die_with_parent(parent)
    # the imports first: they overlap the layers below, before the job comes
    import lamina.archive.apply  # noqa: F401
    import lamina.streams  # noqa: F401
    import lamina.tarsplits  # noqa: F401

    channel = Channel(socket.socket(fileno=0))
    job, fds = channel.receive(maxfds=2)
    if job is None:
        return 0  # a spare that was not needed
    data_fd = fds[0]  # fds[1], the layer's work lock, stays open until this process ends
    try:
        logging.basicConfig(level=int(job.get("log_level", logging.WARNING)), stream=sys.stderr,
                            format="lamina: %(message)s")
        stream = io.BufferedReader(io.FileIO(data_fd, "rb", closefd=True), _READ)
        result = run(job, stream, channel)  # type: ignore[arg-type]
    except BaseException as e:  # noqa: BLE001 - every failure goes to the parent, typed
        channel.send({"error": encode_error(e)})
        return 1
    channel.send(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
