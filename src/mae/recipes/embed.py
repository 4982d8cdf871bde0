"""Image embeddings from a pre-trained encoder: ``run(EmbedConfig) -> summary`` (``mae embed CHECKPOINT --data DIR
--out FILE``).

Every image of the folder (recursively, in sorted path order) or of a built-in dataset goes through the evaluation
transform and the encoder without masking (`MaskedAutoencoderViT.forward_features`), in eval mode and fp32 by
default, so the features are a pure function of the weights and the files. ``pool=cls`` keeps the class token,
``pool=mean`` averages the patch tokens (both after the encoder's final norm). The output holds the features
[N, D] and the image paths in the same order:

- ``FILE.safetensors``: tensor ``embeddings``; metadata ``paths`` (a JSON list), ``pool``, ``checkpoint``;
- ``FILE.npy``: the array, and ``FILE.paths.txt`` with one path per line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import ConcatDataset, DataLoader

from mae.data import BUILTIN_PREFIX, PlainFolderDataset, build_dataset, build_eval_transform
from mae.errors import ConfigError
from mae.files import atomic_write, atomic_write_path, check_new_file, write_text
from mae.interop.loading import load_pretrained_model
from mae.recipes.common import require_precision, resolve_device
from mae.train.metrics_log import progress
from mae.train.precision import autocast_context, resolve_precision

log = logging.getLogger("mae")

CLI_FLAGS = {"--checkpoint": "checkpoint", "--data": "data.path", "--out": "out", "--pool": "pool",
             "--batch-size": "batch_size", "--precision": "precision", "--device": "device"}
POOLS = ("cls", "mean")
SUFFIXES = (".safetensors", ".npy")
FORMAT = "mae-embeddings"


@dataclass
class EmbedData:
    """The images to embed."""

    path: str | None = field(default=None, metadata={
        "help": "a folder (every image below it, recursively, in sorted path order) or builtin:<name>"})
    split: str = field(default="all", metadata={
        "help": "builtin datasets: train | val | all (train then val); folders are read whole"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    mean: list[float] | None = field(default=None, metadata={"help": "normalisation mean (default: ImageNet / 0.5)"})
    std: list[float] | None = None
    crop_pct: float | None = field(default=None, metadata={
        "help": "resize to img_size / crop_pct, centre crop (default 0.875; 1.0 for images <= 32 px)"})

    RANGES: ClassVar[dict[str, str]] = {"mean": "any", "std": "> 0", "crop_pct": "(0, 1]"}

    def validate(self) -> None:
        if self.split not in ("all", "train", "val"):
            raise ConfigError(f"data.split must be all, train or val, got '{self.split}'")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class EmbedConfig:
    """Which encoder, which images, where the features go."""

    checkpoint: str | None = field(default=None, metadata={
        "help": "a pre-training run directory, any MAE checkpoint the library reads (mae, reference, HF, timm) or "
                "released weights by name (official:mae_visualize_vit_base, hf:<org/repo>, timm:<tag>)"})
    data: EmbedData = field(default_factory=EmbedData)
    out: str = field(default="embeddings.safetensors", metadata={"help": "output file: .safetensors or .npy"})
    pool: str = field(default="cls", metadata={"help": "cls (class token) | mean (mean of the patch tokens)"})
    batch_size: int = field(default=64, metadata={"help": "images per forward pass"})
    precision: str = field(default="fp32", metadata={"help": "fp32 (deterministic) | auto | bf16 | fp16"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an existing output file (and, for .npy, its .paths.txt); without it an existing one is "
                "refused"})

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("mae embed needs a checkpoint: `mae embed CHECKPOINT --data DIR --out FILE` (a run "
                              "directory or a checkpoint file)")
        if not self.data.path:
            raise ConfigError("mae embed needs images: pass --data DIR (a folder of images) or --data builtin:<name>")
        if self.pool not in POOLS:
            raise ConfigError(f"pool '{self.pool}' is not one of {', '.join(POOLS)}")
        if Path(self.out).suffix not in SUFFIXES:
            raise ConfigError(f"out '{self.out}' must end in {' or '.join(SUFFIXES)} (the file format)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        require_precision(self.precision)


# ---------------------------------------------------------------------------------------------------- the encoder
def pooled_features(model, images: torch.Tensor, pool: str) -> torch.Tensor:
    """[N, D]: the class token (``cls``) or the mean of the patch tokens (``mean``) of ``forward_features``."""
    tokens = model.forward_features(images)  # [N, 1+L, D]
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


# ---------------------------------------------------------------------------------------------------- the images
def image_dataset(data: EmbedData, img_size: int, in_chans: int) -> tuple[Any, list[str]]:
    """The dataset to embed (items ``(image tensor, label)``) and one path (or builtin id) per item, in order."""
    transform = build_eval_transform(img_size, in_chans, data.crop_pct, data.mean, data.std)
    mode = "L" if in_chans == 1 else "RGB"
    if data.path.startswith(BUILTIN_PREFIX):  # type: ignore[union-attr]  # validate() requires data.path
        splits = ["train", "val"] if data.split == "all" else [data.split]
        parts = [build_dataset(data.path, s, transform=transform, mode=mode) for s in splits]  # type: ignore[arg-type]  # as above
        ids = [f"{data.path}/{s}/{i}" for s, part in zip(splits, parts, strict=True) for i in range(len(part))]  # type: ignore[arg-type]  # torch types no Dataset.__len__
        return (parts[0] if len(parts) == 1 else ConcatDataset(parts)), ids
    if data.split != "all":
        raise ConfigError(f"data.split={data.split} applies to builtin datasets; for a folder, pass the sub-folder "
                          f"itself (--data {Path(data.path) / data.split})")  # type: ignore[arg-type]  # as above
    # strict: a skipped file would shift every later feature onto the wrong path
    dataset = PlainFolderDataset(data.path, transform=transform, mode=mode, strict=True)  # type: ignore[arg-type]  # as above
    return dataset, [path for path, _ in dataset.samples]


# ---------------------------------------------------------------------------------------------------- writing
def save_embeddings(features: torch.Tensor, paths: list[str], out: str | Path, **info: str) -> Path:
    """Write [N, D] features with their paths (see the module docstring for the two formats)."""
    out = Path(out)
    if len(paths) != len(features):
        raise ConfigError(f"{len(features)} features for {len(paths)} paths")
    features = features.detach().float().cpu().contiguous()
    if out.suffix == ".safetensors":
        metadata = {"format": FORMAT, "paths": json.dumps(paths), **{k: str(v) for k, v in info.items()}}
        return atomic_write_path(out, lambda tmp: save_file({"embeddings": features}, str(tmp), metadata=metadata))
    if out.suffix == ".npy":
        atomic_write(out, lambda f: np.save(f, features.numpy()))
        write_text(paths_file(out), "".join(p + "\n" for p in paths))
        return out
    raise ConfigError(f"out '{out}' must end in {' or '.join(SUFFIXES)}")


def paths_file(npy: str | Path) -> Path:
    """``FILE.paths.txt``, the image paths next to ``FILE.npy``."""
    npy = Path(npy)
    return npy.with_name(npy.stem + ".paths.txt")


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """(features [N, D], paths) of a file written by `save_embeddings`."""
    path = Path(path)
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path)), paths_file(path).read_text().splitlines()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.get_tensor("embeddings"), json.loads((f.metadata() or {})["paths"])


# ---------------------------------------------------------------------------------------------------- the recipe
@torch.no_grad()
def run(cfg: EmbedConfig) -> dict[str, Any]:
    """Embed every image; returns a summary (output file, image count, feature width)."""
    check_new_file(cfg.out, cfg.overwrite)
    if Path(cfg.out).suffix == ".npy":
        check_new_file(paths_file(cfg.out), cfg.overwrite)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model = load_pretrained_model(cfg.checkpoint).to(device)  # type: ignore[arg-type]  # validate() requires a checkpoint
    h, w = model.config.image_hw
    if h != w:
        raise ConfigError(f"the evaluation transform makes square images; this model's img_size is {h}x{w}")
    dataset, paths = image_dataset(cfg.data, h, model.in_chans)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda")
    log.info("embedding %d images from '%s' with %s (pool=%s, %s on %s)", len(paths), cfg.data.path,
             cfg.checkpoint, cfg.pool, precision, device)
    chunks = []
    for images, _ in progress(loader, total=len(loader), desc="embed", enabled=cfg.progress):
        with autocast_context(precision, device):
            chunks.append(pooled_features(model, images.to(device, non_blocking=True), cfg.pool).float().cpu())
    features = torch.cat(chunks)  # [N, D]
    out = save_embeddings(features, paths, cfg.out, pool=cfg.pool, checkpoint=str(cfg.checkpoint),
                          precision=precision)
    return {"out": str(out), "images": len(paths), "dim": int(features.shape[1]), "pool": cfg.pool}
