"""The ``isc`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from isc import _cli_daemons, _cli_tools, demo
from isc import commands as session_commands
from isc.errors import IscError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="isc", description="Change tracking for incremental copy of live volumes."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="run the built-in demonstration and check it")
    run_demo.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    _cli_tools.add_commands(commands)
    session_commands.add_commands(commands)
    _cli_daemons.add_commands(commands)
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="isc: %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except (IscError, OSError) as exc:
        print(f"isc: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("isc: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return demo.run(seed=args.seed)
    if hasattr(args, "tool"):
        return _cli_tools.run(args)
    if hasattr(args, "session_command"):
        return session_commands.run(args)
    if hasattr(args, "daemon"):
        return _cli_daemons.run(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
