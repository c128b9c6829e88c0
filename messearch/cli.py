"""The `messearch` command: a thin layer over the library's functions."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading

# The parser, the dispatch and the error handling live here; each command's adder and runner live with its family
# (cli_prepare: before the search; cli_front: the search and after), and each runner calls one library function.
from . import cli_front, cli_prepare
from .errors import MessError

# Where each command writes: its --out is a file or a folder, checked before any work starts.
OUT_IS_FOLDER = {"cache": True, "train": True, "pipeline": True, "quickstart": True,
                 "profile": False, "export": False, "search": False, "plot": False}
# What each command reads (argument -> its name in messages): an --out that is one of them, or a file in one, is
# refused (it would overwrite the command's own input).
OUT_READS = {"search": {"cache": "--cache", "space": "--space", "profile": "--profile"},
             "export": {"checkpoint": "--checkpoint", "front": "--front"}, "profile": {"checkpoint": "--checkpoint"},
             "plot": {"front": "front"}}

# Each command: (adder, runner), in the order `--help` lists them; the runners live with their family.
COMMANDS = {**cli_prepare.COMMANDS, **cli_front.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="messearch", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="on an error, print the full (remote) stack too")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def _kept(args) -> str:
    """What an interrupted command kept and how to resume it (one clause)."""
    from pathlib import Path

    cmd, out = args.command, Path(getattr(args, "out", None) or ".")
    if cmd == "cache":
        try:
            shards = json.loads((out / "manifest.json").read_text())["shards"]
            done = sum(s is not None for s in shards)
        except (OSError, ValueError, KeyError, TypeError):
            return "nothing was cached; rerun the same command to start again"
        return f"{done} of {len(shards)} shards kept in {out}; rerun the same command with --resume to finish"
    if cmd == "search":
        if args.local:
            return f"no front written to {out}; rerun the same command to search again"
        return (f"no front written to {out}; Ray Tune's progress kept in {out.resolve().parent / 'tune'}; "
                f"rerun the same command with --resume to continue")
    if cmd == "train":
        state = out / "train_state.pt"
        if state.exists():
            return f"completed epochs kept in {state}; rerun the same command with --resume to continue"
        return "no epoch completed, nothing kept; rerun the same command to start again"
    if cmd in ("pipeline", "quickstart"):
        return f"completed stages kept in {out}; rerun the same command to resume from the first unfinished one"
    return "nothing was written; rerun the same command"


def _error_line(e: BaseException, debug: bool) -> str:
    """The one line printed for a user error; a remote (Ray worker) error shows its original message, and its
    stack goes to a log file the line names (or to stderr with --debug)."""
    import tempfile
    import time
    import traceback

    from .errors import is_remote, remote_cause

    if not is_remote(e):
        if debug:
            traceback.print_exception(e)
        return f"error: {e}"
    cause = remote_cause(e)
    stack = "Traceback of the error raised in a Ray worker:\n" + re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if debug:
        print(stack, file=sys.stderr)
        return f"error: {first}"
    log = os.path.join(tempfile.gettempdir(), f"messearch-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    try:
        with open(log, "w", encoding="utf-8") as f:
            f.write(stack + "\n")
    except OSError:
        return f"error: {first} (rerun with --debug for the remote stack)"
    return f"error: {first} (remote stack in {log})"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl+C so the same clean-up runs; exits 143."""


def _on_sigterm(signum, frame):
    # Deliver SIGTERM the way Ctrl+C arrives: a running Ray Tune has its own SIGINT handler that stops trials
    # gracefully (and saves its state); otherwise Python's raises KeyboardInterrupt.
    global _terminated
    _terminated = True
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, frame)
    else:
        raise _Terminated()


_terminated = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    from .errors import is_remote, remote_cause
    from .ray_runtime import shutdown_own

    global _terminated
    args = build_parser().parse_args(argv)
    _terminated = False
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        from .files import check_not_input, check_writable

        if getattr(args, "out", None) and args.command in OUT_IS_FOLDER:
            check_writable(args.out, folder=OUT_IS_FOLDER[args.command])
            check_not_input(args.out, {name: getattr(args, a) for a, name in OUT_READS.get(args.command, {}).items()})
        if getattr(args, "onnx", None):
            check_writable(args.onnx, folder=True, flag="--onnx")
        return COMMANDS[args.command][1](args) or 0
    except KeyboardInterrupt as e:
        code = 143 if (_terminated or isinstance(e, _Terminated)) else 130
        print(f"interrupted ({'SIGTERM' if code == 143 else 'Ctrl+C'}): {_kept(args)}", file=sys.stderr)
        return code
    except Exception as e:
        # A user error, or any error raised inside a Ray worker: one line (the remote stack goes to a log file).
        # Anything else is a bug in messearch and keeps its traceback.
        if not isinstance(e, MessError) and not is_remote(e):
            raise
        print(_error_line(e, args.debug), file=sys.stderr)
        return 2 if isinstance(remote_cause(e), MessError) else 1
    finally:
        shutdown_own()   # only a local Ray this process started; a joined cluster is left alone
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
