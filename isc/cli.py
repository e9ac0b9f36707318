"""The ``isc`` command line.

The output options ``-v/--verbose``, ``-q/--quiet`` and ``--json`` go before
or after the verb (``isc --json status S`` is ``isc status S --json``):

================  =============================================================
``-v``            log progress to stderr
``-q``            print nothing on stdout and no progress bar; warnings and
                  errors still go to stderr
``--json``        the verb's report as JSON (one object per line where a verb
                  reports more than once); a verb without one refuses it
================  =============================================================

Errors (``IscError``, ``OSError``) print one line, ``isc: error: ...``, and
exit 1; usage errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys

from isc import __version__, _cli_daemons, _cli_docs, _cli_tools, demo
from isc import commands as session_commands
from isc.errors import IscError


def build_parser() -> argparse.ArgumentParser:
    """The ``isc`` parser, every verb in it (the man page and completion read it too)."""
    parser = argparse.ArgumentParser(
        prog="isc", description="Change tracking for incremental copy of live volumes."
    )
    parser.add_argument("--version", action="version", version=f"isc {__version__}")
    _output_options(parser, False)
    parser.add_argument(
        "--json",
        action="store_true",
        dest="json_anywhere",
        help="print the verb's report as JSON (as the verb's own --json)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="VERB")
    run_demo = commands.add_parser("demo", help="run the built-in demonstration and check it")
    run_demo.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    _cli_tools.add_commands(commands)
    session_commands.add_commands(commands)
    _cli_daemons.add_commands(commands)
    _cli_docs.add_commands(commands)
    for leaf in verbs(parser).values():
        _output_options(leaf, argparse.SUPPRESS)
        leaf.set_defaults(verb_parser=leaf)
    return parser


def verbs(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every verb's parser by its name (``bench write-path`` for nested ones), in order."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                deeper = verbs(sub, f"{prefix}{name} ")
                found.update(deeper or {f"{prefix}{name}": sub})
    return found


def _output_options(parser: argparse.ArgumentParser, default) -> None:
    # SUPPRESS: a verb's parser sets them only when given, so one given before
    # the verb is not overwritten by the verb's default.
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="log progress to stderr"
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="print nothing on stdout and no progress bar (errors and warnings still show)",
    )


def _resolve_json(args: argparse.Namespace) -> None:
    """Apply a ``--json`` given before the verb as the verb's own, or refuse it."""
    leaf = args.verb_parser
    own = next((a for a in leaf._actions if a.dest == "json"), None)
    if args.json_anywhere:
        if own is None:
            leaf.error("this verb prints no JSON; drop --json")
        if not args.json:
            args.json = own.const  # True, or "-" (stdout) where --json takes a FILE
    if args.quiet and (args.verbose or getattr(args, "json", None) in (True, "-")):
        leaf.error("--quiet contradicts --verbose and --json to stdout; give one of them")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _resolve_json(args)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="isc: %(name)s: %(message)s")
    try:
        with contextlib.ExitStack() as quiet:
            if args.quiet:
                null = quiet.enter_context(open(os.devnull, "w"))
                quiet.enter_context(contextlib.redirect_stdout(null))
            return _dispatch(parser, args)
    except (IscError, OSError) as exc:
        print(f"isc: error: {describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("isc: interrupted", file=sys.stderr)
        return 130


def describe(exc: BaseException) -> str:
    """``exc`` as a user reads it: an ``OSError`` on a file says which file and what
    happened, without Python's ``[Errno N]`` and quoting."""
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename is None:
            return exc.strerror
        if exc.errno == errno.ENOTDIR:
            return f"{exc.filename}: a part of this path is a file, not a directory"
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "demo":
        return demo.run(seed=args.seed)
    if hasattr(args, "tool"):
        return _cli_tools.run(args)
    if hasattr(args, "session_command"):
        return session_commands.run(args)
    if hasattr(args, "daemon"):
        return _cli_daemons.run(args)
    if hasattr(args, "docs"):
        return _cli_docs.run(parser, args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
