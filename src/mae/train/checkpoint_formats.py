"""The one table of checkpoint kinds (`FORMAT_BY_KIND`: the ``format`` tag of each kind of run; `COMMANDS`: the
commands that write training checkpoints), and what kind a loaded checkpoint is (`kind_of_state`), so that every
reader names a file of another kind for what it is in one line ("'x.pth' is a fine-tuning checkpoint (mae finetune);
resume it with ...").

Training checkpoints hold a whole run state (resumable); their ``format`` tag says the run's kind and a classifier's
head tells fine-tuning (``linear``) from linear probing (``bn_linear``). Each is one ``.pth`` file or a DCP directory
(an fsdp run's sharded state). Everything else is weights only: pre-trained MAE weights (encoder + decoder),
encoder-only weights, or a classifier's weights.

This module reads no file and imports nothing but `mae.errors`, so the checkpoint stores below the readers and the
readers above them share one table; what a file on disk is (`kind_of`, `describe`, `check_resume`) is
`mae.train.checkpoint_kinds`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mae.errors import CheckpointError

__all__ = ["COMMANDS", "FORMAT_BY_KIND", "FROM_WEIGHTS", "KIND_BY_FORMAT", "RUNS", "RUN_FORMATS", "Kind",
           "kind_of_state", "kind_of_transformers", "kind_of_weights", "recipe_command", "refuse_resume"]

# ---------------------------------------------------------------------------------------------------- the table
FORMAT_BY_KIND = {"pretrain": "mae-train", "classify": "mae-classifier", "detect": "mae-detect",
                  "segment": "mae-segment"}
"""Every kind of run that writes training checkpoints (`mae.train.run.Run.kind`, a checkpoint's ``kind`` entry) and
the ``format`` tag of its checkpoints: the only place the tags are spelled."""
KIND_BY_FORMAT = {fmt: kind for kind, fmt in FORMAT_BY_KIND.items()}
"""A checkpoint's ``format`` tag -> the kind of run that wrote it."""
COMMANDS = {"pretrain": ("pretrain", "pre-training"), "finetune": ("classify", "fine-tuning"),
            "linprobe": ("classify", "linear-probe"), "detect": ("detect", "detection"),
            "segment": ("segment", "segmentation")}
"""The commands whose runs write training checkpoints: command -> (kind of run, what its checkpoints are called)."""
RUNS = {command: label for command, (_, label) in COMMANDS.items()}
"""Command -> what its checkpoints are called (a view of `COMMANDS`)."""
RUN_FORMATS = {command: FORMAT_BY_KIND[kind] for command, (kind, _) in COMMANDS.items()}
"""Command -> the ``format`` tag of its training checkpoints (a view of `COMMANDS` and `FORMAT_BY_KIND`)."""
FROM_WEIGHTS = {"finetune": "checkpoint", "linprobe": "checkpoint", "knn": "checkpoint",
                "detect": "backbone.checkpoint", "segment": "backbone.checkpoint"}
"""Commands that start from pre-trained weights, and the setting that takes them."""
_CLASSIFIER = FORMAT_BY_KIND["classify"]  # one tag, two commands: the head tells them apart


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
    if fmt == _CLASSIFIER:
        config = state.get("classifier_config")
        head = config.get("head") if isinstance(config, Mapping) else None
        command = "linprobe" if head == "bn_linear" else "finetune" if head is not None else None
        return _training(command, fmt, dcp, head=True)
    command = next((c for c, f in RUN_FORMATS.items() if f == fmt and f != _CLASSIFIER), None)
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


def kind_of_transformers(model_type: object) -> Kind | None:
    """The kind of a transformers directory, by its ``config.json``'s ``model_type``."""
    if model_type == "vit":
        return Kind("a transformers ViT classifier (a head, no training state)", "`mae evaluate`, export and convert",
                    head=True)
    if model_type == "vit_mae":
        return Kind("pre-trained MAE weights (transformers ViTMAE, no training state)", f"visualize, {_ENCODER_USES}")
    return None


# ---------------------------------------------------------------------------------------------------- checking
def recipe_command(config: Any) -> str:
    """The command of a recipe config (class or instance): the name of the module that defines it
    (``mae.recipes.finetune.FinetuneConfig`` -> ``finetune``)."""
    cls = config if isinstance(config, type) else type(config)
    return cls.__module__.rpartition(".")[2]




def refuse_resume(path: str | Path, command: str, kind: Kind | None, state: Mapping[str, Any] | None = None) -> None:
    """Raise CheckpointError when a file of `kind` (read from `path`; its loaded `state` if there is one) is not a
    training checkpoint that ``mae {command} --resume`` continues, naming what it is and the command that takes it.
    A file of no known kind passes (its reader says what is wrong), as does any file for a command that writes no
    training checkpoints."""
    fmt = RUN_FORMATS.get(command)
    if fmt is None:
        return
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
