"""ImageNet-C's mean Corruption Error (Hendrycks & Dietterich, ICLR 2019; the IN-C row of the MAE paper's Table 13).

For a classifier f, corruption c and severity s, E(f, c, s) is the top-1 error on the images of ``<c>/<s>/``. The
Corruption Error normalises the error summed over the severities by AlexNet's:

    CE(f, c) = sum_s E(f, c, s) / sum_s E(AlexNet, c, s)        mCE(f) = mean over the 15 corruptions of CE(f, c)

both in percent. `ALEXNET_ERRORS` holds AlexNet's published per-severity errors; their means per corruption are the
values the benchmark's users normalise by (e.g. AugMix's ``ALEXNET_ERR``: 0.886428 for gaussian_noise, ...). When
only some corruptions or severities are present, the sums run over those present (and `CorruptionReport.complete`
is False): such an mCE is not comparable with published ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mae.data.corruptions import CORRUPTIONS, SEVERITIES
from mae.errors import DataError

ALEXNET_ERRORS: dict[str, tuple[float, float, float, float, float]] = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.94870, 0.98720, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.58430, 0.70048, 0.82108, 0.89750, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.91870, 0.94952),
    "frost": (0.61390, 0.79734, 0.88790, 0.89942, 0.93430),
    "fog": (0.67474, 0.76050, 0.84378, 0.87260, 0.94500),
    "brightness": (0.45140, 0.48502, 0.54048, 0.62166, 0.72440),
    "contrast": (0.64548, 0.76150, 0.88874, 0.97760, 0.99270),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.54620, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}
"""AlexNet's top-1 error (fraction) on ImageNet-C, per corruption, severities 1..5 (Hendrycks & Dietterich, 2019)."""

PAPER_MCE = {"mae_vit_base": 51.7, "mae_vit_large": 41.8, "mae_vit_huge": 33.8, "mae_vit_huge_448": 36.8}
"""The MAE paper's IN-C mCE (Table 13, lower is better), for the fine-tuned models of its Table 3."""


def corruption_folders(root: str | Path) -> dict[str, dict[int, Path]]:
    """``{corruption: {severity: folder}}`` of an ImageNet-C tree ``<root>/<corruption>/<severity>/<class>/...``
    (only the benchmark's corruption names and severities 1-5; other folders, e.g. ``clean/``, are ignored)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"ImageNet-C folder '{root}' does not exist; give the folder that holds "
                        f"<corruption>/<severity>/<class>/ (make one with `mae corrupt`)")
    found: dict[str, dict[int, Path]] = {}
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            folder = root / name / str(severity)
            if folder.is_dir() and any(e.is_dir() for e in os.scandir(folder)):
                found.setdefault(name, {})[severity] = folder
    if not found:
        raise DataError(f"'{root}' holds no <corruption>/<severity>/<class>/ folders (corruptions: "
                        f"{', '.join(CORRUPTIONS[:3])}, ...; severities 1-5); is it an ImageNet-C tree?")
    return found


@dataclass
class CorruptionReport:
    """Errors per corruption and severity, the Corruption Errors and their mean (percent)."""

    errors: dict[str, dict[int, float]]  # top-1 error in percent
    ce: dict[str, float]  # Corruption Error per corruption, percent of AlexNet's
    mce: float
    mean_error: float  # unnormalised: the mean top-1 error over every (corruption, severity) scored
    clean_error: float | None = None
    complete: bool = False  # all 15 corruptions x 5 severities
    images: dict[str, dict[int, int]] = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        """Mean corrupted error minus the clean error (points): what the corruptions cost."""
        return None if self.clean_error is None else self.mean_error - self.clean_error


def corruption_report(errors: Mapping[str, Mapping[int, float]], clean_error: float | None = None,
                      images: Mapping[str, Mapping[int, int]] | None = None) -> CorruptionReport:
    """CE and mCE from top-1 errors in percent, ``{corruption: {severity: error}}``."""
    if not errors:
        raise DataError("no corruption was scored: the mCE needs at least one <corruption>/<severity> folder")
    ce = {}
    for name, by_severity in errors.items():
        if name not in ALEXNET_ERRORS:
            raise DataError(f"'{name}' is not an ImageNet-C corruption; valid: {', '.join(CORRUPTIONS)}")
        if not by_severity:
            raise DataError(f"corruption '{name}' has no severity scored")
        ours = sum(by_severity[s] / 100 for s in by_severity)
        alexnet = sum(ALEXNET_ERRORS[name][s - 1] for s in by_severity)
        ce[name] = 100 * ours / alexnet
    values = [e for by_severity in errors.values() for e in by_severity.values()]
    complete = set(errors) == set(CORRUPTIONS) and all(set(e) == set(SEVERITIES) for e in errors.values())
    ordered = {n: {s: float(errors[n][s]) for s in sorted(errors[n])} for n in CORRUPTIONS if n in errors}
    return CorruptionReport(errors=ordered, ce={n: ce[n] for n in ordered}, mce=sum(ce.values()) / len(ce),
                            mean_error=sum(values) / len(values), clean_error=clean_error, complete=complete,
                            images={n: dict(v) for n, v in (images or {}).items()})


def report_csv(report: CorruptionReport) -> str:
    """One row per corruption: its error at each severity, the error sum, AlexNet's sum over the same severities,
    and CE; then an 'mCE' row."""
    lines = ["corruption," + ",".join(f"error_s{s}" for s in SEVERITIES) + ",error_sum,alexnet_error_sum,ce"]
    for name, by_severity in report.errors.items():
        cells = [f"{by_severity[s]:.4f}" if s in by_severity else "" for s in SEVERITIES]
        alexnet = 100 * sum(ALEXNET_ERRORS[name][s - 1] for s in by_severity)
        lines.append(",".join([name, *cells, f"{sum(by_severity.values()):.4f}", f"{alexnet:.4f}",
                               f"{report.ce[name]:.4f}"]))
    lines.append("mCE," + "," * len(SEVERITIES) + ",," + f"{report.mce:.4f}")
    return "\n".join(lines) + "\n"


def report_markdown(report: CorruptionReport, title: str = "ImageNet-C") -> str:
    """The per-corruption table (top-1 error per severity, CE) with the mCE and the clean-vs-corrupted gap."""
    caveat = "" if report.complete else ": a subset of the benchmark, not comparable with published mCE values"
    headline = (f"**mCE {report.mce:.1f}** (mean over {len(report.ce)} corruption(s) of CE = error summed over the "
                f"severities / AlexNet's; lower is better){caveat}")
    out = [f"# {title}", "", headline, ""]
    if report.clean_error is not None:
        out += [(f"clean top-1 error {report.clean_error:.2f}%, mean corrupted error {report.mean_error:.2f}%: "
                 f"gap {report.gap:+.2f} points"), ""]
    else:
        out += [f"mean corrupted error {report.mean_error:.2f}% (no clean set scored: pass clean_data=...)", ""]
    out += ["| corruption | " + " | ".join(f"s{s}" for s in SEVERITIES) + " | CE |",
            "|---|" + "---|" * (len(SEVERITIES) + 1)]
    for name, by_severity in report.errors.items():
        cells = [f"{by_severity[s]:.1f}" if s in by_severity else "-" for s in SEVERITIES]
        out.append(f"| {name} | " + " | ".join(cells) + f" | {report.ce[name]:.1f} |")
    return "\n".join(out) + "\n"


def summary_fields(report: CorruptionReport) -> dict:
    """The report as flat JSON-friendly fields for summary.json."""
    return {"mCE": report.mce, "mean_corrupted_error": report.mean_error,
            "mean_corrupted_top1": 100 - report.mean_error, "clean_error": report.clean_error,
            "clean_top1": None if report.clean_error is None else 100 - report.clean_error,
            "clean_corrupted_gap": report.gap, "complete": report.complete,
            "corruption_errors": {n: report.ce[n] for n in report.ce},
            "errors": {n: {str(s): e for s, e in v.items()} for n, v in report.errors.items()},
            "corruptions_scored": len(report.ce),
            "corruptions_missing": [c for c in CORRUPTIONS if c not in report.ce]}

