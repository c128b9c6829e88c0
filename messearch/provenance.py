"""Provenance of a front: what its figures were computed from, and the checks that keep them honest.

The search reads the cache's statistics, so every figure follows the cache's own space (positions, heads, classes,
input size) and exit policy. A `--space` may only change the search's grid (thresholds, max_exits, mode); where it
disagrees with the cache on anything else it is refused, naming the field and both values, except for one exact
conversion: a coarser pixel-confidence grid whose bin edges are all edges of the cached grid. The front records
the policy the search really read (kind, pixel threshold, the cache's n_bins and the bin index) and `export`
builds exactly that policy, after checking it against the checkpoint the front is exported from.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from .errors import MessError
from .space import PolicySpec, Space, space_from_text


def _head_fields(space: Space) -> list[dict]:
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(h).items()} for h in space.heads]


def reconcile_space(space: Space, cached: Space, cache_dir) -> tuple[PolicySpec, str]:
    """The exit policy the search must read for `space` over a cache built with `cached`, and a note of the exact
    conversion made ('' when none); any other disagreement is a MessError naming the field and both values."""
    checks = [("model", space.model, cached.model), ("num_classes", space.num_classes, cached.num_classes),
              ("ignore_index", space.ignore_index, cached.ignore_index),
              ("input_size", list(space.input_size), list(cached.input_size)),
              ("positions", list(space.positions), list(cached.positions)),
              ("heads", space.head_names, cached.head_names)]
    checks += [(f"heads[{i}]", mine, theirs) for i, (mine, theirs) in
               enumerate(zip(_head_fields(space), _head_fields(cached)))]
    checks += [("policy.kind", space.policy.kind, cached.policy.kind),
               ("policy.pixel_threshold", space.policy.pixel_threshold, cached.policy.pixel_threshold)]
    for name, mine, theirs in checks:
        if mine != theirs:
            raise MessError(f"{space.source}: field '{name}' is {mine!r} but the cache {cache_dir} was built with "
                            f"{theirs!r}; search with the cache's own space (leave out --space), or rebuild the cache "
                            f"from a checkpoint of this space")
    mine, theirs = space.policy.n_bins, cached.policy.n_bins
    if mine == theirs:
        return cached.policy, ""
    if space.policy.kind == "fraction" and theirs % mine:
        raise MessError(f"{space.source}: field 'policy.n_bins' is {mine} but the cache {cache_dir} counts pixels on "
                        f"{theirs} bins; allowed: {theirs} or a divisor of it (a coarser grid of the cached bins)")
    if space.policy.kind == "fraction":
        note = (f"policy.n_bins {mine} of {space.source} read on the cache's grid of {theirs} bins: pixel threshold "
                f"{space.policy.pixel_threshold!r} is bin {cached.policy.pixel_threshold_bin} of {theirs} (exact)")
    else:
        note = f"policy.n_bins {mine} of {space.source} ignored: the 'mean' policy reads no bins"
    return cached.policy, note


def policy_record(policy: PolicySpec) -> str:
    """The policy a front records: what the search read (the cache's n_bins and the bin index)."""
    return json.dumps({"kind": policy.kind, "pixel_threshold": policy.pixel_threshold, "n_bins": policy.n_bins,
                       "pixel_threshold_bin": policy.pixel_threshold_bin})


def policy_to_build(meta: dict, checkpoint_policy: PolicySpec, front_path) -> PolicySpec:
    """The exit policy `export` must build for a front with key-value metadata `meta`, checked against the policy of
    the checkpoint (whose cache the search read); a front whose record cannot be what the search read is refused."""
    text = meta.get("policy")
    if not text:
        if meta.get("space_text"):   # a front written without a policy record: its space file's policy
            return space_from_text(meta["space_text"], f"{front_path}:space").policy
        return checkpoint_policy
    try:
        rec = json.loads(text)
        kind, n_bins, pt = rec["kind"], int(rec["n_bins"]), rec.get("pixel_threshold")
    except (ValueError, KeyError, TypeError):
        raise MessError(f"{front_path}: unreadable policy record {text!r} in its metadata") from None
    if kind != checkpoint_policy.kind or n_bins != checkpoint_policy.n_bins:
        raise MessError(f"{front_path}: the front records policy kind {kind!r} on {n_bins} bins, but its checkpoint's "
                        f"cache holds kind {checkpoint_policy.kind!r} on {checkpoint_policy.n_bins} bins: its figures "
                        f"were not computed with the policy it names; search the cache again")
    if kind == "mean":
        return PolicySpec(kind="mean", n_bins=n_bins)
    b = rec.get("pixel_threshold_bin")
    if b is None or pt is None or int(b) / n_bins != float(pt):
        raise MessError(f"{front_path}: the front records pixel threshold {pt!r} but bin {b!r} of {n_bins} "
                        f"(a front searched before its policy was recorded exactly); search the cache again")
    return PolicySpec(kind="fraction", pixel_threshold=int(b) / n_bins, n_bins=n_bins)


def check_built_policy(model_policy: dict, policy: PolicySpec, front_path) -> None:
    """Refuse an exported model whose policy (kind, bin, n_bins) is not the one the front recorded."""
    want = {"kind": policy.kind, "pixel_threshold_bin": policy.pixel_threshold_bin, "n_bins": int(policy.n_bins)}
    got = {k: model_policy.get(k) for k in want}
    if got != want:
        raise MessError(f"{front_path}: the exported model would exit on policy {got}, not the front's {want}")
