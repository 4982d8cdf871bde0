"""The memory planner against the measured peak with glibc's default heap and with freed tensors returned at once
(docs/benchmarks.md, "The memory planner against measurement"): ViT-Tiny/16, batch 8, fp32, one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_allocator.py default   # glibc's growing mmap threshold
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_allocator.py fixed     # as mae bench --suite memory does
"""

from __future__ import annotations

import sys

import torch

from mae.bench import memory
from mae.models import model_config


def main(mode: str) -> None:
    if mode not in ("default", "fixed"):
        raise SystemExit("usage: memory_allocator.py default|fixed")
    if mode == "default":  # measure without fixing the threshold: what a plain process's resident peak shows
        memory._return_freed_memory_at_once = lambda device: None
    torch.set_num_threads(1)
    config = model_config("mae_vit_tiny_patch16")
    for ckpt in (False, True):
        measured = memory.measure_memory(config, strategy="ddp", batch_size=8, precision="fp32",
                                         device=torch.device("cpu"), grad_checkpointing=ckpt)
        plan = memory.plan_memory(config, strategy="ddp", world_size=1, batch_size=8, precision="fp32",
                                  grad_checkpointing=ckpt)
        print(f"glibc {mode}: grad_checkpointing={ckpt}: measured {measured['peak_bytes'] / 2**20:.0f} MiB, planned "
              f"{plan.peak / 2**20:.0f} MiB, plan / measured {plan.peak / measured['peak_bytes']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fixed")
