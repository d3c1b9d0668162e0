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

Rooms: :mod:`.invocation` (one run: arguments, store, input and output),
:mod:`.output` (how things are printed), :mod:`.verbs` (the core verbs), :mod:`.win`
(``lamina win``); this module builds the parser and runs a verb.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from lamina.cli.invocation import Handler, Invocation, parse_options
from lamina.cli.output import UsageError, check_not_terminal, go_text, one_line
from lamina.cli.verbs import register as _register_core
from lamina.errors import LaminaError

__all__ = ["EXTENSIONS", "Handler", "Invocation", "UsageError", "build_parser", "check_not_terminal",
           "go_text", "main", "parse_options"]

#: modules that add verbs; each exposes ``register(subparsers)``. Imported only if listed.
EXTENSIONS: list[str] = ["lamina.plugin.cli", "lamina.snapshotter.cli", "lamina.images.cli", "lamina.cli.win"]


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


def _sub_actions(p: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]


def _spread_global_options(p: argparse.ArgumentParser) -> None:
    for action in _sub_actions(p):
        for child in dict.fromkeys(action.choices.values()):  # aliases repeat a parser
            _add_global_options(child, top=False)
            _spread_global_options(child)


def build_parser(extensions: Sequence[str] | None = None, *, verb: str | None = None) -> argparse.ArgumentParser:
    """The full parser: core verbs, then every extension module's verbs. Given the
    ``verb`` of the command line, the extensions are left out when it is a core verb
    that no extension adds to (:func:`_parser_for` says why)."""
    parser = argparse.ArgumentParser(
        prog="lamina",
        description="A container layer store with Docker's graph-driver contract.",
    )
    parser.add_argument("--version", action=_VersionAction)
    _add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    _register_core(sub)
    chosen = sub.choices.get(verb) if verb is not None else None
    if chosen is None or _sub_actions(chosen):
        for module_name in EXTENSIONS if extensions is None else extensions:
            importlib.import_module(module_name).register(sub)
    _spread_global_options(parser)
    return parser


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for this command line: the core verbs alone when the verb is one of
    them and has nothing an extension adds, else the full one.

    Why: importing every extension (images, registry, plugin, snapshotter) and building
    their parsers costs ``lamina apply`` and ``lamina diff`` more time than a small
    layer's work; a core verb parses the same either way. A verb whose sub-verbs the
    extensions add (``serve``), and anything unusual before the verb (help, abbreviated
    options), take the full parser.
    """
    return build_parser(verb=_verb_in(argv))


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
    message = prefix + one_line(err)
    print(f"lamina: {message}{'' if inv.args.debug else hint}", file=inv.stderr)
    if inv.json:
        try:
            inv.emit({"error": {"kind": type(err).__name__, "message": message}})
        except OSError:
            pass
    return code
