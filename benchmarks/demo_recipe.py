"""The sweep behind the demo's pre-training recipe (`pretrain/demo_mnist`): how few epochs, at which lr and batch,
still give features whose linear probe clears the raw-pixel baseline, for docs/benchmarks.md.

    python benchmarks/demo_recipe.py [--out benchmarks/results/cpu/demo_recipe] [--precision fp32]
        [--config pretrain/demo_mnist] [NAME=OVERRIDES ...]

Each setting is one pre-training run of the config (the demo's by default; rounds 1-4 of results/cpu/demo_recipe ran
on what is now `pretrain/micro_mnist`) with its overrides, then the demo's linear probe
(`linprobe/linprobe_mnist`) on its weights, both through the real CLI in fresh processes; the table has the probe's
top-1, the first and last epoch loss and the pre-training time. Without settings it runs the grid below. The raw-pixel
floor (a linear classifier on the pixels, 89.9 with the probe's recipe) does not depend on the pre-training.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from _subprocess import run_quiet

MAE = [sys.executable, "-m", "mae"]
GRID = {
    "20 ep": "epochs=20",
    "20 ep, lr x2": "epochs=20 optim.base_lr=6e-3",
    "16 ep": "epochs=16",
    "16 ep, lr x2": "epochs=16 optim.base_lr=6e-3",
    "16 ep, batch 64": "epochs=16 batch_size=64",
    "16 ep, batch 64, lr x2": "epochs=16 batch_size=64 optim.base_lr=6e-3",
    "12 ep, batch 64, lr x2": "epochs=12 batch_size=64 optim.base_lr=6e-3",
    "40 ep (the config as it is)": "epochs=40",
}


def one(config: str, overrides: list[str], precision: str, workdir: Path) -> dict:
    run = workdir / "run"
    t0 = time.perf_counter()
    run_quiet([*MAE, "pretrain", "--config", config, f"output_dir={run}", "progress=false",
               "visualize=false", f"precision={precision}", *overrides])
    seconds = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["epoch_loss"] for r in rows if "epoch_seconds" in r]
    run_quiet([*MAE, "linprobe", "--config", "linprobe/linprobe_mnist", f"checkpoint={run}",
               f"output_dir={workdir / 'probe'}", "progress=false"])
    probe = json.loads((workdir / "probe" / "summary.json").read_text())
    top1 = probe.get("best_top1", probe.get("top1"))
    return {"linprobe_top1": top1, "first_loss": losses[0], "last_loss": losses[-1], "pretrain_seconds": seconds,
            "epoch_seconds": [r["epoch_seconds"] for r in rows if "epoch_seconds" in r][-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/cpu/demo_recipe")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--config", default="pretrain/demo_mnist", help="the pre-training preset the settings change")
    ap.add_argument("settings", nargs="*", help="NAME=OVERRIDES (space-separated overrides after the first '=')")
    a = ap.parse_args()
    grid = dict(s.split("=", 1) for s in a.settings) if a.settings else GRID
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
               "command": " ".join(["python", *sys.argv]), "precision": a.precision, "config": a.config}
    results = {}
    for name, overrides in grid.items():  # the files are rewritten after every setting: an interrupted sweep keeps
        with tempfile.TemporaryDirectory() as d:  # what it measured
            results[name] = {"overrides": overrides, **one(a.config, overrides.split(), a.precision, Path(d))}
        r = results[name]
        print(f"{name}: probe {r['linprobe_top1']:.1f}, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, "
              f"pre-training {r['pretrain_seconds']:.0f} s", flush=True)
        (out / "results.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
        lines = ["| setting | overrides | linear probe top-1 | loss first -> last | pre-training s |",
                 "|---|---|---|---|---|"]
        lines += [f"| {n} | `{r['overrides']}` | {r['linprobe_top1']:.1f} | {r['first_loss']:.3f} -> "
                  f"{r['last_loss']:.3f} | {r['pretrain_seconds']:.0f} |" for n, r in results.items()]
        (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
