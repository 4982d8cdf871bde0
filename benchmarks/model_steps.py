"""Forward FLOPs and training-step time of candidate demo models, side by side in one process, for the table in
docs/benchmarks.md ("The demo's recipe: a smaller encoder, not fewer epochs").

    python benchmarks/model_steps.py [--batch-size 128] [--steps 10] [--repeats 2]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/model_steps.py

Each row is `mae_vit_micro_patch4_28` with the row's field overrides (`mae_vit_nano_patch4_28` is the 4-block,
MLP-2x row). The step is `mae.bench.step.build_ours`'s (what `mae bench` times: the engine's optimizer and
precision handling), fp32; each repeat times every row once (median of `--steps` steps after 3 warm-up steps), so
slow drift of the machine touches all rows alike. FLOPs are `mae.bench.flops.mae_flops` at the 75% mask ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mae.bench.flops import mae_flops
from mae.bench.step import build_ours
from mae.models import model_config

ROWS = {
    "micro: 6 blocks, MLP 4x": {},
    "MLP 2x (6 blocks)": {"mlp_ratio": 2.0},
    "4 blocks (MLP 4x)": {"depth": 4},
    "4 blocks, MLP 2x (= nano)": {"depth": 4, "mlp_ratio": 2.0},
}


def step_ms(overrides: dict, batch_size: int, steps: int) -> float:
    trainee = build_ours(model_config("mae_vit_micro_patch4_28", **overrides), batch_size, "fp32",
                         torch.device("cpu"))
    for _ in range(3):
        trainee.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainee.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    for _ in range(a.repeats):
        for name, overrides in ROWS.items():
            times[name].append(step_ms(overrides, a.batch_size, a.steps))
    base = min(times["micro: 6 blocks, MLP 4x"])
    print(f"{torch.get_num_threads()} threads, ATen {torch.backends.cpu.get_cpu_capability()}, batch {a.batch_size}, "
          f"fp32; step: median of {a.steps}, each of {a.repeats} repeats")
    print("| model | forward GFLOPs per image | step (ms), each repeat | micro's step / this one |")
    print("|---|---|---|---|")
    for name, overrides in ROWS.items():
        gflops = mae_flops(model_config("mae_vit_micro_patch4_28", **overrides)).forward / 1e9
        shown = " / ".join(f"{t:.0f}" for t in times[name])
        print(f"| {name} | {gflops:.3f} | {shown} | {base / min(times[name]):.2f}x |")


if __name__ == "__main__":
    main()
