"""Joining Ray: a cluster by address (or RAY_ADDRESS), else a local Ray; never initialised twice.

A local Ray that messearch starts is its own to end: `shutdown_own` shuts it down and then ends every process
that still carries this run's tag in its environment (Ray's agents can outlive an interrupted start-up or
shutdown). A cluster joined by address, or a Ray the caller started, is never touched.

Ray is imported here and in the Ray-only code paths alone, lazily: `import messearch` and every command that
does not need Ray run where Ray is not installed, and a command that does need it says so in one line.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid

from .errors import MessError

RUN_TAG_ENV = "MESSEARCH_RAY_RUN"
_own_tag: str | None = None     # set when this process started a local Ray


def require_ray(what: str, instead: str = ""):
    """The `ray` module; a MessError naming `what` needs it (and what to do `instead`) when Ray is not installed."""
    try:
        import ray
    except ImportError as e:
        alt = f", or {instead}" if instead else ""
        raise MessError(f"{what} needs Ray, which this Python ({sys.executable}) cannot import ({e}); "
                        f"install it with `pip install 'ray[tune]'`{alt}") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None, what: str = "this command", instead: str = ""):
    """Initialise Ray once: join `address` / RAY_ADDRESS when given, else start a local Ray; return the module."""
    global _own_tag
    ray = require_ray(what, instead)
    if ray.is_initialized():
        return ray
    before = signal.getsignal(signal.SIGTERM)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Joining a cluster: resources are the cluster's own, so num_cpus must not be passed.
        ray.init(address=address, log_to_driver=False)
    else:
        # A fresh tag before ray.init: every process the local Ray starts inherits it, so an interrupt at any
        # moment (even mid start-up) can find and end exactly this run's processes, and no one else's.
        _own_tag = f"{os.getpid()}-{uuid.uuid4().hex}"
        os.environ[RUN_TAG_ENV] = _own_tag
        # address="local": a new Ray of our own, even when `ray start` left one on this machine (a bare ray.init
        # would silently join that one, someone else's cluster).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    _restore_sigterm(before)
    return ray


def _restore_sigterm(before) -> None:
    # ray.init replaces the driver's SIGTERM handler (with one that exits at once, or aborts, without clean-up);
    # putting back the Python handler that was there before (the CLI's) keeps the clean interrupt path.
    if callable(before) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, before)


def started_local() -> bool:
    """Whether this process started the local Ray it uses."""
    return _own_tag is not None


def _tagged_pids(tag: str) -> list[int]:
    needle = f"{RUN_TAG_ENV}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:   # gone, or another user's process
            continue
    return pids


def shutdown_own(grace_s: float = 5.0) -> None:
    """Shut down the local Ray this process started (nothing otherwise), then end its processes that outlive it."""
    global _own_tag
    tag = _own_tag
    if tag is None:
        return
    import ray

    try:
        ray.shutdown()
    except BaseException:   # an interrupted start-up can leave Ray half-initialised; the sweep below still runs
        pass
    _own_tag = None
    os.environ.pop(RUN_TAG_ENV, None)
    # Rescan every round: a process that was starting during the first scan (an agent the raylet was spawning
    # when the interrupt came) is found and ended too.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace_s
        left = _tagged_pids(tag)
        while left and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            time.sleep(0.2)
            left = _tagged_pids(tag)
        if not left:
            break
