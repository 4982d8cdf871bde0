"""Images per second read from tar shards (``shards:DIR``) vs the same images in a folder, alternated in one process.

Both sides are the pre-training loaders of the library on the same JPEGs (random crops of the embedded photos,
~500 px long side, quality 90, as ``mae bench --suite data`` makes them): JPEG decode with torchvision.io, the
paper's RandomResizedCrop(224) + flip + normalise, per-sample masking noise, the same batch size and workers.
Folder: ``build_dataset`` + ``WithMaskNoise`` + ``build_loader``; shards: ``mae prepare`` output read by
``build_shard_loader``. Each round times one whole epoch of each loader (the order of the two alternates per round)
after one untimed warm-up epoch each; the table gives the median round. Files are in the page cache on both sides,
so this measures the reading code, not the disk.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/shards_vs_folder.py --images 384 --rounds 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from mae.bench.pipeline import make_jpeg_folder
from mae.data import WithMaskNoise, build_dataset, build_loader, build_shard_loader, build_transform, set_epoch
from mae.data.shard_writer import write_shards


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown CPU")


def _epoch_rate(loader, epoch: int) -> float:
    set_epoch(loader, epoch)
    start, images = time.perf_counter(), 0
    for batch_images, _ in loader:
        images += batch_images.shape[0]
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shard-size", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpeg_folder(Path(tmp) / "folder", num_images=args.images)
        write_shards(folder, Path(tmp) / "shards", shard_size=args.shard_size, progress=False)
        transform = build_transform("rrc", 224, 3)
        num_patches = (224 // 16) ** 2
        rows = []
        for workers in args.workers:
            folder_loader = build_loader(WithMaskNoise(build_dataset(str(folder), transform=transform, decode="tensor"),
                                                       num_patches),
                                         args.batch_size, num_workers=workers, seed=0, drop_last=True)
            shard_loader = build_shard_loader(f"shards:{Path(tmp) / 'shards'}", transform=transform,
                                              batch_size=args.batch_size, seed=0, num_workers=workers,
                                              num_patches=num_patches, decode="tensor")
            loaders = {"folder": folder_loader, "shards": shard_loader}
            rates: dict[str, list[float]] = {name: [] for name in loaders}
            for loader in loaders.values():  # warm-up: worker start-up, first reads
                _epoch_rate(loader, 0)
            for round_ in range(args.rounds):
                names = list(loaders) if round_ % 2 == 0 else list(reversed(loaders))
                for name in names:
                    rates[name].append(_epoch_rate(loaders[name], round_ + 1))
            folder_rate, shard_rate = (statistics.median(rates[n]) for n in ("folder", "shards"))
            rows.append((workers, folder_rate, shard_rate, len(shard_loader) * args.batch_size))
            del loaders, folder_loader, shard_loader

    print(f"{_cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{datetime.datetime.now().astimezone().date().isoformat()}, load average {os.getloadavg()[0]:.2f}")
    print(f"{args.images} JPEGs (~500 px), batch {args.batch_size}, {args.rounds} alternated rounds, median\n")
    print("| workers | folder img/s | shards img/s | shards / folder |")
    print("|---|---|---|---|")
    for workers, folder_rate, shard_rate, _ in rows:
        print(f"| {workers} | {folder_rate:.0f} | {shard_rate:.0f} | {shard_rate / folder_rate:.2f}x |")


if __name__ == "__main__":
    main()
