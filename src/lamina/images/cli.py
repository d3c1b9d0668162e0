"""The ``lamina image`` verbs: load, save, ls, rm, inspect (pull and push: lamina.registry.cli).

Registered through :data:`lamina.cli.EXTENSIONS`; each handler takes the CLI's
``Invocation`` (store, ``--json`` output, progress bars on a terminal's stderr).
"""

from __future__ import annotations

import argparse
import datetime as _dt
from typing import TYPE_CHECKING, Any

from lamina.images import inspect as inspect_image
from lamina.images import load as load_images
from lamina.images import remove_images
from lamina.images import save as save_images
from lamina.images.records import ImageRecords
from lamina.images.refs import split_tag
from lamina.images.save import FORMATS
from lamina.progress import human_bytes

if TYPE_CHECKING:
    from lamina.cli.invocation import Invocation


def _jobs(text: str) -> int:
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of layers, 1 or more")
    return n


def cmd_load(inv: Invocation) -> int:
    from lamina.cli.output import UsageError, is_tty

    args = inv.args
    source = args.input or args.file or "-"
    if source == "-" and is_tty(inv.stdin):
        raise UsageError("refusing to read an image archive from a terminal: pipe one in or name a file")
    with inv.progress("loading") as bar:
        result = load_images(inv.store, source, stdin=inv.stdin, progress=bar, tag=args.tag,
                             jobs=args.jobs)
    lines = []
    for rec in result.images:
        lines += [f"Loaded image: {n}" for n in rec.names] or [f"Loaded image ID: {rec.id}"]
    data = {
        "images": [{"id": r.id, "names": r.names, "top_layer": r.top_layer} for r in result.images],
        "layers_loaded": result.layers_loaded,
        "layers_reused": result.layers_reused,
        "bytes_read": result.bytes_read,
    }
    inv.emit(data, lines)
    return 0


def cmd_save(inv: Invocation) -> int:
    from lamina.cli.output import check_not_terminal

    args = inv.args
    to_stdout = args.output in (None, "-")
    if to_stdout:
        check_not_terminal(inv.stdout)
    with inv.progress("saving") as bar:
        result = save_images(inv.store, args.names, args.output, fmt=args.format,
                             stdout=inv.stdout, progress=bar)
    if not to_stdout:
        inv.emit({"file": args.output, "format": args.format, "images": result.images,
                  "layers": result.layers, "bytes": result.bytes},
                 f"{args.output}: {len(result.images)} image(s), {result.layers} layer(s), "
                 f"{human_bytes(result.bytes)}")
    return 0


def _created(config: dict[str, Any]) -> str:
    text = config.get("created")
    if not isinstance(text, str):
        return "-"
    return text[:19].replace("T", " ")


def cmd_ls(inv: Invocation) -> int:
    store = inv.store
    rows = []
    data = []
    for rec in ImageRecords(store.root).all():
        size = sum((store.layer(lid).size or 0) for lid in rec.layer_ids if store.exists(lid))
        config = rec.config_json()
        for name in rec.names or [None]:
            repo, tag = split_tag(name) if name else ("<none>", "<none>")
            rows.append([repo, tag or "latest", rec.short_id, _created(config), human_bytes(size)])
        data.append({"id": rec.id, "names": rec.names, "top_layer": rec.top_layer,
                     "layers": len(rec.chain_ids), "size": size, "created": config.get("created"),
                     "loaded": _dt.datetime.fromtimestamp(rec.loaded, _dt.UTC).isoformat()})
    from lamina.cli.output import table

    text = table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], rows) if rows else []
    inv.emit(data, text)
    return 0


def cmd_rm(inv: Invocation) -> int:
    result = remove_images(inv.store, inv.args.names, force=inv.args.force)
    lines = [f"Untagged: {n}" for n in result.untagged]
    lines += [f"Deleted: {i}" for i in result.deleted]
    lines += [f"Deleted layer: {lid}" for lid in result.layers_removed]
    lines += [f"Kept layer (in use): {lid}" for lid in result.layers_kept]
    inv.emit({"untagged": result.untagged, "deleted": result.deleted,
              "layers_removed": result.layers_removed, "layers_kept": result.layers_kept}, lines)
    return 0


def cmd_inspect(inv: Invocation) -> int:
    import json

    docs = [inspect_image(inv.store, ref) for ref in inv.args.names]
    inv.emit(docs, json.dumps(docs, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``lamina image ...`` to the top-level subparsers."""
    image = sub.add_parser("image", help="load, save, pull, push, list and remove images",
                           description="Images: docker-save archives and OCI layouts in and out.")
    verbs = image.add_subparsers(dest="image_verb", metavar="VERB", required=True)

    p = verbs.add_parser("load", help="load images from a docker-save archive or an OCI layout",
                         description="Load every image of a docker-save archive or an OCI image "
                                     "layout (a directory or a tar; gzip, zstd or plain layers). "
                                     "Every digest is checked; a failed image leaves nothing.")
    p.add_argument("file", nargs="?", default=None, metavar="FILE",
                   help="archive file or layout directory; '-' (default) reads stdin")
    p.add_argument("-i", "--input", default=None, metavar="FILE", help="same as FILE (docker load -i)")
    p.add_argument("--tag", default=None, metavar="NAME",
                   help="name the image (archives of one image only)")
    p.add_argument("-j", "--jobs", type=_jobs, default=None, metavar="N",
                   help="layers unpacked side by side where the driver allows it "
                        "(overlay; default: one per CPU; 1: one after the other)")
    p.set_defaults(func=cmd_load)

    p = verbs.add_parser("save", help="save images as a docker-save archive or an OCI layout",
                         description="Write images to a tar that docker load accepts.")
    p.add_argument("names", nargs="+", metavar="NAME", help="image name or ID")
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="write here (default stdout)")
    p.add_argument("--format", choices=FORMATS, default="docker",
                   help="docker (docker save's format, default) or oci (OCI image layout)")
    p.set_defaults(func=cmd_save)

    p = verbs.add_parser("ls", help="list images")
    p.set_defaults(func=cmd_ls)

    p = verbs.add_parser("rm", help="remove images and the layers nothing else uses")
    p.add_argument("names", nargs="+", metavar="NAME", help="image name or ID")
    p.add_argument("-f", "--force", action="store_true",
                   help="remove the image even if a container uses it (its layers stay)")
    p.set_defaults(func=cmd_rm)

    p = verbs.add_parser("inspect", help="show an image's IDs, layers and config as JSON")
    p.add_argument("names", nargs="+", metavar="NAME", help="image name or ID")
    p.set_defaults(func=cmd_inspect)

    from lamina.registry.cli import register as register_registry

    register_registry(verbs)  # image pull, image push
