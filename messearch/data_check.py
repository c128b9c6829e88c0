"""`messearch check-data SPEC`: validate any data spec file by file and summarise it (images per split,
class pixel shares, every problem found), so that a data set is known good before training starts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .data import build_dataset, parse_spec
from .dataset import IGNORE
from .errors import DataError

SYNTHETIC_SIZE = (128, 128)  # synthetic scenes are rendered at the input size; this one for the summary


@dataclass
class DataReport:
    """What check_data found: per split the image count and labelled pixels per class (void last)."""

    spec: str
    class_names: list[str] = field(default_factory=list)
    images: dict[str, int | None] = field(default_factory=dict)  # None: the split could not be read
    pixels: dict[str, list[int]] = field(default_factory=dict)  # per class, then void
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


def default_splits(spec: str) -> list[str]:
    """train and val (what training and the cache read), plus test where a folder data set has one."""
    kind, arg = parse_spec(spec)
    return ["train", "val"] + (["test"] if kind == "folder" and (arg / "test").is_dir() else [])


def check_data(spec: str, splits: list[str] | None = None, num_classes: int | None = None,
               progress: bool = False) -> DataReport:
    """Decode every image and mask of each split; collect every problem (one per bad file) instead of stopping.

    A bad spec raises DataError; everything else lands in the report's `problems`."""
    from tqdm import tqdm

    report = DataReport(spec)
    for split in splits or default_splits(spec):
        try:
            ds = build_dataset(spec, split, SYNTHETIC_SIZE, num_classes=num_classes)
        except DataError as e:
            report.images[split] = None
            report.problems.append(f"{split}: {e}")
            continue
        report.class_names = list(ds.class_names)
        report.images[split] = len(ds)
        counts = np.zeros(256, dtype=np.int64)
        for i in tqdm(range(len(ds)), desc=f"check {split}", unit="img", disable=not progress, leave=False):
            try:
                _, mask = ds.load(i)  # native size, every file decoded, values or colours mapped and checked
            except DataError as e:
                report.problems.append(f"{split}: {e}")
                continue
            counts += np.bincount(mask.ravel(), minlength=256)
        n = ds.num_classes
        report.pixels[split] = counts[:n].tolist() + [int(counts[IGNORE])]
    return report


def format_report(r: DataReport, max_problems: int = 20) -> str:
    """Images per split, each class's share of the labelled pixels per split, void share, and the problems."""
    splits = [s for s in r.images if r.images[s] is not None]
    lines = [f"data {r.spec}: {len(r.class_names)} classes",
             "images: " + ", ".join(f"{s} {'unreadable' if n is None else n}" for s, n in r.images.items())]
    if splits:
        width = max([len(n) for n in r.class_names] + [len("void (of all)")])
        lines.append("class pixel shares (% of labelled pixels):")
        lines.append("  " + "class".ljust(width) + "".join(f"{s:>9}" for s in splits))
        labelled = {s: max(1, sum(r.pixels[s][:-1])) for s in splits}
        for c, name in enumerate(r.class_names):
            lines.append("  " + name.ljust(width) + "".join(
                f"{100 * r.pixels[s][c] / labelled[s]:>9.2f}" for s in splits))
        lines.append("  " + "void (of all)".ljust(width) + "".join(
            f"{100 * r.pixels[s][-1] / max(1, sum(r.pixels[s])):>9.2f}" for s in splits))
        absent = [name for c, name in enumerate(r.class_names) if not any(r.pixels[s][c] for s in splits)]
        if absent:
            lines.append(f"  never labelled: {', '.join(absent)}")
    lines.append(f"problems: {len(r.problems) or 'none'}")
    lines += [f"  {p}" for p in r.problems[:max_problems]]
    if len(r.problems) > max_problems:
        lines.append(f"  ... and {len(r.problems) - max_problems} more")
    return "\n".join(lines)
