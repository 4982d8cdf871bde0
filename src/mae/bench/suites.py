"""The benchmark suites behind ``mae bench``: each takes a `BenchContext` and returns a JSON-ready dict with a
``rows`` list (one row per measurement) and, where it makes sense, ratios.

- ``step``: one model config (name + overrides), batch, precision, device: images/s, memory, FLOPs, MFU.
- ``table2``: paper Table 2, encoder with mask tokens vs the MAE encoder, decoder depth 8 vs 1 (speed-ups).
- ``table1c``: paper Table 1c, FLOPs of the encoder-with-mask-tokens variant over the MAE's (analytic, instant).
- ``peer``: this library vs Hugging Face ``ViTMAEForPreTraining``, same architecture and weights, in one process.
- ``scaling``: images/s and peak memory against batch size, mask ratio and model size (with / without
  activation checkpointing).
- ``data``: the JPEG input pipeline alone, per decoder and worker count.
- ``memory``: the planned memory per GPU of pre-training (ddp / fsdp, world size, batch, precision, checkpointing)
  and, optionally, this machine's measured peak against the plan (`mae.bench.memory`).
"""

from __future__ import annotations

import gc
import logging
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mae.bench import measure
from mae.bench.flops import counted_flops, mae_flops, table1c_ratio
from mae.bench.pipeline import make_jpeg_folder, pipeline_throughput
from mae.bench.step import (
    Trainee,
    build_hf,
    build_ours,
    build_reference,
    hf_from_ours,
    time_alternating,
    timed_step,
    warm_up,
)
from mae.errors import ConfigError
from mae.models import model_config
from mae.models.mae import MAEConfig, MaskedAutoencoderViT

log = logging.getLogger("mae")

SUITES = ("step", "table2", "table1c", "peer", "scaling", "data", "memory")  # memory: mae.bench.memory
PAPER_TABLE2 = {"large": {8: 2.8, 1: 3.7}, "huge": {8: 3.5, 1: 4.1}}  # speed-up vs encoder with mask tokens
_ENCODER_NAMES = {"tiny": "mae_vit_tiny_patch16", "small": "mae_vit_small_patch16", "base": "mae_vit_base_patch16",
                  "large": "mae_vit_large_patch16", "huge": "mae_vit_huge_patch14"}
_PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchContext:
    """Settings every suite shares, plus the measured matmul peaks (filled lazily, one per precision)."""

    device: torch.device
    warmup: int = 2
    steps: int = 5
    seed: int = 0
    peak_size: int | None = None
    peaks: dict[str, dict] = field(default_factory=dict)

    def peak(self, precision: str) -> dict:
        if precision not in self.peaks:
            self.peaks[precision] = measure.matmul_peak(self.device, _PEAK_DTYPES[precision], self.peak_size)
        return self.peaks[precision]

    def remeasure_peaks(self) -> None:
        """Measure every peak again and keep the higher: on a shared machine one measurement can catch a busy
        moment, and a peak that is too low would inflate the MFU (MFU rows are recomputed by the caller)."""
        for precision, old in list(self.peaks.items()):
            new = measure.matmul_peak(self.device, _PEAK_DTYPES[precision], self.peak_size)
            if new["flops_per_s"] > old["flops_per_s"]:
                self.peaks[precision] = new


def refresh_mfu(ctx: BenchContext, result: dict) -> None:
    """Recompute the MFU of every row of a suite result against the context's current peaks."""
    for row in result.get("rows", []):
        if "achieved_tflops_per_s" in row and row.get("precision") in ctx.peaks:
            row["mfu"] = row["achieved_tflops_per_s"] * 1e12 / ctx.peaks[row["precision"]]["flops_per_s"]


# ---------------------------------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------------------------------


def row_of(ctx: BenchContext, trainee: Trainee, name: str, times: list[float], warmup_times: list[float],
           peak_bytes: int | None, **extra) -> dict:
    """One measurement: median step time, images/s, memory, analytic FLOPs, achieved FLOP/s and MFU."""
    cfg = trainee.config
    batch = _batch_of(trainee)
    median = statistics.median(times)
    flops = mae_flops(cfg)
    ips = batch / median
    achieved = flops.train * ips
    peak = ctx.peak(trainee.precision)["flops_per_s"]
    return {
        "label": trainee.label, "model": name, "img_size": cfg.image_hw[0], "batch_size": batch,
        "precision": trainee.precision, "mask_ratio": cfg.mask_ratio, "mask_in_encoder": cfg.mask_in_encoder,
        "decoder_depth": cfg.decoder_depth, "step_seconds": median, "step_seconds_all": times,
        "warmup_seconds": warmup_times, "images_per_s": ips, "peak_memory_mib": _mib(peak_bytes),
        "gflops_per_image_train": flops.train / 1e9, "achieved_tflops_per_s": achieved / 1e12,
        "mfu": achieved / peak, "compile_seconds": trainee.compile_seconds, **trainee.info, **extra,
    }


def _batch_of(trainee: Trainee) -> int:
    return int(trainee.info["batch_size"])


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def _build_measured(ctx: BenchContext, build: Callable[[], Trainee]) -> tuple[Trainee, list[float], int | None]:
    """Build and warm up a trainee, measuring the peak memory of both (weights, optimizer state, activations)."""
    meter = measure.PeakMemory(ctx.device).start()
    trainee = build()
    warm = warm_up(trainee, ctx.warmup)
    return trainee, warm, meter.stop()


def measure_single(ctx: BenchContext, name: str, build: Callable[[], Trainee], **extra) -> dict:
    """Build, warm up and time one trainee on its own (peak memory covers the timed steps as well)."""
    meter = measure.PeakMemory(ctx.device).start()
    trainee = build()
    warm = warm_up(trainee, ctx.warmup)
    times = [timed_step(trainee)[0] for _ in range(ctx.steps)]
    row = row_of(ctx, trainee, name, times, warm, meter.stop(), **extra)
    _free(trainee)
    return row


def measure_together(ctx: BenchContext, named_builds: list[tuple[str, Callable[[], Trainee]]],
                     alternate: bool = True) -> list[dict]:
    """Time several trainees fairly. Alternating: all built first, then timed one step each in turn (A B C A B C),
    so drifts of the machine hit each alike. Sequential (when they do not fit in memory together): built, timed
    and freed one after the other."""
    if not alternate:
        return [measure_single(ctx, name, build, schedule="sequential") for name, build in named_builds]
    built = []
    for name, build in named_builds:
        trainee, warm, peak = _build_measured(ctx, build)
        built.append((name, trainee, warm, peak))
    times = time_alternating([t for _, t, _, _ in built], ctx.steps)
    rows = [row_of(ctx, t, name, times[t.label], warm, peak, schedule="alternating") for name, t, warm, peak in built]
    for _, t, _, _ in built:
        _free(t)
    return rows


def speed_ratio(slow: dict, fast: dict) -> float:
    """How many times faster `fast` ran than `slow` (rows of one `measure_together` call).

    Alternated runs: the median over rounds of the per-round ratio of step times. Each round times both within
    seconds of each other, so a burst of load from other processes hits both sides of a ratio alike; this is
    far steadier on a shared machine than the ratio of the two medians. Sequential runs: ratio of medians.
    """
    a, b = slow["step_seconds_all"], fast["step_seconds_all"]
    if slow.get("schedule") == fast.get("schedule") == "alternating" and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b, strict=True))
    return slow["step_seconds"] / fast["step_seconds"]


def _free(trainee: Trainee) -> None:
    trainee.model = None  # type: ignore[assignment]
    trainee.run_step = None  # type: ignore[assignment]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fits_together(configs: list[MAEConfig], device: torch.device, share: float = 0.5) -> bool:
    """Whether the training state (fp32 weights, gradients, two AdamW moments: 16 bytes a parameter) of all
    `configs`, plus as much again for activations, fits in `share` of the device's free memory."""
    need = 0
    for cfg in configs:
        with torch.device("meta"):
            need += 2 * 16 * sum(p.numel() for p in MaskedAutoencoderViT(cfg).parameters())
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else measure.available_memory() or 0
    return need <= share * free


# ---------------------------------------------------------------------------------------------------------------------
# suites
# ---------------------------------------------------------------------------------------------------------------------


def suite_step(ctx: BenchContext, name: str, cfg: MAEConfig, batch: int, precision: str, *, compile: bool = False,
               grad_checkpointing: bool = False, optimizer: str = "auto", flop_check: bool = True) -> dict:
    """Time the training step of one model config; cross-check the analytic FLOPs with FlopCounterMode."""
    row = measure_single(ctx, name, lambda: build_ours(cfg, batch, precision, ctx.device, compile=compile,
                                                       grad_checkpointing=grad_checkpointing, optimizer=optimizer,
                                                       seed=ctx.seed, label="mae"))
    out: dict = {"rows": [row]}
    if flop_check:
        out["flop_check"] = flop_check_meta(cfg)
    if compile:
        out["graph_breaks"] = graph_breaks(cfg)
    return out


def flop_check_meta(cfg: MAEConfig, batch: int = 2) -> dict:
    """Analytic training FLOPs against FlopCounterMode's count of a forward + backward on the meta device."""
    with torch.device("meta"):
        model = MaskedAutoencoderViT(cfg)
    imgs = torch.empty(batch, cfg.in_chans, *cfg.image_hw, device="meta")
    counted = counted_flops(model, imgs)
    analytic = mae_flops(cfg)
    return {"analytic_gflops_forward": analytic.forward / 1e9, "counted_gflops_forward": counted["forward"] / 1e9,
            "analytic_gflops_train": analytic.train / 1e9, "counted_gflops_train": counted["train"] / 1e9,
            "train_ratio": analytic.train / counted["train"]}


def graph_breaks(cfg: MAEConfig) -> dict:
    """Graph breaks torch.compile (dynamo) meets in one training forward of `cfg` (traced, not compiled)."""
    import torch._dynamo as dynamo  # slow to import: only the compile check

    small = cfg.replace(depth=1, decoder_depth=min(1, cfg.decoder_depth))  # same masking path, quick to trace
    model = MaskedAutoencoderViT(small)
    imgs = torch.randn(2, small.in_chans, *small.image_hw)
    dynamo.reset()
    explained = dynamo.explain(model)(imgs)
    dynamo.reset()
    return {"mask_strategy": cfg.mask_strategy, "graphs": explained.graph_count,
            "graph_breaks": explained.graph_break_count,
            "reasons": sorted({str(b.reason).splitlines()[0][:120] for b in explained.break_reasons})}


def suite_table2(ctx: BenchContext, encoders: list[str], img_size: int | None, batch: int, precision: str, *,
                 optimizer: str = "auto") -> dict:
    """Paper Table 2: per encoder, step time of (mask tokens in the encoder, decoder 8 blocks), (MAE, 8), (MAE, 1),
    all with decoder width 512 and 75% masking, as speed-ups over the first."""
    variants = [("encoder w/ mask tokens, dec 8", {"mask_in_encoder": True, "decoder_depth": 8}),
                ("MAE encoder, dec 8", {"decoder_depth": 8}),
                ("MAE encoder, dec 1", {"decoder_depth": 1})]
    rows, results = [], []
    for size in encoders:
        if size not in _ENCODER_NAMES:
            raise ConfigError(f"table2.encoders: unknown encoder '{size}'; choose from {', '.join(_ENCODER_NAMES)}")
        name = _ENCODER_NAMES[size]
        overrides = {} if img_size is None else {"img_size": img_size}
        cfgs = [model_config(name, decoder_embed_dim=512, decoder_num_heads=16, mask_ratio=0.75, **overrides, **v)
                for _, v in variants]
        builds = [(name, _ours_builder(ctx, cfg, batch, precision, label, optimizer))
                  for (label, _), cfg in zip(variants, cfgs, strict=True)]
        measured = measure_together(ctx, builds, alternate=fits_together(cfgs, ctx.device))
        base_flops = mae_flops(cfgs[0]).train
        paper = PAPER_TABLE2.get(size)
        for (label, v), cfg, row in zip(variants, cfgs, measured, strict=True):
            paper_speedup = None if paper is None else 1.0 if v.get("mask_in_encoder") else paper[v["decoder_depth"]]
            row.update(encoder=size, variant=label, speedup=speed_ratio(measured[0], row),
                       flops_ratio=base_flops / mae_flops(cfg).train, paper_speedup=paper_speedup)
            rows.append(row)
        results.append({"encoder": size, "speedup_dec8": measured[1]["speedup"],
                        "speedup_dec1": measured[2]["speedup"],
                        "paper_dec8": (paper or {}).get(8), "paper_dec1": (paper or {}).get(1)})
    return {"rows": rows, "speedups": results}


def _ours_builder(ctx: BenchContext, cfg: MAEConfig, batch: int, precision: str, label: str, optimizer: str = "auto",
                  compile: bool = False, grad_checkpointing: bool = False) -> Callable[[], Trainee]:
    return lambda: build_ours(cfg, batch, precision, ctx.device, compile=compile, optimizer=optimizer,
                              grad_checkpointing=grad_checkpointing, seed=ctx.seed, label=label)


def suite_table1c() -> dict:
    """Paper Table 1c: FLOPs of the encoder with mask tokens over the MAE's, decoder 8 x 512, 75% masking."""
    rows = []
    for size in ("base", "large", "huge"):
        cfg = model_config(_ENCODER_NAMES[size], decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                           mask_ratio=0.75)
        ratio = table1c_ratio(cfg)
        rows.append({"encoder": size, **ratio, "paper_ratio": 3.3 if size == "large" else None})
    large = next(r for r in rows if r["encoder"] == "large")
    cfg = model_config("mae_vit_large_patch16")
    counted_mae = flop_check_meta(cfg, batch=1)["counted_gflops_forward"]
    counted_tok = flop_check_meta(cfg.replace(mask_in_encoder=True), batch=1)["counted_gflops_forward"]
    return {"rows": rows, "ratio_large": large["ratio"], "paper_ratio_large": 3.3,
            "counted_ratio_large": counted_tok / counted_mae}


def suite_peer(ctx: BenchContext, name: str, cfg: MAEConfig, batch: int, precisions: list[str], default_precision: str,
               *, optimizer: str = "auto", compile: bool = False, hf_optimizer: str = "fused",
               reference: bool = True) -> dict:
    """This library vs Hugging Face ViTMAEForPreTraining: same architecture, weights, batch, threads; all runs in
    this process, timed one step each in turn. Ratios (`speed_ratio`) > 1 mean this library is faster.

    Same precision: both in `precisions`, each with its usual optimizer (ours: ``build_optimizer``; HF: its
    Trainer's default ``adamw_torch_fused``); with `reference`, also the reference release's step at each of them
    (``build_reference``). Defaults: ours at `default_precision` (what ``precision=auto``
    picks) with `optimizer` / `compile` against HF's Trainer default, fp32.
    """
    check = same_loss_check(cfg)
    builds: list[tuple[str, Callable[[], Trainee]]] = []
    for p in precisions:
        builds.append((name, _ours_builder(ctx, cfg, batch, p, f"mae {p}", optimizer)))
        builds.append((name, lambda p=p: build_hf(cfg, batch, p, ctx.device, optimizer=hf_optimizer,  # type: ignore[misc]  # a default-argument lambda binds p
                                                   seed=ctx.seed, label=f"hf {p}")))
        if reference:
            builds.append((name, lambda p=p: build_reference(cfg, batch, p, ctx.device, seed=ctx.seed,  # type: ignore[misc]  # a default-argument lambda binds p
                                                             label=f"reference {p}")))
    ours_default = f"mae {default_precision}"
    if compile or default_precision not in precisions:
        ours_default = f"mae default ({default_precision}{', compiled' if compile else ''})"
        builds.append((name, _ours_builder(ctx, cfg, batch, default_precision, ours_default, optimizer, compile)))
    if "fp32" not in precisions:
        builds.append((name, lambda: build_hf(cfg, batch, "fp32", ctx.device, optimizer=hf_optimizer,
                                              seed=ctx.seed, label="hf fp32")))
    rows = measure_together(ctx, builds, alternate=fits_together([cfg] * len(builds), ctx.device))
    by_label = {r["label"]: r for r in rows}
    ratios = {p: speed_ratio(by_label[f"hf {p}"], by_label[f"mae {p}"]) for p in precisions}
    default_ratio = speed_ratio(by_label["hf fp32"], by_label[ours_default])
    out = {"rows": rows, "same_precision_ratio": ratios, "default_ratio": default_ratio,
           "default_labels": [ours_default, "hf fp32"], "weights_check": check}
    if reference:
        out["reference_ratio"] = {p: speed_ratio(by_label[f"reference {p}"], by_label[f"mae {p}"]) for p in precisions}
    return out


def same_loss_check(cfg: MAEConfig) -> dict:
    """Both implementations, same weights and noise, on a small batch in fp32: the losses must agree."""
    torch.manual_seed(0)
    ours = MaskedAutoencoderViT(cfg).eval()
    hf = hf_from_ours(ours).eval()
    imgs = torch.randn(2, cfg.in_chans, *cfg.image_hw)
    noise = torch.rand(2, cfg.num_patches)
    with torch.no_grad():
        a = ours(imgs, noise=noise)[0].item()
        b = hf(pixel_values=imgs, noise=noise).loss.item()
    return {"loss_mae": a, "loss_hf": b, "abs_diff": abs(a - b)}


def suite_scaling(ctx: BenchContext, name: str, cfg: MAEConfig, precision: str, batch_sizes: list[int],
                  mask_ratios: list[float], models: list[str], batch: int, checkpointing: bool,
                  optimizer: str = "auto", model_precisions: list[str] | None = None) -> dict:
    """Images/s and peak memory against batch size and mask ratio (for `cfg`) and against model size (each of
    `models` at the img_size of `cfg`; with `checkpointing`, also with activation checkpointing; with
    `model_precisions`, each model at each of those precisions too: the data behind ``precision=auto``)."""
    rows = [measure_single(ctx, name, _ours_builder(ctx, cfg, b, precision, f"batch {b}", optimizer),
                           axis="batch_size")
            for b in batch_sizes]
    for r in mask_ratios:
        c = cfg.replace(mask_ratio=r)
        rows.append(measure_single(ctx, name, _ours_builder(ctx, c, batch, precision, f"mask {r:g}", optimizer),
                                   axis="mask_ratio"))
    for m in models:
        c = model_config(m, img_size=cfg.image_hw[0])
        for ckpt in ((False, True) if checkpointing else (False,)):
            label = f"{m}{' ckpt' if ckpt else ''}"
            rows.append(measure_single(ctx, m, _ours_builder(ctx, c, batch, precision, label, optimizer,
                                                             grad_checkpointing=ckpt), axis="model"))
        rows.extend(measure_single(ctx, m, _ours_builder(ctx, c, batch, p, f"{m} {p}", optimizer), axis="model")
                    for p in model_precisions or [] if p != precision)
    return {"rows": rows}


def suite_data(ctx: BenchContext, folder: str | None, num_images: int, decoders: list[str], workers: list[int],
               batch: int, batches: int, img_size: int, out_dir: Path) -> dict:
    """The input pipeline alone: images/s per decoder and worker count from a folder of JPEGs."""
    tmp = None
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="mae-bench-jpegs-")
        folder = str(make_jpeg_folder(tmp.name, num_images, seed=ctx.seed))
    rows = []
    try:
        for decoder in decoders:
            if decoder == "nvjpeg" and ctx.device.type != "cuda":
                log.info("data: skipping decoder nvjpeg (needs CUDA)")
                continue
            for w in workers:
                rows.append(pipeline_throughput(folder, decoder, w, batch, batches, img_size, ctx.device))
                log.info("data: %s, %d workers: %.1f images/s", decoder, w, rows[-1]["images_per_s"])
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"rows": rows, "folder": folder if tmp is None else f"generated ({num_images} JPEGs, ~500 px)"}
