"""A self-contained HTML report (images embedded as data URIs): curves, reconstructions, an accuracy table, run
times and the machine, for the demo and for anyone who wants to show a run."""

from __future__ import annotations

import base64
import html
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mae.files import atomic_write_path, write_text


def machine_info() -> dict[str, str]:
    """What ran it: CPU model and cores, GPU if any, memory, OS, Python and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": f"{cpu} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)",
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": torch.__version__}
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages * page_size / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    import timm  # slow to import: only for its version, when a report is written

    info["timm"] = timm.__version__
    return info


@dataclass
class Report:
    """Sections in order; `write` renders them into one HTML file."""

    title: str
    intro: str = ""
    sections: list[str] = field(default_factory=list)

    def add_text(self, heading: str, paragraphs: Sequence[str]) -> None:
        body = "".join(f"<p>{p}</p>" for p in paragraphs)  # callers pass trusted, already-escaped text
        self.sections.append(f"<h2>{html.escape(heading)}</h2>{body}")

    def add_image(self, heading: str, png: str | Path, caption: str = "") -> None:
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.sections.append(f"<h2>{html.escape(heading)}</h2><figure><img alt='{html.escape(heading)}' "
                             f"src='data:image/png;base64,{data}'>{cap}</figure>")

    def add_code(self, heading: str, text: str) -> None:
        """A preformatted block (a config, a command), escaped."""
        self.sections.append(f"<h2>{html.escape(heading)}</h2><pre>{html.escape(text)}</pre>")

    def add_table(self, heading: str, header: Sequence[str], rows: Sequence[Sequence[object]], note: str = "") -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows)
        extra = f"<p class='note'>{note}</p>" if note else ""
        self.sections.append(f"<h2>{html.escape(heading)}</h2><table><thead><tr>{head}</tr></thead>"
                             f"<tbody>{body}</tbody></table>{extra}")

    def write(self, path: str | Path) -> Path:
        page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 980px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }}
h1 {{ font-size: 1.7em; margin-bottom: 0.2em; }}
h2 {{ font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ padding: 0.35em 0.9em; border-bottom: 1px solid #e5e5e5; text-align: left; }}
th {{ background: #f5f5f7; }}
td:not(:first-child) {{ font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption, .note, .intro {{ color: #555; font-size: 0.92em; }}
pre {{ background: #f5f5f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }}
.ok {{ color: #0a7d2c; font-weight: 600; }} .bad {{ color: #b00020; font-weight: 600; }}
</style></head><body>
<h1>{html.escape(self.title)}</h1><p class="intro">{self.intro}</p>
{''.join(self.sections)}
</body></html>
"""
        return write_text(path, page)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"
    return "-" if value is None else str(value)


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """`training_curves_figure` written as a PNG at `out_png` (atomically)."""
    fig = training_curves_figure(metrics_jsonl)
    return atomic_write_path(out_png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def training_curves_figure(metrics_jsonl: str | Path):
    """Loss and learning rate per optimizer update, side by side; a series of a few points (one, for a 1-epoch run)
    is drawn with markers so that it shows."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's global state alone

    def marker(points: Sequence[object]) -> str | None:
        return "o" if len(points) <= 20 else None  # a line through one point draws nothing

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r and "epoch_loss" not in r]
    epochs = [r for r in rows if "epoch_loss" in r]
    fig = Figure(figsize=(9, 3.2), layout="tight")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.6, label="per logged step",
             marker=marker(steps), ms=3)
    if epochs:
        ax1.plot([r["step"] for r in epochs], [r["epoch_loss"] for r in epochs], marker="o", ms=3, label="epoch mean")
    ax1.set_xlabel("optimizer update")
    ax1.set_ylabel("masked-patch loss")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:orange", marker=marker(steps), ms=3)
    ax2.set_xlabel("optimizer update")
    ax2.set_ylabel("learning rate")
    ax2.grid(alpha=0.3)
    return fig
