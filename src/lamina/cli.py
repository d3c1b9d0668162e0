"""The ``lamina`` command: parse the command line, call the store, print the answer.

Why this shape: the CLI is one of several faces over :class:`lamina.store.Store`, so it
holds no storage logic at all. Each verb is a small function that takes an
:class:`Invocation` (the parsed arguments, a lazily opened store, and the output
helpers) and returns an exit status. Every :class:`~lamina.errors.LaminaError` becomes
one line on stderr, ``lamina: <message>``, and the error's ``exit_code``; a stack trace
appears only with ``--debug``. With ``--json`` every verb prints one JSON document on
stdout instead of text, and an error also prints ``{"error": {"kind", "message"}}``.

Adding verbs from another module
--------------------------------
Later faces (images, the plugin server, Windows tools) add their verbs without touching
the table below: list the module in :data:`EXTENSIONS`; it must expose
``register(subparsers)``, which adds its parsers with
``subparsers.add_parser(...)`` and sets ``func=handler`` on each with
``set_defaults``. A handler is ``handler(inv: Invocation) -> int | None`` (None means 0)
and uses ``inv.store``, ``inv.emit(...)``, ``inv.open_input(...)`` and
``inv.write_output(...)`` so that it gets ``--json``, progress bars and the
never-a-tar-to-a-terminal rule for free. The global options (``--root``, ``--json`` ...)
are accepted after the verb too, for every verb, extensions included.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import io
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lamina.errors import InvalidArchive, InvalidOption, LaminaError
from lamina.ids import check_id, parse_size
from lamina.progress import Progress, counted, human_bytes
from lamina.streams import BackgroundHash, CountingReader

if TYPE_CHECKING:
    from lamina.store import Store

#: modules that add verbs; each exposes ``register(subparsers)``. Imported only if listed.
EXTENSIONS: list[str] = ["lamina.plugin.cli", "lamina.snapshotter.cli", "lamina.images.cli", "lamina.cli_win"]

log = logging.getLogger("lamina.cli")

_COPY_CHUNK = 1 << 20


class UsageError(LaminaError):
    """A command line asking for something the CLI refuses (a tar to a terminal, ...)."""


Handler = Callable[["Invocation"], "int | None"]


class Invocation:
    """One run of the CLI: parsed arguments, the store (opened on first use), output.

    The streams are parameters so tests and other faces can run verbs in-process.
    """

    def __init__(self, args: argparse.Namespace, *, stdin: IO[bytes] | None = None,
                 stdout: IO[bytes] | None = None, stderr: IO[str] | None = None) -> None:
        self.args = args
        self.json: bool = bool(getattr(args, "json", False))
        self.stdin: IO[bytes] = stdin if stdin is not None else sys.stdin.buffer
        self.stdout: IO[bytes] = stdout if stdout is not None else sys.stdout.buffer
        self.stderr: IO[str] = stderr if stderr is not None else sys.stderr
        self._store: Store | None = None

    # -- the store ----------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The store named by ``--root``/``--driver``/``--opt``, opened on first use."""
        if self._store is None:
            import lamina  # the package exports open(); imported late so --help is fast

            root = getattr(self.args, "root", None) or None
            driver = getattr(self.args, "driver", None) or None
            options = self.driver_options()
            log.debug("opening store root=%s driver=%s options=%s", root, driver, options)
            self._store = lamina.open(root=root, driver=driver, options=options or None)
        return self._store

    def driver_options(self) -> dict[str, str]:
        """``--opt`` pairs given before and after the verb, later ones winning."""
        pairs = [*(getattr(self.args, "opt", None) or []), *(getattr(self.args, "opt_after", None) or [])]
        return parse_options(pairs)

    def close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            store.close()

    # -- output -------------------------------------------------------------------

    def emit(self, data: Any, text: str | Iterable[str] | None = None) -> None:
        """Print ``data`` as JSON with ``--json``, else ``text`` (a line or lines)."""
        if self.json:
            plain = json.loads(json.dumps(data, default=_json_default))
            self.stdout.write(json.dumps(_valid_utf8(plain)).encode() + b"\n")
        elif text is not None:
            lines = [text] if isinstance(text, str) else list(text)
            if lines:
                self.stdout.write(go_text("\n".join(lines) + "\n").encode())
        self.stdout.flush()

    def progress(self, label: str, total: int | None = None) -> Progress:
        """A progress bar on stderr: drawn only on a terminal, never with ``--json``."""
        return Progress(label, total, stream=self.stderr, enabled=False if self.json else None)

    # -- tar streams in and out -----------------------------------------------------

    @contextlib.contextmanager
    def open_input(self, name: str, label: str = "reading") -> Iterator[IO[bytes]]:
        """Open a tar named on the command line (``-`` = stdin), decompressing if needed.

        Yields a readable stream with a progress bar attached, and closes what it opened
        (never stdin). A terminal on stdin is refused (the user forgot the pipe). gzip,
        zstd, bzip2 and xz are recognised by their first bytes, as ``docker load`` does;
        damage in the compressed stream is one error naming the input.
        """
        from lamina.images.compress import SNIFF_BYTES, decompressed, sniff

        with contextlib.ExitStack() as stack:
            if name == "-":
                if _is_tty(self.stdin):
                    raise UsageError("refusing to read a tar from a terminal: pipe one in or name a file")
                raw: IO[bytes] = self.stdin
                if not hasattr(raw, "peek"):
                    raw = io.BufferedReader(raw)  # type: ignore[arg-type]
            else:
                try:
                    raw = stack.enter_context(open(name, "rb"))
                except OSError as e:
                    raise UsageError(f"cannot read {name}: {e.strerror}") from e
            kind = sniff(raw.peek(SNIFF_BYTES)[:SNIFF_BYTES])  # type: ignore[attr-defined]
            bar = stack.enter_context(self.progress(label, _regular_size(raw)))
            stream: IO[bytes] = CountingReader(raw, bar.update)  # type: ignore[assignment]
            what = "stdin" if name == "-" else name
            if kind != "none":  # damage inside is reported as ImageError naming `what`
                stream = stack.enter_context(decompressed(stream, kind, what))  # type: ignore[arg-type]
            yield stream

    def write_output(self, source: IO[bytes] | Iterable[bytes], output: str | None,
                     label: str = "writing") -> tuple[int, str]:
        """Copy a tar to ``output`` (None or ``-`` = stdout); return (bytes, sha256 hex).

        A file is written beside its final name and renamed into place only when
        complete, so a failed export never leaves a truncated tar that looks whole.
        """
        to_stdout = output in (None, "-")
        if to_stdout:
            check_not_terminal(self.stdout)
        chunks = _chunks(source)
        digest = BackgroundHash("sha256")  # on the other core, while this one writes
        try:
            return self._write_chunks(chunks, output, label, digest)
        finally:
            digest.stop()

    def _write_chunks(self, chunks: Iterable[bytes], output: str | None, label: str,
                      digest: BackgroundHash) -> tuple[int, str]:
        to_stdout = output in (None, "-")
        total = 0
        with self.progress(label) as bar:
            if to_stdout:
                for chunk in counted(chunks, bar):
                    self.stdout.write(chunk)
                    digest.update(_frozen(chunk))
                    total += len(chunk)
                self.stdout.flush()
                return total, digest.hexdigest()
            assert output is not None
            final = Path(output)
            if final.exists() and not final.is_file():
                tmp = final  # a device or fifo (/dev/null): write in place
            else:
                tmp = final.with_name(f".{final.name}.lamina-{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as f, _writeback(f, tmp != final):
                    for chunk in counted(chunks, bar):
                        f.write(chunk)
                        digest.update(_frozen(chunk))
                        total += len(chunk)
                    if tmp != final:
                        f.flush()
                        os.fsync(f.fileno())
                if tmp != final:
                    os.replace(tmp, final)
            except OSError as e:
                if tmp != final:
                    tmp.unlink(missing_ok=True)
                raise UsageError(f"cannot write {output}: {e.strerror or e}") from e
            except BaseException:
                if tmp != final:
                    tmp.unlink(missing_ok=True)
                raise
        return total, digest.hexdigest()


# -- helpers ---------------------------------------------------------------------------


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b=x=y"]`` -> ``{"a": "1", "b": "x=y"}``; InvalidOption without ``=``."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidOption(f"invalid option {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


def check_not_terminal(stream: IO[bytes]) -> None:
    """Refuse to pour a binary tar into a terminal, as ``docker save`` does."""
    if _is_tty(stream):
        raise UsageError("refusing to write a tar to a terminal: redirect stdout or use -o FILE")


def _is_tty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def _regular_size(f: IO[bytes]) -> int | None:
    try:
        st = os.fstat(f.fileno())
    except (OSError, AttributeError, io.UnsupportedOperation):
        return None
    import stat

    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _writeback(f: IO[bytes], durable: bool) -> contextlib.AbstractContextManager[object]:
    """Flushing a file that will be fsynced while it is written, so the fsync at the end
    waits only for the tail (lamina.fs.durable.FileWriteback); nothing for a device."""
    if not durable:
        return contextlib.nullcontext()
    from lamina.fs.durable import FileWriteback

    return FileWriteback(f.fileno())


def _frozen(chunk: bytes) -> bytes:
    """The chunk as bytes that cannot change before the hashing thread reads them."""
    return chunk if type(chunk) is bytes else bytes(chunk)


def _chunks(source: IO[bytes] | Iterable[bytes]) -> Iterable[bytes]:
    if hasattr(source, "read"):
        reader: IO[bytes] = source  # type: ignore[assignment]
        return iter(lambda: reader.read(_COPY_CHUNK), b"")
    return source  # type: ignore[return-value]


def _replace_per_byte(exc: UnicodeError) -> tuple[str, int]:
    assert isinstance(exc, UnicodeDecodeError)
    return "\ufffd" * (exc.end - exc.start), exc.end


codecs.register_error("lamina-per-byte", _replace_per_byte)


def go_text(text: str) -> str:
    """``text`` as Docker prints it: a name's bytes that are not UTF-8 (held here as
    surrogates) become U+FFFD, one per byte, which is what Go's JSON encoder sends
    ``docker diff`` (the daemon's answer is JSON). Lossy, as Docker's is, but always
    printable and valid UTF-8, where the raw surrogates could not be written at all."""
    if text.isascii():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no byte stands for
        return text.encode("utf-8", "replace").decode("utf-8")
    return raw.decode("utf-8", "lamina-per-byte")


def _valid_utf8(obj: object) -> object:
    """Every string in a JSON value through :func:`go_text` (no lone surrogates)."""
    if isinstance(obj, str):
        return go_text(obj)
    if isinstance(obj, list):
        return [_valid_utf8(v) for v in obj]
    if isinstance(obj, dict):
        return {go_text(k): _valid_utf8(v) for k, v in obj.items()}
    return obj


def _json_default(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Enum):
        return obj.value
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*r).rstrip() for r in [header, *rows]]


# -- verbs ---------------------------------------------------------------------------


def cmd_info(inv: Invocation) -> int:
    from lamina.drivers import registry
    from lamina.fs.mount import fs_type

    store = inv.store
    status = [(str(k), str(v)) for k, v in store.status()]
    own = {"Driver", "Root", "Layers", "Backing Filesystem"}  # shown on their own lines
    backing = dict(status).get("Backing Filesystem") or fs_type(store.root)
    layers = len(store.layers())
    reasons = {name: None if name == store.driver.name else registry.unavailable_reason(name, store.root)
               for name in registry.DRIVERS}
    data = {
        "driver": store.driver.name,
        "root": str(store.root),
        "backing_filesystem": backing,
        "layers": layers,
        "status": dict(status),
        "drivers": {n: {"in_use": n == store.driver.name, "available": r is None, "reason": r}
                    for n, r in reasons.items()},
    }
    lines = [
        f"Driver: {store.driver.name}",
        f"Root: {store.root}",
        f"Backing Filesystem: {backing}",
        f"Layers: {layers}",
        *(f"{k}: {v}" for k, v in status if k not in own),
        "Drivers:",
    ]
    for name, reason in reasons.items():
        state = ("in use" if name == store.driver.name
                 else "available" if reason is None else f"unavailable: {reason}")
        lines.append(f"  {name}: {state}")
    inv.emit(data, lines)
    return 0


def cmd_ls(inv: Invocation) -> int:
    records = inv.store.layers()
    rows = [[r.id, r.parent or "-", "rw" if r.rw else "ro",
             human_bytes(r.size) if r.size is not None else "-", str(r.mount_count)]
            for r in records]
    text = _table(["ID", "PARENT", "KIND", "SIZE", "MOUNTS"], rows) if rows else []
    inv.emit([r.to_json() for r in records], text)
    return 0


def _create(inv: Invocation, rw: bool) -> int:
    args = inv.args
    size = parse_size(args.size) if getattr(args, "size", None) else None
    storage_opt = parse_options(getattr(args, "storage_opt", None) or [])
    make = inv.store.create_rw if rw else inv.store.create
    parent = args.parent
    if getattr(args, "image", None):  # create-rw --image NAME: on the image's top layer
        if parent:
            raise UsageError("give --parent or --image, not both")
        from lamina.images import resolve_image_top

        parent = resolve_image_top(inv.store, args.image)
    make(args.id, parent, size=size, storage_opt=storage_opt or None, mount_label=args.mount_label)
    inv.emit({"id": args.id, "parent": parent, "kind": "rw" if rw else "ro"}, args.id)
    return 0


def cmd_create(inv: Invocation) -> int:
    return _create(inv, rw=False)


def cmd_create_rw(inv: Invocation) -> int:
    return _create(inv, rw=True)


def cmd_apply(inv: Invocation) -> int:
    args = inv.args
    check_id(args.id)  # before reading a byte of the input
    with inv.open_input(args.file, label=f"applying {args.id}") as stream:
        try:
            size = inv.store.apply_diff(args.id, args.parent, stream)
        except InvalidArchive as e:
            if e.entry is not None:
                raise
            # the whole input is at fault ("not a tar archive"): name it
            raise InvalidArchive(str(e), "stdin" if args.file == "-" else args.file) from e
    inv.emit({"id": args.id, "parent": args.parent, "size": size}, str(size))
    return 0


def cmd_diff(inv: Invocation) -> int:
    args = inv.args
    to_stdout = args.output in (None, "-")
    if to_stdout and inv.json:
        raise UsageError("diff --json needs -o FILE: stdout carries the tar")
    if to_stdout:
        check_not_terminal(inv.stdout)  # before mounting anything
    stream = inv.store.diff(args.id, args.parent)
    try:
        size, digest = inv.write_output(stream, args.output, label=f"diff {args.id}")
    finally:
        stream.close()
    if not to_stdout:
        inv.emit({"id": args.id, "file": args.output, "size": size, "digest": f"sha256:{digest}"},
                 f"sha256:{digest} {size} {args.output}")
    return 0


def cmd_changes(inv: Invocation) -> int:
    changes = inv.store.changes(inv.args.id, inv.args.parent)
    inv.emit([c.to_json() for c in changes], [str(c) for c in changes])
    return 0


def cmd_diff_size(inv: Invocation) -> int:
    size = inv.store.diff_size(inv.args.id, inv.args.parent)
    inv.emit({"id": inv.args.id, "size": size}, str(size))
    return 0


def cmd_mount(inv: Invocation) -> int:
    path = inv.store.get(inv.args.id, inv.args.mount_label, persistent=True)
    inv.emit({"id": inv.args.id, "path": str(path)}, str(path))
    return 0


def cmd_umount(inv: Invocation) -> int:
    store, layer_id = inv.store, inv.args.id
    if not store.put(layer_id, persistent=True):
        store.layer(layer_id)  # LayerNotFound names a wrong ID before "not mounted" does
        raise UsageError(f"layer {layer_id} is not mounted")
    inv.emit({"id": layer_id, "mounts": store.layer(layer_id).mount_count})
    return 0


def cmd_exists(inv: Invocation) -> int:
    found = inv.store.exists(inv.args.id)
    inv.emit({"id": inv.args.id, "exists": found}, "true" if found else "false")
    return 0 if found else 1


def cmd_rm(inv: Invocation) -> int:
    """Remove each ID in order; one error line per failure, and go on with the rest."""
    removed: list[str] = []
    failed: list[dict[str, str]] = []
    for layer_id in inv.args.ids:
        try:
            inv.store.remove(layer_id)
        except LaminaError as e:
            if inv.args.debug:
                traceback.print_exc(file=inv.stderr)
            print(f"lamina: {_one_line(e)}", file=inv.stderr)
            failed.append({"id": layer_id, "kind": type(e).__name__, "message": _one_line(e)})
        else:
            removed.append(layer_id)
    inv.emit({"removed": removed, "failed": failed}, removed)
    return 1 if failed else 0


def cmd_metadata(inv: Invocation) -> int:
    meta = inv.store.metadata(inv.args.id)
    inv.emit(dict(meta), [f"{k}: {v}" for k, v in sorted(meta.items())])
    return 0


def cmd_cleanup(inv: Invocation) -> int:
    from lamina.images import recover as recover_images

    mended = inv.store.cleanup(unmount_all=inv.args.unmount_all)
    mended += recover_images(inv.store)  # layers of killed image loads (no image owns them)
    inv.emit({"mended": mended}, mended)
    return 0


def cmd_check(inv: Invocation) -> int:
    """Exit 0 only if the store is whole (after repairs, with ``--repair``)."""
    from lamina.check import check, remaining

    content = not inv.args.fast
    problems, repairs = check(inv.store, repair=inv.args.repair, content=content)
    # after a repair, check again: only what is really gone counts as mended
    left = remaining(inv.store, content=content) if inv.args.repair and problems else problems
    data = {
        "problems": [{"layer": p.layer, "message": p.message, "repairable": p.repairable}
                     for p in problems],
        "repaired": repairs,
        "ok": not left,
    }
    lines = [f"problem: {p}" + ("" if p.repairable else " (not repairable)") for p in problems]
    lines += [f"repaired: {r}" for r in repairs]
    inv.emit(data, lines or ["ok"])
    return 0 if not left else 1


# -- the parser ------------------------------------------------------------------------


def _add_global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """The global options; on verb parsers they default to SUPPRESS so that a value
    given before the verb is not overwritten by the verb parser's default."""

    def d(value: object) -> object:
        return value if top else argparse.SUPPRESS

    env_root = os.environ.get("LAMINA_ROOT") or None
    env_driver = os.environ.get("LAMINA_DRIVER") or None
    g = p.add_argument_group("global options")
    g.add_argument("--root", default=d(env_root), metavar="DIR",
                   help="store root (env LAMINA_ROOT; default /var/lib/lamina as root, "
                        "else ~/.local/share/lamina)")
    g.add_argument("--driver", default=d(env_driver), metavar="NAME",
                   help="driver: overlay, vfs, windowsfilter (env LAMINA_DRIVER; "
                        "default: what the store was made with, else overlay where it works, else vfs)")
    # appended values given after the verb land in a namespace of their own (argparse
    # copies the verb's namespace over the top one), so they get their own dest
    g.add_argument("--opt", action="append", dest="opt" if top else "opt_after",
                   default=d([]), metavar="KEY=VAL", help="driver option, repeatable")
    g.add_argument("--json", action="store_true", default=d(False),
                   help="machine-readable output")
    g.add_argument("--debug", action="store_true", default=d(False),
                   help="debug logging and stack traces on errors")


def _verb(sub: argparse._SubParsersAction, name: str, func: Handler, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(func=func)
    return p


def _add_parent(p: argparse.ArgumentParser, diff: bool = False) -> None:
    if diff:
        p.add_argument("--parent", "-p", default=None, metavar="P",
                       help="compare against layer P (default: the recorded parent; '' = nothing)")
    else:
        p.add_argument("--parent", "-p", default=None, metavar="P", help="parent layer")


def _register_core(sub: argparse._SubParsersAction) -> None:
    _verb(sub, "info", cmd_info, "show the store, its driver and why other drivers are unavailable")
    _verb(sub, "ls", cmd_ls, "list layers")

    for name, func, what in (("create", cmd_create, "create a read-only layer"),
                             ("create-rw", cmd_create_rw, "create a read-write (container) layer")):
        p = _verb(sub, name, func, what)
        p.add_argument("id", metavar="ID")
        _add_parent(p)
        p.add_argument("--mount-label", default="", metavar="LABEL", help="SELinux mount label")
        if name == "create-rw":
            p.add_argument("--size", default=None, metavar="SIZE",
                           help="size limit, Docker units (20G = 20 GiB)")
            p.add_argument("--storage-opt", action="append", default=[], metavar="KEY=VAL",
                           help="driver storage option, repeatable")
            p.add_argument("--image", default=None, metavar="NAME",
                           help="put the layer on this image's top layer (instead of --parent)")

    p = _verb(sub, "apply", cmd_apply, "make layer ID from a tar (prints the bytes applied)")
    p.add_argument("id", metavar="ID")
    _add_parent(p)
    p.add_argument("file", metavar="FILE", help="layer tar (gzip, zstd, bzip2, xz recognised); '-' reads stdin")

    p = _verb(sub, "diff", cmd_diff, "write the layer's changes as a tar")
    p.add_argument("id", metavar="ID")
    _add_parent(p, diff=True)
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="write here (default stdout)")

    p = _verb(sub, "changes", cmd_changes, "list changed paths (A/C/D, as docker diff)")
    p.add_argument("id", metavar="ID")
    _add_parent(p, diff=True)

    p = _verb(sub, "diff-size", cmd_diff_size, "bytes changed against the parent")
    p.add_argument("id", metavar="ID")
    _add_parent(p, diff=True)

    p = _verb(sub, "mount", cmd_mount, "mount the layer's view and print its path (stays mounted)")
    p.add_argument("id", metavar="ID")
    p.add_argument("--mount-label", default="", metavar="LABEL", help="SELinux mount label")

    p = _verb(sub, "umount", cmd_umount, "release one reference taken by mount")
    p.add_argument("id", metavar="ID")

    p = _verb(sub, "exists", cmd_exists, "print true/false; exit 0 if the layer exists, else 1")
    p.add_argument("id", metavar="ID")

    p = _verb(sub, "rm", cmd_rm, "remove layers")
    p.add_argument("ids", metavar="ID", nargs="+")

    p = _verb(sub, "metadata", cmd_metadata, "driver metadata of a layer")
    p.add_argument("id", metavar="ID")

    p = _verb(sub, "cleanup", cmd_cleanup, "finish interrupted work after a crash; print what was mended")
    p.add_argument("--unmount-all", action="store_true", help="also unmount every layer")

    p = _verb(sub, "check", cmd_check, "verify records, mounts and content; exit 1 on problems")
    p.add_argument("--repair", action="store_true",
                   help="mend what can be mended without losing a complete layer")
    p.add_argument("--fast", action="store_true", help="skip hashing layer content")


def _sub_actions(p: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]


def _spread_global_options(p: argparse.ArgumentParser) -> None:
    for action in _sub_actions(p):
        for child in dict.fromkeys(action.choices.values()):  # aliases repeat a parser
            _add_global_options(child, top=False)
            _spread_global_options(child)


def build_parser(extensions: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser: core verbs, then every extension module's verbs."""
    parser = argparse.ArgumentParser(
        prog="lamina",
        description="A container layer store with Docker's graph-driver contract.",
    )
    parser.add_argument("--version", action=_VersionAction)
    _add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    _register_core(sub)
    for module_name in EXTENSIONS if extensions is None else extensions:
        importlib.import_module(module_name).register(sub)
    _spread_global_options(parser)
    return parser


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for this command line: the core verbs alone when the verb is one of
    them, else the full one.

    Why: importing every extension (images, registry, plugin, snapshotter) and building
    their parsers costs ``lamina apply`` and ``lamina diff`` more time than a small
    layer's work; a core verb parses the same either way. Anything unusual before the
    verb (help, abbreviated options) takes the full parser.
    """
    verb = _verb_in(argv)
    if verb is not None:
        core = build_parser(extensions=[])
        if verb in _sub_actions(core)[0].choices:
            return core
    return build_parser()


#: the global options that take a value (the others are flags)
_VALUE_OPTIONS = ("--root", "--driver", "--opt")
_FLAG_OPTIONS = ("--json", "--debug")


def _verb_in(argv: Sequence[str]) -> str | None:
    """The verb of a command line whose global options before it are spelled out in
    full; None when in doubt."""
    args = iter(argv)
    for arg in args:
        if arg in _VALUE_OPTIONS:
            next(args, None)
        elif arg.startswith(tuple(o + "=" for o in _VALUE_OPTIONS)) or arg in _FLAG_OPTIONS:
            continue
        elif arg.startswith("-"):
            return None
        else:
            return arg
    return None


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked for (reading the installed metadata
    costs every other run milliseconds)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        parser.exit(message=f"{parser.prog} {_version()}\n")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lamina")
    except Exception:  # noqa: BLE001 - not installed (PYTHONPATH=src): still answer
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lamina`` script; returns the exit status."""
    args = _parser_for(sys.argv[1:] if argv is None else argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="lamina: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    inv = Invocation(args)
    try:
        try:
            rc = args.func(inv)
        finally:
            inv.close()
    except LaminaError as e:
        return _fail(inv, e, e.exit_code)
    except BrokenPipeError:
        # the reader went away (``lamina diff X | head``): stop quietly, and keep the
        # interpreter's final flush from raising again on the dead pipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("lamina: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        return _fail(inv, e, 1)
    except Exception as e:  # noqa: BLE001 - a bug; still one line unless --debug
        return _fail(inv, e, 1, prefix=f"internal error ({type(e).__name__}): ",
                     hint=" (run with --debug for the stack trace)")
    return 0 if rc is None else int(rc)


def _fail(inv: Invocation, err: BaseException, code: int, prefix: str = "", hint: str = "") -> int:
    if inv.args.debug:
        traceback.print_exception(err, file=inv.stderr)
    message = prefix + _one_line(err)
    print(f"lamina: {message}{'' if inv.args.debug else hint}", file=inv.stderr)
    if inv.json:
        try:
            inv.emit({"error": {"kind": type(err).__name__, "message": message}})
        except OSError:
            pass
    return code
