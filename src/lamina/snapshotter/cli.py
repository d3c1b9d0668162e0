"""``lamina serve containerd-snapshotter``: the store as a containerd proxy snapshotter.

containerd loads it from its config::

    [proxy_plugins.lamina]
      type = "snapshot"
      address = "/run/lamina/containerd-snapshotter.sock"

and ``ctr``/nerdctl/BuildKit then use ``--snapshotter lamina``. The store is ``--root``
(default ``/var/lib/lamina``), shared with every other lamina face.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lamina.cli.invocation import Invocation
from lamina.cli.verbs import serve_group

DEFAULT_SOCKET = Path("/run/lamina/containerd-snapshotter.sock")

_DESCRIPTION = """Serve containerd's snapshotter API (containerd.services.snapshots.v1)
over gRPC on a unix socket, so that containerd, with a [proxy_plugins.NAME] entry of
type "snapshot" at this socket, keeps its image layers and container filesystems in the
lamina store at --root. Works with the overlay driver (as containerd's overlayfs) and
vfs (as its native snapshotter). Mounts are described for containerd to perform, so
containers keep running while this server restarts."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve containerd-snapshotter``."""
    servers = serve_group(sub)
    p = servers.add_parser("containerd-snapshotter", description=_DESCRIPTION,
                           help="serve containerd's snapshotter API (a proxy plugin: --snapshotter lamina)")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"unix socket to listen on (default {DEFAULT_SOCKET}); containerd's "
                        "proxy_plugins address")
    p.add_argument("--workers", type=int, default=8, metavar="N",
                   help="threads serving calls at once (default 8)")
    p.set_defaults(func=cmd_serve_containerd_snapshotter)


def cmd_serve_containerd_snapshotter(inv: Invocation) -> int:
    # imported here: every lamina command loads this module, only this one needs grpc
    from lamina.snapshotter.server import serve
    from lamina.snapshotter.service import SnapshotService

    args = inv.args
    logging.getLogger("lamina").setLevel(logging.DEBUG if args.debug else logging.INFO)
    serve(SnapshotService(inv.store), args.socket, workers=max(2, args.workers))
    return 0
