"""``lamina serve docker-plugin``: run the graph-driver plugin server for dockerd.

The store root is *not* ``--root``: it is the ``Home`` dockerd sends to Init
(``<data-root>/<plugin name>``), so dockerd's data-root decides where layers live, as for
its built-in drivers. ``--driver`` and ``--opt`` (the global options) choose the lamina
driver and its options for a new store; dockerd's ``--storage-opt`` values arrive in Init
and win over ``--opt``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lamina.cli.invocation import Invocation, parse_options
from lamina.cli.verbs import serve_group

#: where dockerd looks first for plugin "lamina" (pkg/plugins/discovery.go)
DEFAULT_SOCKET = Path("/run/docker/plugins/lamina.sock")
#: where the last Init is kept; /run is emptied at boot, as dockerd's own state is
STATE_DIR = Path("/run/lamina")

_DESCRIPTION = """Serve dockerd's graph-driver plugin protocol on a unix socket, so that
dockerd --experimental -s NAME keeps its images and containers in lamina (NAME is the
socket's name: /run/docker/plugins/NAME.sock). The store root is the Home dockerd sends
to Init (DATA-ROOT/NAME), not --root; --driver and --opt choose the lamina driver and its
options for a new store, and dockerd's --storage-opt values win over --opt."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve docker-plugin``."""
    servers = serve_group(sub)
    help_text = "serve dockerd's graph-driver plugin protocol (dockerd --experimental -s lamina)"
    p = servers.add_parser("docker-plugin", help=help_text, description=_DESCRIPTION)
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"unix socket to listen on (default {DEFAULT_SOCKET}); dockerd finds "
                        "/run/docker/plugins/NAME.sock as plugin NAME")
    p.add_argument("--state", type=Path, default=None, metavar="FILE",
                   help="where to keep dockerd's last Init, to reopen the store after a restart "
                        "(default /run/lamina/docker-plugin-NAME.json)")
    p.add_argument("--no-exact-diffs", dest="exact_diffs", action="store_false",
                   help="tell dockerd our diffs are not byte-exact, so it keeps its own tar-split")
    p.add_argument("--workers", type=int, default=16, metavar="N",
                   help="threads for store calls, i.e. requests served at once (default 16)")
    p.set_defaults(func=cmd_serve_docker_plugin)


def default_state_path(socket_path: Path) -> Path:
    """One state file per socket, so two plugins on one machine keep their own."""
    return STATE_DIR / f"docker-plugin-{socket_path.stem}.json"


def cmd_serve_docker_plugin(inv: Invocation) -> int:
    # imported here: every lamina command loads this module, only this one needs aiohttp
    from lamina.plugin.docker import DockerPlugin, serve

    args = inv.args
    logging.getLogger("lamina").setLevel(logging.DEBUG if args.debug else logging.INFO)
    socket_path: Path = args.socket
    plugin = DockerPlugin(
        driver=args.driver or None,
        options=parse_options(args.opt or []),
        state_path=args.state or default_state_path(socket_path),
        exact_diffs=args.exact_diffs,
        workers=max(2, args.workers),
    )
    plugin.restore()
    serve(plugin, socket_path)
    return 0
