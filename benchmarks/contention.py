"""The demo's pre-training epoch alone and next to one busy process, with OpenMP's defaults, other fixed settings and
the CLI's thread policy (mae.threads: OMP_WAIT_POLICY=PASSIVE when other processes are busy as the command starts,
OMP_NUM_THREADS from the usable CPUs), for docs/benchmarks.md.

    python benchmarks/contention.py [--epochs 2] [--repeats 2]

Each run is a fresh process pre-training the demo config (`pretrain/demo_mnist`) for `--epochs` epochs; the table
shows the median epoch time of the last epoch (the first pays for start-up). "library default" runs the recipe from
Python without the CLI's policy (OpenMP's own defaults); "CLI policy" through `mae.cli.main`. The busy neighbour is
one process spinning on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _subprocess import run_quiet

PY = sys.executable
CODE_LIBRARY = ("import sys; from mae.config import load_config; from mae.recipes.pretrain import PretrainConfig, run; "
                "run(load_config(PretrainConfig, 'pretrain/demo_mnist', sys.argv[1:]))")
CODE_CLI = ("import sys; from mae.cli import main; "
            "sys.exit(main(['pretrain', '--config', 'pretrain/demo_mnist', *sys.argv[1:]]))")


def epoch_seconds(code: str, env: dict[str, str], epochs: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        args = [f"epochs={epochs}", f"output_dir={d}/run", "progress=false", "visualize=false", "save_every_minutes=0",
                f"save_every={epochs}", f"optim.warmup_epochs={min(2, epochs)}"]
        run_quiet([PY, "-c", code, *args], env=env)
        rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
        return [r["epoch_seconds"] for r in rows if "epoch_seconds" in r][-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    settings = [("OpenMP's defaults (the library called from Python)", CODE_LIBRARY, {}),
                ("always OMP_WAIT_POLICY=PASSIVE", CODE_LIBRARY, {"OMP_WAIT_POLICY": "PASSIVE"}),
                ("OMP_NUM_THREADS=1", CODE_LIBRARY, {"OMP_NUM_THREADS": "1"}),
                ("the CLI's policy (mae.threads: PASSIVE only when others are busy)", CODE_CLI, {})]
    results: dict[tuple[str, bool], list[float]] = {}
    for _ in range(a.repeats):
        for busy in (False, True):
            spinner = subprocess.Popen([PY, "-c", "while True: pass"]) if busy else None
            try:
                time.sleep(1 if busy else 0)
                for name, code, extra in settings:
                    results.setdefault((name, busy), []).append(epoch_seconds(code, {**base, **extra}, a.epochs))
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; demo pre-training epoch "
          f"(s), median of {a.repeats}")
    print("| threads | alone | next to one busy process | slowdown |")
    print("|---|---|---|---|")
    for name, _, _ in settings:
        alone, busy = statistics.median(results[(name, False)]), statistics.median(results[(name, True)])
        print(f"| {name} | {alone:.1f} | {busy:.1f} | {busy / alone:.2f}x |")


if __name__ == "__main__":
    main()
