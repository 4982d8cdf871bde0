"""Benchmark results as Markdown tables and PNG plots (each figure names the machine and the command)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mae.files import atomic_write_path


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of `rows` with `columns` = [(key, header), ...]."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


STEP_COLUMNS = [("label", "run"), ("model", "model"), ("img_size", "img"), ("batch_size", "batch"),
                ("precision", "precision"), ("step_seconds", "step s"), ("images_per_s", "img/s"),
                ("peak_memory_mib", "peak MiB"), ("gflops_per_image_train", "GFLOP/img"),
                ("achieved_tflops_per_s", "TFLOP/s"), ("mfu", "MFU")]
TABLE2_COLUMNS = [("encoder", "encoder"), ("variant", "variant"), ("img_size", "img"), ("batch_size", "batch"),
                  ("precision", "precision"), ("step_seconds", "step s"), ("images_per_s", "img/s"),
                  ("speedup", "speed-up"), ("flops_ratio", "FLOPs ratio"), ("paper_speedup", "paper"),
                  ("peak_memory_mib", "peak MiB"), ("mfu", "MFU")]
TABLE1C_COLUMNS = [("encoder", "encoder"), ("mae_gflops", "MAE GFLOPs"), ("mask_tokens_gflops", "w/ mask tokens"),
                   ("ratio", "ratio"), ("encoder_ratio", "encoder-only ratio"), ("paper_ratio", "paper")]
DATA_COLUMNS = [("decoder", "decoder"), ("workers", "workers"), ("batch_size", "batch"),
                ("images_per_s", "img/s"), ("image_shape", "output")]
SCALING_COLUMNS = [("axis", "axis"), *STEP_COLUMNS[:5], ("mask_ratio", "mask"), ("grad_checkpointing", "ckpt"),
                   *STEP_COLUMNS[5:]]


MEMORY_COLUMNS = [("model", "model"), ("params_b", "params (B)"), ("strategy", "strategy"), ("world_size", "GPUs"),
                  ("batch_size", "batch/GPU"), ("precision", "precision"), ("mixed_precision", "bf16 params"),
                  ("grad_checkpointing", "ckpt"), ("parameters_gib", "params GiB"), ("gradients_gib", "grads GiB"),
                  ("optimizer_gib", "AdamW GiB"), ("buckets_gib", "DDP buckets GiB"), ("gathered_gib", "gathered GiB"),
                  ("activations_gib", "activations GiB"), ("peak_gib", "peak GiB")]
MEMORY_CHECK_COLUMNS = [("model", "model"), ("params_m", "params (M)"), ("strategy", "strategy"),
                        ("world_size", "processes"), ("batch_size", "batch/process"), ("precision", "precision"),
                        ("grad_checkpointing", "ckpt"), ("measured_mib", "measured MiB (max over ranks)"),
                        ("planned_mib", "planned MiB"), ("plan_over_measured", "plan / measured")]


def suite_tables(name: str, result: dict) -> str:
    """The Markdown tables of one suite's result."""
    rows = result.get("rows", [])
    if name == "memory":
        text = markdown_table(rows, MEMORY_COLUMNS)
        if result.get("checks"):
            text += "\n\nmeasured on this machine:\n\n" + markdown_table(result["checks"], MEMORY_CHECK_COLUMNS)
        return text
    if name == "table2":
        return markdown_table(rows, TABLE2_COLUMNS)
    if name == "table1c":
        return markdown_table(rows, TABLE1C_COLUMNS) + (
            f"\n\nViT-L, counted by FlopCounterMode on the meta device: {result['counted_ratio_large']:.2f}x")
    if name == "data":
        return markdown_table(rows, DATA_COLUMNS)
    if name == "scaling":
        return markdown_table(rows, SCALING_COLUMNS)
    if name == "peer":
        peer_rows = [{"label": r["label"], "implementation": r["implementation"], "precision": r["precision"],
                      "optimizer": r["optimizer"], "images_per_s": r["images_per_s"],
                      "step_seconds": r["step_seconds"], "peak_memory_mib": r["peak_memory_mib"], "mfu": r["mfu"]}
                     for r in rows]
        text = markdown_table(peer_rows, [("label", "run"), ("implementation", "library"), ("precision", "precision"),
                                          ("optimizer", "optimizer"), ("step_seconds", "step s"),
                                          ("images_per_s", "img/s"), ("peak_memory_mib", "peak MiB"), ("mfu", "MFU")])
        ratios = ", ".join(f"{p}: {r:.2f}x" for p, r in result["same_precision_ratio"].items())
        a, b = result["default_labels"]
        ref = ""
        if "reference_ratio" in result:
            ref = "; same precision (mae / reference): " + ", ".join(
                f"{p}: {r:.2f}x" for p, r in result["reference_ratio"].items())
        return (f"{text}\n\nsame precision (mae / hf): {ratios}{ref}; defaults ({a} / {b}): "
                f"{result['default_ratio']:.2f}x; losses agree to {result['weights_check']['abs_diff']:.1e}")
    text = markdown_table(rows, STEP_COLUMNS)
    if "flop_check" in result:
        fc = result["flop_check"]
        text += (f"\n\nFLOPs per image (train): analytic {fc['analytic_gflops_train']:.3g} G, FlopCounterMode "
                 f"{fc['counted_gflops_train']:.3g} G (ratio {fc['train_ratio']:.3f})")
    return text


def plot_scaling(rows: Sequence[dict], out_dir: Path, caption: str) -> list[Path]:
    """One PNG per scaling axis (batch size, mask ratio, model): images/s and peak memory panels."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot alone

    written = []
    for axis, xlabel in (("batch_size", "batch size"), ("mask_ratio", "mask ratio"), ("model", "model")):
        sel = [r for r in rows if r.get("axis") == axis]
        if not sel:
            continue
        fig = Figure(figsize=(9, 3.6), layout="constrained")
        ax_speed, ax_mem = fig.subplots(1, 2)
        if axis == "model":
            series: dict[str, list[dict]] = {}
            for r in sel:
                key = r["precision"] + (" + activation checkpointing" if r.get("grad_checkpointing") else "")
                series.setdefault(key, []).append(r)
            names = list(dict.fromkeys(r["model"] for r in sel))
            width = 0.8 / len(series)
            for i, (key, group) in enumerate(series.items()):
                by_model = {r["model"]: r for r in group}
                xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
                ax_speed.bar(xs, [by_model[n]["images_per_s"] if n in by_model else 0 for n in names], width,
                             label=key)
                ax_mem.bar(xs, [(by_model[n]["peak_memory_mib"] or 0) if n in by_model else 0 for n in names],
                           width, label=key)
            short = [n.replace("mae_vit_", "").replace("_patch16", "/16").replace("_patch14", "/14")
                     .replace("_patch4_28", "/4 28px") for n in names]
            for ax in (ax_speed, ax_mem):
                ax.set_xticks(list(range(len(names))), short)
                ax.set_yscale("log")
            ax_speed.legend(fontsize=7)
        else:
            xs = [r[axis] for r in sel]
            ax_speed.plot(xs, [r["images_per_s"] for r in sel], "o-")
            ax_mem.plot(xs, [r["peak_memory_mib"] or 0 for r in sel], "o-")
            if axis == "batch_size":
                for ax in (ax_speed, ax_mem):
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(xs, [str(x) for x in xs])
            for ax in (ax_speed, ax_mem):
                ax.set_ylim(bottom=0)
        ax_speed.set_ylabel("images / s (training)")
        ax_mem.set_ylabel("peak memory (MiB)")
        for ax in (ax_speed, ax_mem):
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
        first = sel[0]
        fig.suptitle(f"{first['model'] if axis != 'model' else 'model size'}, {first['precision']}, "
                     f"img {first['img_size']}" + (f", batch {first['batch_size']}" if axis != "batch_size" else ""),
                     fontsize=10)
        fig.text(0.5, -0.02, caption, ha="center", va="top", fontsize=7, wrap=True)
        path = out_dir / f"scaling_{axis}.png"
        atomic_write_path(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))  # type: ignore[misc]  # a default-argument lambda binds this figure
        written.append(path)
    return written


def plot_data(rows: Sequence[dict], out_path: Path, caption: str) -> Path:
    """Images/s of the input pipeline per worker count, one line per decoder."""
    from matplotlib.figure import Figure  # slow to import: only when a plot is drawn

    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for decoder in dict.fromkeys(r["decoder"] for r in rows):
        sel = [r for r in rows if r["decoder"] == decoder]
        ax.plot([r["workers"] for r in sel], [r["images_per_s"] for r in sel], "o-", label=decoder)
    ax.set_xlabel("DataLoader workers (0 = main process)")
    ax.set_ylabel("images / s (decoded + augmented, 224 px)")
    ax.set_xticks(sorted({r["workers"] for r in rows}))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.text(0.5, -0.02, caption, ha="center", va="top", fontsize=7, wrap=True)
    atomic_write_path(out_path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    return out_path
