"""Where a pre-training step's time goes: torch.profiler over a few steps of one model, for docs/benchmarks.md.

    python benchmarks/profile_step.py --model mae_vit_micro_patch4_28 --batch-size 128 --precision fp32
    python benchmarks/profile_step.py --model mae_vit_base_patch16 --batch-size 16 --precision bf16 --steps 2
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/profile_step.py ...

The step is `mae.bench.step.build_ours`'s (what `mae bench` times: the engine's optimizer, autocast, loss scaler).
Prints the median step time, then the operators with the largest self time and their share of the step, grouped as
docs/benchmarks.md quotes them (matrix products, attention, GELU, copies, LayerNorm, optimizer).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mae.bench.step import build_ours
from mae.models import model_config

GROUPS = {  # a share of the step, by operator name
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention kernel (forward + backward)": ("aten::_scaled_dot_product",),
    "GELU (forward + backward)": ("aten::gelu",),
    "copies and casts": ("aten::copy_",),
    "LayerNorm (forward + backward)": ("aten::native_layer_norm",),
    "optimizer": ("aten::_fused_adamw", "aten::_foreach"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mae_vit_micro_patch4_28")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up and 5 timed ones)")
    ap.add_argument("--top", type=int, default=14)
    a = ap.parse_args()
    trainee = build_ours(model_config(a.model), a.batch_size, a.precision, torch.device("cpu"))
    for _ in range(3):
        trainee.step()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        trainee.step()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            trainee.step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{a.model}, batch {a.batch_size}, {a.precision}, {torch.get_num_threads()} threads, "
          f"ATen {torch.backends.cpu.get_cpu_capability()}: median step {statistics.median(times) * 1e3:.0f} ms")
    for e in events[:a.top]:
        print(f"  {e.key[:56]:56s} {100 * e.self_cpu_time_total / total:5.1f}%")
    print("grouped:")
    for group, prefixes in GROUPS.items():
        share = sum(e.self_cpu_time_total for e in events if e.key.startswith(prefixes)) / total
        print(f"  {group:40s} {100 * share:5.1f}%")


if __name__ == "__main__":
    main()
