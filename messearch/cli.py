"""The `messearch` command: a thin layer over the library's functions."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import MessError


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="a space file's positions, heads, GMACs and number of configurations")
    p.add_argument("space", help="search-space YAML file")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="override the space's input size")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _run_info(args) -> int:
    from .info import space_info, format_info

    info = space_info(args.space, tuple(args.input_size) if args.input_size else None)
    print(json.dumps(info) if args.json else format_info(info))
    return 0


# Each command: (adder, runner). Add new commands here, in the order `--help` lists them.
COMMANDS = {
    "info": (_add_info, _run_info),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="messearch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args) or 0
    except MessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
