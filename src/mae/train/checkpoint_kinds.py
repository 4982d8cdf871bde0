"""What kind of checkpoint a file is, and which command takes it, so that every reader names a file of another kind
for what it is in one line ("'x.pth' is a fine-tuning checkpoint (mae finetune); resume it with ...").

Training checkpoints hold a whole run state (resumable); their ``format`` tag says the recipe family
(`mae.train.checkpoint.TRAINING_FORMATS`) and a classifier's head tells fine-tuning (``linear``) from linear probing
(``bn_linear``). Each is one ``.pth`` file or a DCP directory (an fsdp run's sharded state). Everything else is
weights only: pre-trained MAE weights (encoder + decoder), encoder-only weights, or a classifier's weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mae.errors import CheckpointError

RUNS = {"pretrain": "pre-training", "finetune": "fine-tuning", "linprobe": "linear-probe", "detect": "detection",
        "segment": "segmentation"}
"""The commands whose runs write training checkpoints, and what their checkpoints are called."""
RUN_FORMATS = {"pretrain": "mae-train", "finetune": "mae-classifier", "linprobe": "mae-classifier",
               "detect": "mae-detect", "segment": "mae-segment"}
"""The ``format`` tag of each command's training checkpoints."""
FROM_WEIGHTS = {"finetune": "checkpoint", "linprobe": "checkpoint", "knn": "checkpoint",
                "detect": "backbone.checkpoint", "segment": "backbone.checkpoint"}
"""Commands that start from pre-trained weights, and the setting that takes them."""


@dataclass(frozen=True)
class Kind:
    """One kind of checkpoint: what to call it, the run that wrote it (None: weights only) and what takes it."""

    label: str  # "a fine-tuning checkpoint (mae finetune)", "pre-trained MAE weights (encoder + decoder, ...)"
    uses: str  # the commands that take it: "`mae finetune --resume`, `mae evaluate`, export and convert"
    command: str | None = None  # the run that wrote it, for a training checkpoint
    format: str | None = None  # its format tag, for a training checkpoint
    head: bool = False  # it holds a classifier head

    def what(self, path: str | Path) -> str:
        """"'PATH' is a ... checkpoint (mae CMD)" or "'PATH' holds ... weights (...)" (a message's start)."""
        return f"'{path}' {'is' if self.format is not None else 'holds'} {self.label}"

    def named(self, path: str | Path) -> str:
        """`what` and the commands that take the file."""
        return f"{self.what(path)}, for {self.uses}"


_ENCODER_USES = "mae finetune / linprobe / knn (checkpoint=...), embed, attention, export and convert"


# ---------------------------------------------------------------------------------------------------- detecting
def kind_of_state(state: Mapping[str, Any]) -> Kind | None:
    """The kind of a loaded checkpoint (`mae.train.checkpoint.safe_load` / `peek`, or a DCP directory's meta)."""
    fmt = state.get("format")
    dcp = "dcp" in state
    if fmt == "mae-classifier":
        config = state.get("classifier_config")
        head = config.get("head") if isinstance(config, Mapping) else None
        command = "linprobe" if head == "bn_linear" else "finetune" if head is not None else None
        return _training(command, fmt, dcp, head=True)
    command = next((c for c, f in RUN_FORMATS.items() if f == fmt and f != "mae-classifier"), None)
    if command is not None:
        return _training(command, fmt, dcp)  # type: ignore[arg-type]  # fmt equals a RUN_FORMATS value: a str
    weights = next((state[k] for k in ("model", "state_dict") if isinstance(state.get(k), Mapping)), state)
    return kind_of_weights(str(k) for k in weights)


def _training(command: str | None, fmt: str, dcp: bool, **facts: bool) -> Kind:
    """A training checkpoint of `command`'s run (None: a classification run of no known recipe), file or DCP."""
    run = f"{RUNS[command]} run (mae {command})" if command else "classification run"
    label = (f"a DCP checkpoint (sharded training state) of a {run}" if dcp else
             f"a {RUNS[command]} checkpoint (mae {command})" if command else "a classification checkpoint")
    resume = f"`mae {command} --resume`" if command else "resuming its run"
    if command == "pretrain":
        uses = f"{resume}, and as weights for visualize, {_ENCODER_USES}"
    elif command in ("detect", "segment"):
        uses = f"{resume} and `mae {command} mode=evaluate weights=...`"
    else:
        uses = f"{resume}, `mae evaluate`, export and convert"
    return Kind(label, uses, command, fmt, **facts)


def kind_of_weights(keys: Iterable[str]) -> Kind | None:
    """The kind of a bare state dict, by its keys (ours, the reference's, timm's or transformers' names)."""
    keys = [k.removeprefix("module.") for k in keys]
    if any(k.startswith(("head.", "classifier.")) for k in keys):
        return Kind("a classifier's weights (a head, no training state)", "`mae evaluate`, export and convert",
                    head=True)
    if any(k.startswith(("decoder", "mask_token")) for k in keys):
        return Kind("pre-trained MAE weights (encoder + decoder, no training state)", f"visualize, {_ENCODER_USES}")
    if any(k.startswith(("blocks.", "patch_embed.", "vit.", "encoder.", "cls_token")) for k in keys):
        return Kind("encoder-only weights (no decoder, no training state)", _ENCODER_USES)
    return None


def kind_of(path: str | Path) -> Kind | None:
    """The kind of a checkpoint file, DCP directory, transformers directory or run directory (its newest training
    checkpoint), read cheaply: a ``.pth`` memory-mapped, a safetensors file's keys, a DCP directory's meta.pt. None
    when it is unreadable or of no kind this library knows (its reader then says what is wrong)."""
    from mae.train.checkpoint import peek
    from mae.train.dcp import is_dcp_checkpoint, read_meta

    path = Path(path).expanduser()
    try:
        if is_dcp_checkpoint(path):
            return kind_of_state(read_meta(path))
        if path.is_dir():
            kind = _kind_of_dir(path)
            if kind is not None and kind.label.endswith(")") and " checkpoint (" in kind.label:  # say what it is
                kind = replace(kind, label=kind.label.replace(" checkpoint (", " run directory (", 1))
            return kind
        if path.suffix == ".safetensors":
            return _kind_of_safetensors(path)
        return kind_of_state(peek(path)) if path.is_file() else None
    except (CheckpointError, OSError, ValueError, RuntimeError, AttributeError):
        return None


def _kind_of_safetensors(path: Path) -> Kind | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return kind_of_weights(f.keys())
    except SafetensorError:
        return None


def _kind_of_dir(path: Path) -> Kind | None:
    """A run directory: its newest training checkpoint (file or DCP), else its weights; a transformers directory."""
    from mae.train.checkpoint import CheckpointManager
    from mae.train.dcp import newest_valid

    manager = CheckpointManager(path)
    for file in (manager.last_path, *(p for _, p in reversed(manager.numbered())), manager.best_path):
        if file.is_file() and (kind := kind_of(file)) is not None:
            return kind
    sharded = newest_valid(path)
    if sharded is not None:
        return kind_of_state(sharded[1])
    if (path / "model.safetensors").is_file():
        return kind_of(path / "model.safetensors")
    if (path / "config.json").is_file():
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type == "vit":
            return Kind("a transformers ViT classifier (a head, no training state)",
                        "`mae evaluate`, export and convert", head=True)
        if model_type == "vit_mae":
            return Kind("pre-trained MAE weights (transformers ViTMAE, no training state)",
                        f"visualize, {_ENCODER_USES}")
    return None


# ---------------------------------------------------------------------------------------------------- checking
def recipe_command(config: Any) -> str:
    """The command of a recipe config (class or instance): the name of the module that defines it
    (``mae.recipes.finetune.FinetuneConfig`` -> ``finetune``)."""
    cls = config if isinstance(config, type) else type(config)
    return cls.__module__.rpartition(".")[2]


def check_resume(path: str | Path, command: str, state: Mapping[str, Any] | None = None) -> None:
    """Raise CheckpointError when `path` (or its loaded `state`) is not a training checkpoint that
    ``mae {command} --resume`` continues, naming what it is and the command that takes it. A file of no known kind
    passes (its reader says what is wrong), as does any file for a command that writes no training checkpoints."""
    fmt = RUN_FORMATS.get(command)
    if fmt is None:
        return
    kind = kind_of_state(state) if state is not None else kind_of(path)
    if kind is None:
        if state is not None and state.get("format") != fmt:
            raise CheckpointError(f"'{path}' is not a training checkpoint of a {RUNS[command]} run (its format is "
                                  f"{state.get('format')!r}); resume from the run's own checkpoint-last.pth (or "
                                  f"--resume auto)")
        return
    if kind.format == fmt and kind.command in (None, command):
        return
    if kind.format is not None and kind.command is not None:
        fix = f"resume it with `mae {kind.command} --resume {path}`"
    else:
        fix = (f"there is no training state to resume: resume from a {RUNS[command]} run's checkpoint-last.pth (or "
               f"--resume auto)")
    start = FROM_WEIGHTS.get(command)
    if start and not kind.head and kind.command in (None, "pretrain"):
        fix += f", or start a new {RUNS[command]} run from its weights with {start}={path}"
    raise CheckpointError(f"{kind.what(path)}; {fix}")


def describe(path: str | Path, kind: Kind | None = None, fallback: str | None = None) -> str:
    """The start of a reader's message about a file it cannot use: what the file is and what takes it
    ("'PATH' is a fine-tuning checkpoint (mae finetune), for `mae finetune --resume`, `mae evaluate`, ..."), or
    `fallback` (default "'PATH'") for a file of no known kind."""
    kind = kind or kind_of(path)
    return kind.named(path) if kind is not None else (fallback or f"'{path}'")
