"""The core verbs of ``lamina``: one small function per verb over the store's API, and
the parsers that name them (:func:`register`).

Why the verbs hold no logic of their own: the CLI is one face among several over
:class:`lamina.store.Store`; what a verb does beyond parsing and printing belongs to the
store, where the other faces get it too.
"""

from __future__ import annotations

import argparse
import traceback

from lamina.cli.invocation import Handler, Invocation, parse_options
from lamina.cli.output import UsageError, check_not_terminal, one_line, table
from lamina.errors import InvalidArchive, LaminaError, MountKept
from lamina.ids import check_id, parse_size
from lamina.progress import human_bytes

# -- verbs ---------------------------------------------------------------------------


def cmd_info(inv: Invocation) -> int:
    from lamina.drivers import registry
    from lamina.fs.backingfs import backing_fs

    store = inv.store
    status = [(str(k), str(v)) for k, v in store.status()]
    own = {"Driver", "Root", "Layers", "Backing Filesystem"}  # shown on their own lines
    # one spelling for every driver: statfs's, as Docker names it ("extfs", not "ext4")
    backing = dict(status).get("Backing Filesystem") or backing_fs(store.root)
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
    """The complete layers; a layer that is a containerd snapshot shows its key (or
    committed name) in a last SNAPSHOT column (only when the store has any) and as
    ``snapshot`` in ``--json`` (null for the others)."""
    records = inv.store.layers()
    keys = inv.store.snapshot_keys()
    rows = [[r.id, r.parent or "-", "rw" if r.rw else "ro",
             human_bytes(r.size) if r.size is not None else "-", str(r.mount_count)]
            for r in records]
    header = ["ID", "PARENT", "KIND", "SIZE", "MOUNTS"]
    if any(r.id in keys for r in records):
        header.append("SNAPSHOT")
        for row, r in zip(rows, records, strict=True):
            row.append(keys.get(r.id, "-"))
    text = table(header, rows) if rows else []
    inv.emit([{**r.to_json(), "snapshot": keys.get(r.id)} for r in records], text)
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
            print(f"lamina: {one_line(e)}", file=inv.stderr)
            failed.append({"id": layer_id, "kind": type(e).__name__, "message": one_line(e)})
        else:
            removed.append(layer_id)
    inv.emit({"removed": removed, "failed": failed}, removed)
    return 1 if failed else 0


def cmd_metadata(inv: Invocation) -> int:
    meta = inv.store.metadata(inv.args.id)
    inv.emit(dict(meta), [f"{k}: {v}" for k, v in sorted(meta.items())])
    return 0


def cmd_cleanup(inv: Invocation) -> int:
    """Mend what crashes left; with ``--unmount-all`` release every mount too, and exit 1
    naming each one still in use (left mounted) on stderr."""
    from lamina.images import recover as recover_images

    kept: MountKept | None = None
    try:
        mended = inv.store.cleanup(unmount_all=inv.args.unmount_all)
    except MountKept as e:  # the rest was done: say what, then what is still mounted
        kept, mended = e, e.done
    mended += recover_images(inv.store)  # layers of killed image loads (no image owns them)
    if kept is None:
        inv.emit({"mended": mended}, mended)
        return 0
    inv.emit({"mended": mended, "kept": kept.kept}, mended)
    for line in kept.kept:
        print(f"lamina: not released: {line}", file=inv.stderr)
    return 1


def cmd_check(inv: Invocation) -> int:
    """Exit 0 only if the store is whole (after repairs, with ``--repair``)."""
    from lamina.check import check, remaining

    content = not inv.args.fast
    problems, repairs = check(inv.store, repair=inv.args.repair, content=content)
    # after a repair, check again: only what is really gone counts as mended
    left = remaining(inv.store, content=content) if inv.args.repair and problems else problems
    data = {
        "problems": [{"layer": p.layer, "kind": p.kind.value, "message": p.message, "repairable": p.repairable}
                     for p in problems],
        "repaired": repairs,
        "ok": not left,
    }
    lines = [f"problem: {p}" + ("" if p.repairable else " (not repairable)") for p in problems]
    lines += [f"repaired: {r}" for r in repairs]
    inv.emit(data, lines or ["ok"])
    return 0 if not left else 1


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


def register(sub: argparse._SubParsersAction) -> None:
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

    serve = sub.add_parser("serve", help="run a server that lets other programs use the store",
                           description="Run a server that lets other programs use the store.")
    serve.add_subparsers(dest="server", metavar="SERVER", required=True)

    p = _verb(sub, "check", cmd_check, "verify records, mounts and content; exit 1 on problems")
    p.add_argument("--repair", action="store_true",
                   help="mend what can be mended without losing a complete layer")
    p.add_argument("--fast", action="store_true", help="skip hashing layer content")




def serve_group(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The subparsers of ``lamina serve``, where each face that serves the store (the
    Docker plugin, the containerd snapshotter) adds its server."""
    serve = sub.choices["serve"]
    return next(a for a in serve._actions if isinstance(a, argparse._SubParsersAction))
