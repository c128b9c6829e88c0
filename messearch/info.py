"""`messearch info`: what a space file holds — positions, heads, costs and the size of its search."""

from __future__ import annotations

import os

from . import search_size
from .costs import mac_table
from .model import feature_shapes
from .config import count_configs
from .errors import MessError
from .space import MIN_INPUT_SIZE, builtin_spaces, load_space


def space_info(path: str, input_size=None, n_images: int = 500, estimate: bool = True) -> dict:
    """A JSON-ready description of a space (a built-in name or a file): positions with channels and resolution,
    heads, GMACs, n_configs, and (estimate) the search time on this machine's cores for n_images cached images."""
    space = load_space(path)
    if input_size is not None and (len(input_size) != 2 or any(isinstance(v, bool) or not isinstance(v, int)
                                                                or v < MIN_INPUT_SIZE for v in input_size)):
        raise MessError(f"--input-size {' '.join(map(str, input_size))}: allowed two integers (height, width), each "
                        f">= {MIN_INPUT_SIZE}")
    size = tuple(input_size or space.input_size)
    table = mac_table(space, size)
    timing = search_size.space_estimates(space, table, n_images, os.cpu_count() or 1) if estimate else None
    shapes = feature_shapes(space.model, space.num_classes, size)
    positions = []
    for k, p in enumerate(space.positions):
        positions.append({"name": p, "channels": shapes[p][0], "resolution": list(shapes[p][1:]),
                          "segment_gmacs": table.segment(k) / 1e9,
                          "head_gmacs": {h: int(table.head[k, j]) / 1e9 for j, h in enumerate(space.head_names)}})
    n_thr = len(space.thresholds)
    return {
        "space": str(path), "name": space.name, "model": space.model, "num_classes": space.num_classes,
        "input_size": list(size),
        "positions": list(space.positions),
        "heads": space.head_names,
        "position_details": positions,
        "tail_gmacs": table.segment(len(space.positions)) / 1e9,
        "final_head_gmacs": table.final / 1e9,
        "backbone_gmacs": table.backbone_total / 1e9,
        "total_gmacs": table.reference / 1e9,
        "thresholds": list(space.thresholds),
        "max_exits": space.max_exits,
        "mode": space.mode,
        "policy": space.policy.kind,
        "n_configs": count_configs(len(space.positions), len(space.heads), n_thr, space.max_exits, "shared", space.mode),
        "n_configs_per_exit_thresholds": count_configs(len(space.positions), len(space.heads), n_thr,
                                                       space.max_exits, "per-exit", space.mode),
        "search_estimate": timing,
    }


def format_info(info: dict) -> str:
    """The info as a readable table."""
    lines = [f"space {info['space']}: {info['model']}, {info['num_classes']} classes, input "
             f"{info['input_size'][0]}x{info['input_size'][1]}, policy {info['policy']}, mode {info['mode']}",
             f"{'position':<24}{'ch':>6}{'res':>10}{'segment GMACs':>15}  head GMACs ({', '.join(info['heads'])})"]
    for p in info["position_details"]:
        res = f"{p['resolution'][0]}x{p['resolution'][1]}"
        heads = " ".join(f"{g:.4f}" for g in p["head_gmacs"].values())
        lines.append(f"{p['name']:<24}{p['channels']:>6}{res:>10}{p['segment_gmacs']:>15.4f}  {heads}")
    lines += [f"tail of the backbone: {info['tail_gmacs']:.4f} GMACs; final head: {info['final_head_gmacs']:.4f} GMACs",
              f"original model: {info['total_gmacs']:.4f} GMACs per image",
              f"configurations: {info['n_configs']:,} with a shared threshold, "
              f"{info['n_configs_per_exit_thresholds']:,} with per-exit thresholds "
              f"({len(info['positions'])} positions x {len(info['heads'])} heads, up to {info['max_exits']} exits, "
              f"{len(info['thresholds'])} thresholds)"]
    est = info.get("search_estimate")
    if est:
        lines.append(f"estimated search time on this machine ({est['shared']['cores']} cores, "
                     f"{est['n_images']} cached images; evaluator rate measured now): "
                     f"{search_size.human_seconds(est['shared']['seconds'])} shared, "
                     f"{search_size.human_seconds(est['per-exit']['seconds'])} per-exit "
                     f"({est['shared']['configs_per_cpu_s'] / 1e6:.2f}M and "
                     f"{est['per-exit']['configs_per_cpu_s'] / 1e6:.2f}M configurations per CPU-second)")
        if max(est["shared"]["seconds"], est["per-exit"]["seconds"]) > search_size.MAX_LOCAL_SECONDS:
            lines.append(f"a search over {search_size.human_seconds(search_size.MAX_LOCAL_SECONDS)} asks for --force "
                         "or --address of a Ray cluster")
    return "\n".join(lines)


def list_spaces() -> list[dict]:
    """The built-in spaces, each as {name, model, num_classes, input_size, n_configs, data}."""
    out = []
    for name in builtin_spaces():
        space = load_space(name)
        out.append({"name": name, "model": space.model, "num_classes": space.num_classes,
                    "input_size": list(space.input_size), "data": space.data,
                    "n_configs": count_configs(len(space.positions), len(space.heads), len(space.thresholds),
                                               space.max_exits, "shared", space.mode)})
    return out


def format_spaces(rows: list[dict]) -> str:
    """The built-in spaces as a table, with how to use them."""
    lines = [f"{'name':<30}{'model':<30}{'classes':>8}{'input':>11}{'configurations':>16}"]
    for r in rows:
        size = f"{r['input_size'][0]}x{r['input_size'][1]}"
        lines.append(f"{r['name']:<30}{r['model']:<30}{r['num_classes']:>8}{size:>11}{r['n_configs']:>16,}")
    lines.append(f"{len(rows)} built-in spaces; use a name wherever a space is taken (--space NAME, "
                 "`messearch info NAME`), or a path to your own YAML file")
    return "\n".join(lines)
