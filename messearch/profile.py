"""Per-device latency profiles: the measured time of every backbone segment, candidate head and the final head.

A profile is a Parquet file (one row per piece: kind in {segment, head, final}, segment index, position, head,
ms = median time of one call at the profile's batch size) whose key-value metadata records the device's name,
batch size, torch version and threads. `load_profile` turns it into a costs.CostTable with unit "ms", so the
search predicts a configuration's latency exactly as it predicts its MACs.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .costs import CostTable
from .devices import device_name, exact_numerics, parse_device
from .errors import MessError
from .files import atomic_path, sha256_file

FORMAT = "messearch/profile-v1"


def _time(fn, min_run_time: float, threads: int) -> tuple[float, int]:
    """Median milliseconds of one call of fn, and how many calls were timed (torch.utils.benchmark's Timer)."""
    from torch.utils.benchmark import Timer

    for _ in range(2):   # warm-up: allocator, cuDNN autotuning, lazy init
        fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    once = timer.timeit(1).median
    # Blocks of about a tenth of min_run_time, until it is spent: blocked_autorange sizes its blocks by powers of
    # ten and overshot min_run_time up to tenfold (10 s, not 3.4 s, for the quickstart's 34 pieces).
    number = max(1, int(min_run_time / 10 / max(once, 1e-9)))
    per_call, spent = [], once
    while spent < min_run_time or not per_call:
        per_call.append(timer.timeit(number).median)
        spent += per_call[-1] * number
    return float(np.median(per_call)) * 1e3, len(per_call) * number


def profile_latency(checkpoint, device: str = "cpu", batch_size: int = 1, out=None, min_run_time: float = 0.1,
                    threads: int | None = None, progress: bool = True):
    """Time every backbone segment, candidate head and the final head of a MESS checkpoint on `device` at the
    space's input size; write the profile to `out` (Parquet, atomically) when given; return it as a DataFrame."""
    dev = parse_device(device)
    exact_numerics(dev)   # the kernels the cache and evaluate run, so predicted latency is of the measured model
    if batch_size < 1:
        raise MessError(f"--batch-size {batch_size}: must be >= 1")
    if threads is not None and threads < 1:
        raise MessError(f"--threads {threads}: allowed an integer >= 1 (torch CPU threads)")
    if not (isinstance(min_run_time, (int, float)) and math.isfinite(min_run_time) and min_run_time > 0):
        raise MessError(f"--min-run-time {min_run_time}: allowed a finite number of seconds > 0")
    threads = int(threads or torch.get_num_threads())
    net, space, _ = load_checkpoint(checkpoint)
    net = net.to(dev)
    size = tuple(space.input_size)
    x = torch.randn(batch_size, 3, *size, device=dev)
    # The input of every segment, every candidate feature and the final head's taps, computed once.
    inputs, taps = [], {}
    with torch.inference_mode():
        h = x
        for k in range(net.n_segments):
            inputs.append(h)
            h = net.segment(k, h, taps)
        feats = [inputs[k + 1] for k in range(len(net.positions))]

    def run(f, *args):
        def call():
            with torch.inference_mode():
                f(*args)
        return call

    pieces = [("segment", k, net.positions[k] if k < len(net.positions) else "<end>", "",
               run(net.segment, k, inputs[k], {})) for k in range(net.n_segments)]
    pieces += [("head", i, p, hname, run(net.heads[i], feats[net.positions.index(p)], size))
               for i, (p, hname) in enumerate(net.exits)]
    pieces.append(("final", 0, "", "", run(net.final, taps, size)))
    rows = []
    for kind, k, pos, hname, fn in tqdm(pieces, desc=f"profile {device}", disable=not progress, file=sys.stderr):
        ms, calls = _time(fn, min_run_time, threads)
        rows.append({"kind": kind, "index": k, "position": pos, "head": hname, "ms": ms, "calls": calls})
    df = pd.DataFrame(rows)
    meta = {"format": FORMAT, "device": str(device), "device_name": device_name(dev), "batch_size": str(batch_size),
            "torch_version": str(torch.__version__), "threads": str(threads), "input_size": json.dumps(list(size)),
            "positions": json.dumps(net.positions), "heads": json.dumps([h.name for h in space.heads]),
            "space_name": space.name, "model": space.model, "checkpoint_sha256": sha256_file(checkpoint),
            "min_run_time": str(min_run_time)}
    df.attrs.update(meta)
    if out is not None:
        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{k: v.encode() for k, v in meta.items()}})
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
    return df


def read_profile(path) -> tuple[dict, "object"]:
    """A profile's metadata (str -> str) and rows (DataFrame); a clear error if the file is not a profile."""

    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise MessError(f"{path}: profile not found") from None
    except Exception as e:
        raise MessError(f"{path}: not a readable Parquet profile ({type(e).__name__}: {e})") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    if meta.get("format") != FORMAT:
        raise MessError(f"{path}: not a messearch latency profile (expected format {FORMAT!r})")
    return meta, table.to_pandas()


def check_profile_fits(path, space) -> None:
    """MessError naming the file, field and both values unless the profile was measured for this space's model and
    input size at batch size 1 (the front's latencies are per image). Profiles without a model record pass that field."""
    meta, _ = read_profile(path)
    want = {"input_size": json.dumps(list(space.input_size)), "batch_size": "1", "model": space.model}
    for key, value in want.items():
        got = meta.get(key)
        if got is None and key == "model":
            continue
        if got != value:
            raise MessError(f"{path}: the profile's {key} is {got}, the cache's space needs {value} "
                            f"(profile again: messearch profile --checkpoint ... --batch-size 1)")


def load_profile(path) -> tuple[str, CostTable]:
    """The device name and latency CostTable (unit 'ms' per call at the profile's batch size) of a profile file."""
    meta, df = read_profile(path)
    fields = {}
    for key in ("positions", "heads", "device_name"):
        try:
            value = json.loads(meta[key]) if key != "device_name" else meta[key]
        except (KeyError, ValueError):
            value = None
        if not isinstance(value, list if key != "device_name" else str):
            raise MessError(f"{path}: metadata field {key!r} missing or malformed; allowed: what `messearch profile` "
                            f"writes (profile again)")
        fields[key] = value
    positions, heads, name = fields["positions"], fields["heads"], fields["device_name"]
    seg = df[df.kind == "segment"].sort_values("index")["ms"].to_numpy(np.float64)
    if len(seg) < len(positions) or (df.kind == "final").sum() != 1:
        raise MessError(f"{path}: incomplete profile (needs {len(positions)}+ segments and one final head)")
    head = np.full((len(positions), len(heads)), np.nan)
    for r in df[df.kind == "head"].itertuples():
        if r.position not in positions or r.head not in heads:
            raise MessError(f"{path}: a head row at ({r.position!r}, {r.head!r}), not among the profile's positions "
                            f"{positions} and heads {heads}; profile again (messearch profile)")
        head[positions.index(r.position), heads.index(r.head)] = r.ms
    if np.isnan(head).any():
        raise MessError(f"{path}: incomplete profile (some candidate heads were not timed)")
    cumulative = np.cumsum(seg)
    table = CostTable(positions=positions, heads=heads, backbone_to=cumulative[:len(positions)].copy(),
                      backbone_total=float(cumulative[-1]), head=head,
                      final=float(df[df.kind == "final"]["ms"].iloc[0]), unit="ms")
    return name, table


def format_profile(df) -> str:
    """A short table of a profile: per segment its own and cumulative ms, heads per position, the final head."""
    a = df.attrs
    lines = [f"device: {a.get('device_name')} ({a.get('device')}), batch {a.get('batch_size')}, "
             f"{a.get('threads')} threads, torch {a.get('torch_version')}"]
    seg = df[df.kind == "segment"]
    heads = df[df.kind == "head"]
    total = 0.0
    for r in seg.itertuples():
        total += r.ms
        hs = "  ".join(f"{h.head} {h.ms:.3f}" for h in heads[heads.position == r.position].itertuples())
        lines.append(f"  {r.position:<22} segment {r.ms:8.3f} ms  to here {total:8.3f} ms  heads: {hs}")
    fin = float(df[df.kind == "final"]["ms"].iloc[0])
    lines.append(f"  final head {fin:.3f} ms; original model (backbone + final) {total + fin:.3f} ms")
    return "\n".join(lines)
