"""``mae bench``: time training steps and report images/s, peak memory, FLOPs, achieved FLOP/s and MFU; the paper's
speed claims (Table 2, Table 1c); this library against Hugging Face; scaling curves; the input pipeline.

    mae bench                                   # ViT-B/16, batch 16, precision auto: one timed config
    mae bench --suite table1c                   # FLOPs ratio of paper Table 1c (instant)
    mae bench --suite peer --batch-size 16      # vs transformers' ViTMAEForPreTraining, same process
    mae bench --suite table2,scaling,data       # several suites in one run

A step is what the training engine does per batch (autocast, loss, backward, AdamW step, ``loss.item()``) on a
synthetic batch already on the device; the median of ``steps`` timed steps after ``warmup`` untimed ones.
Results go to ``<output_dir>/bench.json`` (every number, the machine, the command) and ``bench.md`` (tables).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from mae.bench import measure
from mae.bench.memory import suite_memory
from mae.bench.report import plot_data, plot_scaling, suite_tables
from mae.bench.step import OPTIMIZER_IMPLS, threads
from mae.bench.suites import (
    SUITES,
    BenchContext,
    refresh_mfu,
    suite_data,
    suite_peer,
    suite_scaling,
    suite_step,
    suite_table1c,
    suite_table2,
)
from mae.config import to_dict
from mae.errors import ConfigError
from mae.files import check_output_folder, write_json, write_text
from mae.models import model_config
from mae.recipes.common import (
    ModelSection,
    prepare_output_dir,
    require_at_least,
    require_precision,
    resolve_device,
    run_distributed,
)
from mae.train.precision import resolve_precision

log = logging.getLogger("mae")

CLI_FLAGS = {"--output-dir": "output_dir", "--device": "device", "--precision": "precision", "--suite": "suite",
             "--model": "model.name", "--batch-size": "batch_size", "--threads": "threads"}


@dataclass
class Table2Section:
    encoders: list[str] = field(default_factory=lambda: ["base", "large"],
                                metadata={"help": "ViT sizes to compare: tiny, small, base, large, huge"})
    img_size: int | None = field(default=None, metadata={"help": "image side (None: the paper's 224)"})
    batch_size: int | None = field(default=None, metadata={"help": "None: 4 on CPU, 32 on CUDA"})


@dataclass
class PeerSection:
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"],
                                  metadata={"help": "compared at the same precision (bf16 is dropped where the "
                                                    "device has none)"})
    hf_optimizer: str = field(default="fused", metadata={"help": "AdamW for the HF model: fused (its Trainer's "
                                                                 "default) | foreach | for-loop | auto"})
    reference: bool = field(default=True, metadata={"help": "also time the reference release's step (written-out "
                                                            "attention, default AdamW) at each precision"})


@dataclass
class ScalingSection:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    mask_ratios: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.75, 0.85, 0.9])
    models: list[str] = field(default_factory=lambda: ["mae_vit_tiny_patch16", "mae_vit_small_patch16",
                                                       "mae_vit_base_patch16", "mae_vit_large_patch16"],
                              metadata={"help": "registered names for the model-size axis"})
    batch_size: int = field(default=8, metadata={"help": "batch of the mask-ratio and model axes"})
    grad_checkpointing: bool = field(default=True, metadata={"help": "also measure each model with activation "
                                                                     "checkpointing (memory saved)"})
    precisions: list[str] = field(default_factory=list, metadata={"help": "also run each model at these "
                                                                          "precisions (the data behind auto)"})

    RANGES: ClassVar[dict[str, str]] = {"mask_ratios": "[0, 1)"}


@dataclass
class DataSection:
    folder: str | None = field(default=None, metadata={"help": "a folder of .jpg files (None: make one from the "
                                                               "photos shipped with scikit-image / scikit-learn)"})
    num_images: int = field(default=64, metadata={"help": "JPEGs to make when no folder is given"})
    decoders: list[str] = field(default_factory=lambda: ["pil", "tensor", "nvjpeg"],
                                metadata={"help": "pil | tensor (torchvision.io + v2 on uint8) | nvjpeg (CUDA)"})
    workers: list[int] = field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 32
    batches: int = field(default=8, metadata={"help": "timed batches per setting"})
    img_size: int = 224


@dataclass
class MemorySection:
    models: list[str] = field(default_factory=lambda: ["mae_vit_large_patch16", "mae_vit_huge_patch14",
                                                       "mae_vit_2b_patch14", "mae_vit_6.5b_patch14"],
                              metadata={"help": "registered names to plan"})
    strategies: list[str] = field(default_factory=lambda: ["ddp", "fsdp"], metadata={"help": "ddp | fsdp"})
    world_sizes: list[int] = field(default_factory=lambda: [8, 64], metadata={"help": "GPUs of the planned run"})
    batch_size: int = field(default=64, metadata={"help": "images per GPU of the planned run"})
    precision: str = field(default="bf16", metadata={"help": "autocast precision of the planned run"})
    mixed_precision: bool = field(default=True, metadata={"help": "fsdp rows: bf16 parameters and compute "
                                                                  "(distributed.mixed_precision)"})
    grad_checkpointing: list[bool] = field(default_factory=lambda: [False, True],
                                           metadata={"help": "plan without and / or with activation checkpointing"})
    measure: list[str] = field(default_factory=list, metadata={
        "help": "strategies to measure on this machine (model, batch_size, precision: the bench's own; processes: "
                "torchrun's), next to their plan"})

    def validate(self) -> None:
        for s in (*self.strategies, *self.measure):
            if s not in ("ddp", "fsdp"):
                raise ConfigError(f"memory: strategy '{s}' is not one of ddp, fsdp")
        if any(w < 1 for w in self.world_sizes) or self.batch_size < 1:
            raise ConfigError("memory.world_sizes and memory.batch_size must be at least 1")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"memory.precision '{self.precision}' is not one of fp32, bf16, fp16")


@dataclass
class BenchConfig:
    """What to time and how; every suite shares the device, threads, warm-up and step counts."""

    suite: str = field(default="step", metadata={"help": f"comma-separated: {', '.join(SUITES)} (or 'all')"})
    model: ModelSection = field(default_factory=ModelSection)
    batch_size: int = field(default=16, metadata={"help": "images per step (suites step, peer, scaling batch axis "
                                                          "excluded)"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32 (auto: bf16 where native)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    threads: int = field(default=0, metadata={"help": "intra-op CPU threads (0: torch's default)"})
    warmup: int = field(default=2, metadata={"help": "untimed steps first (at least 1)"})
    steps: int = field(default=5, metadata={"help": "timed steps; the median is reported"})
    compile: bool = field(default=False, metadata={"help": "torch.compile our model (suites step, peer)"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing (suite step)"})
    optimizer: str = field(default="auto", metadata={"help": "our AdamW: auto (as mae pretrain) | fused | foreach | "
                                                             "for-loop"})
    flop_check: bool = field(default=True, metadata={"help": "cross-check FLOPs with FlopCounterMode (meta device)"})
    peak_matmul_size: int | None = field(default=None, metadata={"help": "side of the matmul that measures the "
                                                                         "peak (None: 2048 CPU, 8192 CUDA)"})
    seed: int = 0
    output_dir: str = field(default="runs/bench", metadata={"help": "bench.json, bench.md and plots go here"})
    overwrite: bool = field(default=False, metadata={
        "help": "write into an output_dir that holds files mae bench did not write: files of the same names are "
                "replaced, no other file is touched; without it such a folder is refused (a folder of an earlier "
                "bench is reused without it)"})
    plots: bool = field(default=True, metadata={"help": "draw PNGs for the scaling and data suites"})
    table2: Table2Section = field(default_factory=Table2Section)
    peer: PeerSection = field(default_factory=PeerSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    data: DataSection = field(default_factory=DataSection)
    memory: MemorySection = field(default_factory=MemorySection)

    def suites(self) -> list[str]:
        names = [s.strip() for s in self.suite.split(",") if s.strip()]
        return list(SUITES) if names == ["all"] else names

    def validate(self) -> None:
        unknown = [s for s in self.suites() if s not in SUITES]
        if unknown or not self.suites():
            raise ConfigError(f"unknown suite '{unknown[0] if unknown else self.suite}'; choose from "
                              f"{', '.join(SUITES)} (comma-separated) or 'all'")
        require_at_least(self, ("batch_size", "warmup", "steps"))
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 keeps torch's default), got {self.threads}")
        require_precision(self.precision)
        for key, values in (("peer.precisions", self.peer.precisions), ("scaling.precisions", self.scaling.precisions)):
            for p in values:
                if p not in ("fp32", "bf16", "fp16"):
                    raise ConfigError(f"{key}: '{p}' is not one of fp32, bf16, fp16")
        for impl, key in ((self.optimizer, "optimizer"), (self.peer.hf_optimizer, "peer.hf_optimizer")):
            if impl not in OPTIMIZER_IMPLS:
                raise ConfigError(f"{key} '{impl}' is not one of {', '.join(OPTIMIZER_IMPLS)}")
        if any(w < 0 for w in self.data.workers):
            raise ConfigError(f"data.workers must be >= 0, got {self.data.workers}")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _yaml_value(v) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_yaml_value(x) for x in v) + "]"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def command_of(cfg: BenchConfig) -> str:
    """The ``mae bench`` command line that reproduces `cfg` (every setting that differs from the defaults), with
    the OpenMP variables of this process in front."""
    defaults, current = _flatten(to_dict(BenchConfig())), _flatten(to_dict(cfg))
    args = [f"{k}={_yaml_value(v)}" for k, v in current.items() if defaults.get(k) != v and k != "overwrite"]
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ]
    return shlex.join([*env, "mae", "bench", *args])


def _written_by_bench(folder: Path) -> bool:
    """A folder of an earlier `mae bench` (its bench.json), whose report a new run replaces."""
    try:
        record = json.loads((folder / "bench.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "mae bench" in str(record.get("command", "")) and "suites" in record


def run(cfg: BenchConfig) -> dict:
    """Run the selected suites; write bench.json and bench.md; return the headline numbers. Under torchrun (several
    processes) only the memory suite runs, every rank measuring its own peak, rank 0 writing."""
    check_output_folder(Path(cfg.output_dir).expanduser(), "bench", cfg.overwrite, own=_written_by_bench)
    device = resolve_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if cfg.suites() != ["memory"]:
            raise ConfigError(f"under torchrun only --suite memory runs (it measures every process); got "
                              f"'{cfg.suite}'")
        def body(dist) -> dict:
            with threads(cfg.threads):
                return _run(cfg, dist.device, prepare_output_dir(cfg.output_dir) if dist.is_main else None)

        return run_distributed(cfg.device, body)
    out = prepare_output_dir(cfg.output_dir)
    with threads(cfg.threads):
        return _run(cfg, device, out)


def _available(precision: str, device: torch.device) -> bool:
    try:
        resolve_precision(precision, device)
    except ConfigError:
        return False
    return True


def _run(cfg: BenchConfig, device: torch.device, out) -> dict:
    """Run the suites `cfg` selects, in order, and write ``bench.json`` / ``bench.md``; returns the summary. Long
    because each suite's branch reads its own config section and adds its own keys to the one summary."""
    precision = resolve_precision(cfg.precision, device)
    ctx = BenchContext(device, warmup=cfg.warmup, steps=cfg.steps, seed=cfg.seed, peak_size=cfg.peak_matmul_size)
    model_cfg = model_config(cfg.model.name, **cfg.model.overrides())
    command = command_of(cfg)
    machine = measure.machine_info(device)
    load = machine.get("load_average")
    if device.type == "cpu" and load and load[0] > 0.5 * (machine["cpu_count"] or 1):
        log.warning("bench: the machine is busy (load average %.1f on %s cores): CPU timings will be noisy and "
                    "slower; alternated runs (peer, table2) stay comparable. With OpenMP's default spinning, "
                    "OMP_WAIT_POLICY=PASSIVE helps a lot on an oversubscribed machine.", load[0], machine["cpu_count"])
    caption = (f"{machine.get('gpu') or machine['cpu']} ({machine['torch_threads']} threads"
               + (f", load average {load[0]:.1f}" if load and device.type == "cpu" else "")
               + f"), torch {torch.__version__} | {command}")
    results: dict = {"command": command, "machine": machine, "config": to_dict(cfg), "precision": precision,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "suites": {}}
    summary: dict = {}
    for name in cfg.suites():
        t0 = time.perf_counter()
        log.info("bench: suite %s ...", name)
        if name == "step":
            res = suite_step(ctx, cfg.model.name, model_cfg, cfg.batch_size, precision, compile=cfg.compile,
                             grad_checkpointing=cfg.grad_checkpointing, optimizer=cfg.optimizer,
                             flop_check=cfg.flop_check)
            row = res["rows"][0]
            summary.update({"images_per_s": row["images_per_s"], "step_seconds": row["step_seconds"],
                            "peak_memory_mib": row["peak_memory_mib"], "mfu": row["mfu"]})
        elif name == "table2":
            batch = cfg.table2.batch_size or (32 if device.type == "cuda" else 4)
            res = suite_table2(ctx, cfg.table2.encoders, cfg.table2.img_size, batch, precision,
                               optimizer=cfg.optimizer)
            for s in res["speedups"]:
                summary[f"table2_{s['encoder']}_speedup_dec8"] = s["speedup_dec8"]
                summary[f"table2_{s['encoder']}_speedup_dec1"] = s["speedup_dec1"]
        elif name == "table1c":
            res = suite_table1c()
            summary["table1c_ratio_vit_large"] = res["ratio_large"]
        elif name == "peer":
            precisions = [p for p in cfg.peer.precisions if _available(p, device)]
            res = suite_peer(ctx, cfg.model.name, model_cfg, cfg.batch_size, precisions, precision,
                             optimizer=cfg.optimizer, compile=cfg.compile, hf_optimizer=cfg.peer.hf_optimizer,
                             reference=cfg.peer.reference)
            for p, r in res["same_precision_ratio"].items():
                summary[f"peer_ratio_{p}"] = r
            for p, r in res.get("reference_ratio", {}).items():
                summary[f"reference_ratio_{p}"] = r
            summary["peer_ratio_defaults"] = res["default_ratio"]
        elif name == "scaling":
            sc = cfg.scaling
            res = suite_scaling(ctx, cfg.model.name, model_cfg, precision, sc.batch_sizes, sc.mask_ratios, sc.models,
                                sc.batch_size, sc.grad_checkpointing, optimizer=cfg.optimizer,
                                model_precisions=[p for p in sc.precisions if _available(p, device)])
            if cfg.plots:
                res["plots"] = [str(p) for p in plot_scaling(res["rows"], out, caption)]
        elif name == "memory":
            m = cfg.memory
            res = suite_memory(m.models, m.strategies, m.world_sizes, m.batch_size, m.precision, m.mixed_precision,
                               m.grad_checkpointing, m.measure, cfg.model.name, cfg.model.overrides(), cfg.batch_size,
                               precision, device)
            for check in res["checks"]:
                key = f"memory_{check['strategy']}{'_ckpt' if check['grad_checkpointing'] else ''}_plan_over_measured"
                summary[key] = check["plan_over_measured"]
            if out is None:  # another rank of a torchrun measurement: rank 0 writes
                return {}
        else:  # data
            d = cfg.data
            res = suite_data(ctx, d.folder, d.num_images, d.decoders, d.workers, d.batch_size, d.batches, d.img_size,
                             out)
            if cfg.plots and res["rows"]:
                res["plots"] = [str(plot_data(res["rows"], out / "data_pipeline.png", caption))]
            best = max(res["rows"], key=lambda r: r["images_per_s"], default=None)
            if best:
                summary["data_best_images_per_s"] = best["images_per_s"]
        res["seconds"] = time.perf_counter() - t0
        results["suites"][name] = res
        log.info("bench: %s (%.0f s)\n%s", name, res["seconds"], suite_tables(name, res))
    if ctx.peaks:
        ctx.remeasure_peaks()
        for res in results["suites"].values():
            refresh_mfu(ctx, res)
        if "step" in results["suites"]:
            summary["mfu"] = results["suites"]["step"]["rows"][0]["mfu"]
    results["peaks"] = ctx.peaks
    results["machine"]["load_average_end"] = measure.load_average()
    write_json(out / "bench.json", results)
    md = [f"# mae bench\n\n`{command}`\n\n{caption}\n"]
    for name, res in results["suites"].items():
        md.append(f"## {name}\n\n{suite_tables(name, res)}\n")
    if ctx.peaks:
        md.append("## matmul peaks\n\n" + "\n".join(
            f"- {p}: {v['flops_per_s'] / 1e12:.3g} TFLOP/s ({v['size']}^3)" for p, v in ctx.peaks.items()) + "\n")
    write_text(out / "bench.md", "\n".join(md))
    return {"suites": ",".join(results["suites"]), "precision": precision, **summary,
            "json": str(out / "bench.json"), "markdown": str(out / "bench.md")}
