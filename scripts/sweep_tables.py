"""Markdown tables of a `mae sweep` results.csv next to the paper's numbers (Table 1 and Figures 5, 7, 9; ViT-L,
800 epochs, ImageNet), for docs/results.md.

    python scripts/sweep_tables.py runs/sweep/results.csv
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict

# (grid, row label) -> paper (fine-tune, linear probe) top-1; None where the paper has no such row
PAPER: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("mask_ratio", "75%"): (84.9, 73.5),
    ("mask_token", "encoder w/o mask token"): (84.9, 73.5),
    ("mask_token", "encoder w/ mask token"): (84.2, 59.6),
    ("target", "pixel (w/o norm)"): (84.9, 73.5),
    ("target", "pixel (w/ norm)"): (85.4, 73.9),
    ("target", "PCA"): (84.6, 72.3),
    ("augmentation", "none"): (84.0, 65.7),
    ("augmentation", "crop, fixed size"): (84.7, 73.1),
    ("augmentation", "crop, rand size"): (84.9, 73.5),
    ("augmentation", "crop + color jit"): (84.3, 71.9),
    ("mask_sampling", "random 75%"): (84.9, 73.5),
    ("mask_sampling", "block 50%"): (83.9, 72.3),
    ("mask_sampling", "block 75%"): (82.8, 63.9),
    ("mask_sampling", "grid 75%"): (84.0, 66.0),
    ("decoder_depth", "1"): (84.8, 65.5),
    ("decoder_depth", "2"): (84.9, 70.0),
    ("decoder_depth", "4"): (84.9, 71.9),
    ("decoder_depth", "8"): (84.9, 73.5),
    # decoder width, matched by its ratio to the encoder width (ours 128, ViT-L 1024): 1/4, 1/2, 1x; the paper has
    # no 2x row
    ("decoder_width", "32"): (84.8, 71.3),
    ("decoder_width", "64"): (84.9, 73.5),
    ("decoder_width", "128"): (84.3, 73.1),
}
PARTIAL_PAPER = {"0": 73.5, "mlp": 79.1, "1": 81.0}  # Figure 9, ViT-L


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _mean(rows: list[dict], column: str) -> float | None:
    values = [float(r[column]) for r in rows if r.get(column)]
    return statistics.mean(values) if values else None


def _seeds(rows: list[dict], column: str) -> str:
    """The seed mean, and each seed's value in brackets when there is more than one."""
    values = [float(r[column]) for r in rows if r.get(column)]
    if len(values) < 2:
        return _fmt(_mean(rows, column))
    return f"{_fmt(statistics.mean(values))} ({', '.join(_fmt(v) for v in values)})"


def main(path: str) -> None:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if not r.get("error")]
    by_grid: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_grid[r["grid"]][r["row"]].append(r)
    for grid, entries in by_grid.items():
        first = next(iter(entries.values()))[0]
        print(f"#### {first['axis']}\n")
        group_rows = [r for group in entries.values() for r in group]
        partial = [c for c in first if c.startswith("partial_") and c.endswith("_top1")
                   and any(r.get(c) for r in group_rows)]
        if partial:
            print("| fine-tuned blocks | ours top-1 | paper (ViT-L) |\n|---|---|---|")
            for column in partial:
                k = column.removeprefix("partial_").removesuffix("_top1")
                print(f"| {k} | {_seeds(next(iter(entries.values())), column)} | {_fmt(PARTIAL_PAPER.get(k))} |")
            print()
            continue
        print("| setting | seeds | loss | s / epoch | ours: fine-tune | ours: linear | paper: fine-tune | paper: linear |")
        print("|---|---|---|---|---|---|---|---|")
        for label, group in entries.items():
            ft, lin = PAPER.get((grid, label), (None, None))
            print(f"| {label} | {len(group)} | {_mean(group, 'pretrain_loss'):.3f} | "
                  f"{_fmt(_mean(group, 'seconds_per_epoch'))} | {_seeds(group, 'finetune_top1')} | "
                  f"{_seeds(group, 'linprobe_top1')} | {_fmt(ft)} | {_fmt(lin)} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/sweep/results.csv")
