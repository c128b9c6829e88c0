"""Joining Ray: a cluster by address (or RAY_ADDRESS), else a local Ray; never initialised twice."""

from __future__ import annotations

import os


def connect(address: str | None = None, num_cpus: int | None = None):
    """Initialise Ray once: join `address` / RAY_ADDRESS when given, else start a local Ray; return the module."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Joining a cluster: resources are the cluster's own, so num_cpus must not be passed.
        ray.init(address=address, log_to_driver=False)
    else:
        # "local": always a new Ray of our own. Without it ray.init() joins any Ray it finds running on this
        # machine (another user's, another test session's), and refuses num_cpus.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray
