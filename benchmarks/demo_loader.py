"""The demo's input pipeline, step by step: one epoch of `pretrain/demo_mnist`'s loader (4,000 digits, batch 128,
in the main process as the demo reads them), and the per-digit costs behind it, for docs/benchmarks.md ("The data
path").

    python benchmarks/demo_loader.py [--repeats 3]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/demo_loader.py

Rows of the epoch table, each adding one change to the one above:
- per-sample state, v2 modules: the generators saved and restored around every digit and the digit finished by
  torchvision's four v2 modules (RGB / Grayscale, ToImage, ToDtype, Normalize), as the loader did before issue 17;
- + batched state: `SeededDataset.__getitems__` (saved and restored once per batch);
- + one-step finish: `ToNormalizedTensor` (what the library does now on a first epoch);
- + memoized: a later epoch over `MemoizedDataset` (what the demo does from its second epoch on).
Each epoch is the sampler's batches fetched and collated as the DataLoader does with no workers; the median of
`--repeats` epochs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2

from mae.data import (
    EpochSampler,
    MemoizedDataset,
    SeededDataset,
    SeededSampler,
    WithMaskNoise,
    build_dataset,
    build_transform,
    default_mean_std,
)
from mae.data.sampling import _seed_generators  # the per-sample seeding SeededDataset does, timed on its own

BATCH, NUM_PATCHES = 128, 49


class PerSampleState(SeededDataset):
    """The loader before issue 17: the caller's generators saved and restored around every sample."""

    def __getitems__(self, keys):
        return [self._one(key) for key in keys]

    def _one(self, key):
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            _seed_generators(key[1])
            return self.dataset[key[0]]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def four_modules() -> v2.Compose:
    """`build_transform('none', 28, 1)` with the four v2 modules it finished digits with before issue 17."""
    mean, std = default_mean_std(1)
    geometry = build_transform("none", 28, 1).transforms[:-1]
    return v2.Compose([*geometry, v2.Grayscale(num_output_channels=1), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def epoch_seconds(seeded: SeededDataset, repeats: int, warm: bool = False) -> float:
    sampler = SeededSampler(EpochSampler(len(seeded), shuffle=True, seed=0), seed=0)
    if warm:  # fill a memo first: the time of a later epoch
        _one_epoch(seeded, sampler)
    times = []
    for epoch in range(repeats):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        _one_epoch(seeded, sampler)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _one_epoch(seeded: SeededDataset, sampler: SeededSampler) -> None:
    keys = list(sampler)
    for i in range(0, len(keys) - BATCH + 1, BATCH):  # drop_last, as the pre-training loader
        default_collate(seeded.__getitems__(keys[i:i + BATCH]))


def per_call_us(fn, n: int = 3000) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return 1e6 * (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    def digits(transform) -> WithMaskNoise:
        return WithMaskNoise(build_dataset("builtin:mnist5k", "train", transform=transform, mode="L"), NUM_PATCHES)

    old, new = four_modules(), build_transform("none", 28, 1)
    rows = [
        ("per-sample state, v2 modules (before)", epoch_seconds(PerSampleState(digits(old)), a.repeats)),
        ("+ batched state", epoch_seconds(SeededDataset(digits(old)), a.repeats)),
        ("+ one-step finish (a first epoch now)", epoch_seconds(SeededDataset(digits(new)), a.repeats)),
        ("+ memoized (later epochs now)", epoch_seconds(SeededDataset(WithMaskNoise(MemoizedDataset(
            build_dataset("builtin:mnist5k", "train", transform=new, mode="L")), NUM_PATCHES)), a.repeats, warm=True)),
    ]
    print(f"{torch.get_num_threads()} threads, ATen {torch.backends.cpu.get_cpu_capability()}; one epoch of "
          f"pretrain/demo_mnist's loader (4,000 digits, batch {BATCH}), median of {a.repeats}")
    print("| loader | seconds per epoch |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")

    image = build_dataset("builtin:mnist5k", "train", mode="L")[0][0]
    old_finish, new_finish = v2.Compose(old.transforms[2:]), new.transforms[-1]

    def generators(_i):
        torch.set_rng_state(torch.get_rng_state())
        random.setstate(random.getstate())
        np.random.set_state(np.random.get_state())

    costs = [
        ("finish a digit: the four v2 modules", per_call_us(lambda _i: old_finish(image))),
        ("finish a digit: ToNormalizedTensor", per_call_us(lambda _i: new_finish(image))),
        ("save + restore the three global generators", per_call_us(generators)),
        ("save + restore numpy's alone", per_call_us(lambda _i: np.random.set_state(np.random.get_state()))),
    ]
    print("\n| per digit | microseconds |")
    print("|---|---|")
    for name, us in costs:
        print(f"| {name} | {us:.0f} |")


if __name__ == "__main__":
    main()
