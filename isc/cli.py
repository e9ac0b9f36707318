"""The ``isc`` command line."""

from __future__ import annotations

import argparse
import sys

from isc import _cli_tools, demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="isc", description="Change tracking for incremental copy of live volumes."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="run the built-in demonstration and check it")
    run_demo.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    _cli_tools.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.run(seed=args.seed)
    if hasattr(args, "tool"):
        return _cli_tools.run(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
