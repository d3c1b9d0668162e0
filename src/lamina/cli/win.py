"""``lamina win``: verbs for Windows image layers (the windowsfilter driver)."""

from __future__ import annotations

import argparse

from lamina.cli.invocation import Invocation


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``win inspect LAYER PATH``."""
    win = sub.add_parser("win", help="Windows layer tools (windowsfilter driver)",
                         description="Tools for Windows image layers kept by the windowsfilter driver.")
    verbs = win.add_subparsers(dest="win_verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "inspect", help="show a file's Windows metadata decoded",
        description="Show a file's Windows metadata: attributes by name, the owner, group and "
                    "DACL of its security descriptor, and its times. PATH may be C:\\..., a path "
                    "in the layer's view (/Windows/...) or a tar name (Files/Windows/...).")
    p.add_argument("layer", metavar="LAYER")
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(inv: Invocation) -> int:
    from lamina.wininspect import format_inspect, inspect  # only this verb needs the codecs

    info = inspect(inv.store, inv.args.layer, inv.args.path)
    inv.emit(info, format_inspect(info))
    return 0
