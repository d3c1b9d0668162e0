"""The ``lamina image pull`` and ``lamina image push`` verbs (a face over the package).

Added to ``lamina image`` by :func:`register` (called from :mod:`lamina.images.cli`).
Output: on a terminal's stderr one progress line per layer and a total; on stdout a short
summary, only the image ID with ``--quiet``, the result as JSON with ``--json``. Errors
are the CLI's usual one line naming the reference, exit 1.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lamina.progress import MultiProgress, human_bytes
from lamina.registry.credentials import Credentials
from lamina.registry.pull import PullEvents, pull
from lamina.registry.push import COMPRESSIONS, FORMATS, PushEvents, push
from lamina.registry.transport import ClientOptions

if TYPE_CHECKING:
    from lamina.cli.invocation import Invocation


class _PullBars(PullEvents):
    """Pull events onto a :class:`MultiProgress`; also the loader's progress sink."""

    def __init__(self, bars: MultiProgress) -> None:
        self.bars = bars
        self.order: list[str] = []
        self.total: int | None = None
        self.done = 0
        self._label = ""

    def layers(self, layers: list[tuple[str, int, str]]) -> None:
        for i, (digest, size, state) in enumerate(layers, 1):
            self.order.append(digest)
            self.bars.add(digest, f"{digest[7:19]} {i}/{len(layers)}", size, state)

    def state(self, digest: str, state: str) -> None:
        self.bars.state(digest, state)

    def downloaded(self, digest: str, n: int) -> None:
        self.bars.update(digest, n)

    # the loader's ProgressSink: it names the layer it applies, and counts its bytes
    @property
    def label(self) -> str:
        return self._label

    @label.setter
    def label(self, value: str) -> None:
        self._label = value
        try:
            n = int(value.rsplit(" ", 1)[-1].split("/")[0])
        except ValueError:
            return
        for i, digest in enumerate(self.order, 1):
            if i < n and self.bars.items.get(digest, [None, ""])[1] == "applying":
                self.bars.state(digest, "done")
        if 0 < n <= len(self.order):
            self.bars.state(self.order[n - 1], "applying")

    def update(self, n: int) -> None:
        self.done += n

    def finish(self) -> None:
        for digest in self.order:
            if self.bars.items[digest][1] in ("applying", "downloaded"):
                self.bars.state(digest, "done")


class _PushBars(PushEvents):
    def __init__(self, bars: MultiProgress) -> None:
        self.bars = bars

    def layers(self, layers: list[tuple[str, int | None]]) -> None:
        for label, size in layers:
            self.bars.add(label, label, size)

    def state(self, label: str, state: str) -> None:
        self.bars.state(label, state)

    def sent(self, label: str, n: int) -> None:
        self.bars.update(label, n)


def _options(inv: Invocation) -> ClientOptions:
    from lamina.cli.output import UsageError

    args = inv.args
    creds = None
    if args.password_stdin:
        if not args.username:
            raise UsageError("--password-stdin needs --username")
        password = inv.stdin.readline().decode("utf-8").rstrip("\r\n")
        creds = Credentials(args.username, password)
    elif args.username:
        raise UsageError("--username needs --password-stdin (passwords are never taken as arguments)")
    return ClientOptions(insecure=args.insecure, ca_file=args.ca_file, credentials=creds)


def cmd_pull(inv: Invocation) -> int:
    args = inv.args
    options = _options(inv)
    bars = MultiProgress("pulling", stream=inv.stderr, enabled=False if inv.json or args.quiet else None)
    events = _PullBars(bars)
    with bars:
        result = pull(inv.store, args.ref, platform=args.platform, options=options,
                      progress=events, events=events, parallel=args.jobs)
        events.finish()
    if args.quiet and not inv.json:
        inv.stdout.write(f"{result.image_id}\n".encode())
        inv.stdout.flush()
        return 0
    lines = [f"{result.reference}: {result.layers_pulled} layer(s) pulled "
             f"({human_bytes(result.bytes_downloaded)}), {result.layers_reused} already here",
             f"Digest: {result.manifest_digest}", f"Platform: {result.platform}",
             f"Image ID: {result.image_id}"]
    inv.emit(result.to_json(), lines)
    return 0


def cmd_push(inv: Invocation) -> int:
    args = inv.args
    options = _options(inv)
    bars = MultiProgress("pushing", stream=inv.stderr, enabled=False if inv.json or args.quiet else None)
    with bars:
        result = push(inv.store, args.name, args.ref or args.name, options=options, fmt=args.format,
                      compression=args.compression, events=_PushBars(bars), parallel=args.jobs)
    if args.quiet and not inv.json:
        inv.stdout.write(f"{result.image_id}\n".encode())
        inv.stdout.flush()
        return 0
    lines = [f"{result.reference}: {result.layers_uploaded} layer(s) uploaded "
             f"({human_bytes(result.bytes_uploaded)}), {result.layers_mounted} mounted, "
             f"{result.layers_existing} already there"
             + (f", {result.layers_foreign} foreign (by URL)" if result.layers_foreign else ""),
             f"Digest: {result.manifest_digest} (size {result.manifest_size})"]
    inv.emit(result.to_json(), lines)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure", action="store_true",
                   help="allow plain HTTP and untrusted certificates (loopback registries "
                        "may speak plain HTTP without it)")
    p.add_argument("--ca-file", default=None, metavar="PEM", help="also trust these CA certificates")
    p.add_argument("--username", "-u", default=None, help="user name (with --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the image ID")
    p.add_argument("--jobs", "-j", type=int, default=3, metavar="N", help="blobs at once (default 3)")


def register(verbs: argparse._SubParsersAction) -> None:
    """Add ``pull`` and ``push`` to the ``lamina image`` verbs."""
    p = verbs.add_parser("pull", help="pull an image from a registry",
                         description="Pull an image (Docker reference: [registry/]repo[:tag][@digest]; "
                                     "a bare name is on Docker Hub). Credentials come from "
                                     "~/.docker/config.json or --username/--password-stdin. "
                                     "Every blob is verified; a failed pull leaves nothing.")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
                   help="which image of a multi-platform index (default: this machine's; "
                        "windows/amd64 in a windowsfilter store)")
    _common(p)
    p.set_defaults(func=cmd_pull)

    p = verbs.add_parser("push", help="push an image to a registry",
                         description="Push image NAME (a name or ID in the store) to REF "
                                     "(default: NAME). Blobs the registry has are skipped or "
                                     "mounted; a pulled image pushed back keeps its manifest digest.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("ref", metavar="REF", nargs="?", default=None)
    p.add_argument("--format", choices=FORMATS, default="docker",
                   help="manifest format for a new manifest (default docker schema 2)")
    p.add_argument("--compression", choices=COMPRESSIONS, default=None,
                   help="layer compression (default: the blobs the layers came as, else gzip)")
    _common(p)
    p.set_defaults(func=cmd_push)

