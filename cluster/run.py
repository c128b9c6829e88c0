"""Run a `messearch` command on a running Ray cluster (entry script for `ray submit`).

    ray submit cluster/aws.yaml cluster/run.py -- pipeline --space S.yaml --data D --out OUT

`ray submit` copies only this file to the head node, so it imports nothing but the installed
`messearch` package (the cluster YAML installs it on every node). It connects to the cluster,
adds `--address auto` for subcommands that accept it, and exits with the command's status.
"""

from __future__ import annotations

import argparse
import sys


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Subcommand name (and alias) -> its parser."""
    for action in parser._actions:  # argparse keeps subparsers only in this private list
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def forward_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`argv` with `--address auto` after the subcommand name, if that subcommand accepts it.

    Left unchanged when the subcommand has no `--address` option (or is unknown: the CLI's own
    parser then reports the error), or when the user already gave one.
    """
    subs = _subparsers(parser)
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg in subs:
            if "--address" not in subs[arg]._option_string_actions:
                return list(argv)
            rest = argv[i + 1 :]
            if any(a == "--address" or a.startswith("--address=") for a in rest):
                return list(argv)
            # Right after the name, so a positional `nargs="*"` or a `--` later cannot swallow it.
            return [*argv[: i + 1], "--address", "auto", *rest]
        if not arg.startswith("-"):
            break  # the first positional is not a known subcommand
    return list(argv)


def connect() -> str:
    """Join the running cluster (RAY_ADDRESS, else the one started on this machine); its address."""
    import ray

    # address="auto" joins an existing cluster; num_cpus/num_gpus are not allowed with it.
    ctx = ray.init(address="auto", log_to_driver=True)
    return ctx.address_info.get("gcs_address") or ctx.address_info.get("address", "?")


def main(argv: list[str] | None = None) -> int:
    """Connect to Ray, run `messearch.cli.main` with the forwarded arguments, return its status."""
    from messearch import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":  # tolerate `run.py -- pipeline ...` when called by hand
        argv = argv[1:]
    forwarded = forward_argv(argv, cli.build_parser())
    try:
        address = connect()
    except ConnectionError as e:
        print(
            f"error: no running Ray cluster to join ({e}); start one with `ray up <cluster.yaml>` "
            "or `ray start --head`, or set RAY_ADDRESS",
            file=sys.stderr,
        )
        return 2
    print(f"run.py: connected to Ray at {address}; messearch {' '.join(forwarded)}", file=sys.stderr)
    return cli.main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
