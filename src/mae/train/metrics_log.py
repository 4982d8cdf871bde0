"""Run metrics: one JSON line per record in ``metrics.jsonl`` (plus TensorBoard), progress bars, and loss plots.

Library code never prints: progress goes through tqdm (on stderr), messages through the `logging` module.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from mae.errors import MAEError, OutputError
from mae.files import atomic_write_path, fix_for, reason_of, write_text

__all__ = ["MetricsLogger", "draw_curves", "plot_curves", "progress", "truncate_metrics"]

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from typing_extensions import Self

T = TypeVar("T")


class MetricsLogger:
    """Append metric records to ``output_dir/metrics.jsonl`` and, when tensorboard is installed, to TensorBoard.

    Disabled loggers (``enabled=False``, e.g. on ranks other than 0) write nothing. Records are flushed line by
    line so that a crashed run keeps everything logged before the crash. A file that cannot be written (a full disk,
    a read-only folder) raises `OutputError` with the fix.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 purge_step: int | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.path = self.output_dir / "metrics.jsonl"
        self._file = None
        self._writer = None
        self._count = 0
        if not enabled:
            return
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # unbuffered: a line that could not be written is not kept in a buffer to fail again at close()
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (closed in close())
        except OSError as e:
            raise OutputError(f"could not write '{self.path}': {reason_of(e)}; {fix_for(e)}") from e
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                _log.debug("tensorboard is not installed; logging to %s only", self.path)
            else:
                # purge_step: a resumed run drops the events logged after its checkpoint (they are redone)
                board = self.output_dir / "tensorboard"
                try:
                    self._writer = SummaryWriter(log_dir=str(board), purge_step=purge_step)
                except OSError as e:
                    self.close()
                    raise OutputError(f"could not write '{board}': {reason_of(e)}; {fix_for(e)}") from e

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Write one record; `step` (or ``metrics['step']``, else a running count) is the TensorBoard x-axis."""
        if not self.enabled or self._file is None:
            return
        record = {k: _plain(v) for k, v in metrics.items()}
        if step is None:
            step = record.get("step") if isinstance(record.get("step"), int) else self._count
        line = (json.dumps(record) + "\n").encode("utf-8")
        start = self._file.tell()
        try:
            written = self._file.write(line)
            if written != len(line):  # a short write: the disk filled up within the line
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        except OSError as e:
            with contextlib.suppress(OSError):  # no half line left for the next reader
                os.ftruncate(self._file.fileno(), start)
            raise OutputError(f"could not write '{self.path}': {reason_of(e)}; {fix_for(e)}") from e
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, global_step=step)
        self._count += 1

    def close(self) -> None:
        """Flush and close the files (safe to call twice)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:  # TensorBoard's events are a convenience copy of metrics.jsonl: a failed flush only warns
                writer.close()
            except Exception as e:  # noqa: BLE001 (its writer thread raises whatever the file system raised)
                _log.warning("TensorBoard events in '%s' may be incomplete: %s", self.output_dir / "tensorboard",
                             " ".join(str(e).split())[:200])
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _plain(value: Any) -> Any:
    """JSON-ready value: one-element tensors and numpy scalars become numbers, non-finite floats stay floats."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.generic, np.ndarray)):
        return value.item() if value.size == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def truncate_metrics(path: str | Path, max_step: int) -> int:
    """Drop the records of a metrics.jsonl file logged after update `max_step` (a resumed run redoes them, so they
    would appear twice); returns how many were dropped. Records without a step are kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    records = _read_records(path)
    kept = [r for r in records if not isinstance(r.get("step"), (int, float)) or r["step"] <= max_step]
    dropped = len(records) - len(kept)
    if dropped or path.read_bytes()[-1:] not in (b"", b"\n"):
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return dropped


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True) -> tqdm:
    """A tqdm bar over `iterable` (ETA and rate included); call ``bar.set_postfix(loss=..., lr=...)`` to show metrics.

    Redraws at most once a second so that long runs writing to a log file stay readable.
    """
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, mininterval=1.0, dynamic_ncols=True, leave=False)


def plot_curves(metrics_jsonl_path: str | Path, out_png: str | Path, keys: Sequence[str] = ("loss", "lr")) -> Path:
    """Plot each of `keys` against ``step`` (or the record number) from a metrics.jsonl file, one panel per key.

    Points are drawn as markers where a line alone would show nothing (a panel with one value, e.g. every 1-epoch
    run's epoch metrics) or too little (a few values)."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's global state alone

    few_points = 20  # series up to this long get markers

    src, out = Path(metrics_jsonl_path), Path(out_png)
    records = _read_records(src)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for key in keys:
        xs, ys = [], []
        for i, rec in enumerate(records):
            value = rec.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                xs.append(rec.get("step", i))
                ys.append(value)
        if xs:
            series[key] = (xs, ys)
    if not series:
        raise MAEError(f"'{src}' has no values for {', '.join(map(repr, keys))}; pick keys that the run logged")

    fig = Figure(figsize=(7, 2.6 * len(series)), layout="constrained")
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, (xs, ys)) in zip(axes, series.items(), strict=True):
        ax.plot(xs, ys, linewidth=1.0, marker="o" if len(xs) <= few_points else None, markersize=4)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(src.parent.name or str(src))
    return atomic_write_path(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def draw_curves(out: str | Path, keys: Sequence[str], name: str = "curves.png") -> dict[str, str]:
    """``plot_curves`` of a run's metrics.jsonl into `name`; a plot is a convenience, so a failure only warns.
    Returns ``{"curves_png": path}`` when drawn."""
    out = Path(out)
    try:
        return {"curves_png": str(plot_curves(out / "metrics.jsonl", out / name, keys=keys))}
    except (MAEError, OSError, ValueError) as e:
        _log.warning("could not draw %s: %s", name, e)
        return {}


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file; a half-written last line (a run killed mid-write) is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MAEError(f"could not read metrics file '{path}': {e.strerror or e}; check the run directory") from e
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise MAEError(f"metrics file '{path}' has a broken line {number}; remove it and plot again") from None
        if isinstance(record, dict):
            records.append(record)
    return records
