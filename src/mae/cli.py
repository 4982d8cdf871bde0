"""``mae <command>``: parses arguments, dispatches to a recipe's ``run``, and turns user errors into one line.

Every training command reads its config the same way: built-in defaults <- ``--config FILE`` <- ``--data``,
``--output-dir``, ``--resume`` <- dotted ``key=value`` overrides (e.g. ``model.patch_size=4 epochs=20``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence

from mae.errors import ConfigError, Interrupted, MAEError
from mae.version import __version__

EXIT_USER_ERROR = 2


# Commands whose settings are a config dataclass: name -> (help, module). Each module defines a dataclass
# `CONFIG`-named class listed here, a `run(cfg) -> dict` and optionally `CLI_FLAGS` {flag: dotted key}.
CONFIG_COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("pre-train a masked autoencoder", "mae.recipes.pretrain.PretrainConfig"),
    "finetune": ("end-to-end or partial fine-tuning, or supervised training from scratch",
                 "mae.recipes.finetune.FinetuneConfig"),
    "linprobe": ("linear probing of a frozen encoder", "mae.recipes.linprobe.LinprobeConfig"),
    "knn": ("weighted k-NN classification on frozen features", "mae.recipes.knn.KnnConfig"),
    "evaluate": ("top-1 / top-5, per-class accuracy and confusion matrix of a classifier",
                 "mae.recipes.evaluate.EvaluateConfig"),
    "corrupt": ("write an ImageNet-C-style folder (<corruption>/<severity>/<class>/) from a validation set",
                "mae.recipes.corrupt.CorruptConfig"),
    "bench": ("time training steps: images/s, memory, FLOPs, MFU, paper Table 2 ratios",
              "mae.recipes.bench.BenchConfig"),
    "demo": ("pre-train on embedded MNIST, evaluate against baselines, write runs/demo/report.html",
             "mae.recipes.demo.DemoConfig"),
    "sweep": ("run a grid of pre-training configs, each probed and fine-tuned, into one results table",
              "mae.recipes.sweep.SweepConfig"),
    "detect": ("Mask R-CNN detection and instance segmentation with an MAE backbone (train / evaluate)",
               "mae.recipes.detect.DetectConfig"),
    "segment": ("UperNet semantic segmentation with an MAE backbone (train / evaluate)",
                "mae.recipes.segment.SegmentConfig"),
    "embed": ("features of every image with a pre-trained encoder: mae embed CHECKPOINT --data DIR --out FILE",
              "mae.recipes.embed.EmbedConfig"),
    "prepare": ("convert an image folder into tar shards (webdataset layout) for --data shards:DIR",
                "mae.recipes.prepare.PrepareConfig"),
}
# config commands whose leading bare words are fields: `mae embed CHECKPOINT ...` = `checkpoint=CHECKPOINT`,
# `mae prepare SRC DST` = `src=SRC dst=DST`
POSITIONAL = {"embed": ("checkpoint",), "prepare": ("src", "dst")}
_SWITCHES = ("-h", "--help", "--overwrite", "--allow-config-change", "--no-check")  # flags that take no value
# flags accepted anywhere on the line (`mae pretrain --debug` as well as `mae --debug pretrain`)
ANYWHERE = ("--debug", "--quiet")
COMMON_FLAGS = {"--data": "data.path", "--output-dir": "output_dir", "--resume": "resume", "--epochs": "epochs",
                "--precision": "precision", "--device": "device"}


def _config_command(sub, name: str, help_text: str, config_cls_path: str, full: bool = True) -> None:
    """A command whose settings are a config dataclass: --config, the common flags, then key=value overrides.

    With ``full=False`` only its name and help line are registered: its recipe module (and what that imports) is
    loaded only for the command actually run.
    """
    if not full:
        sub.add_parser(name, help=help_text)
        return
    module = __import__(config_cls_path.rsplit(".", 1)[0], fromlist=["run"])
    flags = getattr(module, "CLI_FLAGS", COMMON_FLAGS)
    p = sub.add_parser(name, help=help_text, description=help_text,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file, or the name of a shipped preset (e.g. vit_l_800ep, "
                   "pretrain/vit_l_800ep; `mae presets` lists them); with --resume and no --config, the run's own "
                   "config.yaml")
    for flag, key in flags.items():
        p.add_argument(flag, dest=key.replace(".", "__"), metavar=key.split(".")[-1].upper(),
                       help=f"shortcut for {key}=...")
    cls = _import(config_cls_path)
    # imported here, not at the top: `mae --help` stays fast
    from mae.train.run import TrainFields

    if isinstance(cls, type) and issubclass(cls, TrainFields):
        for flag, key, text in (("--overwrite", "overwrite", ("start again in an output dir that holds a previous "
                                                              "run, deleting that run's files")),
                                ("--allow-config-change", "allow_config_change", ("resume even when the settings "
                                 "change what the run computes; the change is recorded in config_changes.jsonl"))):
            p.add_argument(flag, dest=key, action="store_const", const="true", help=text)
        flags = {**flags, "--overwrite": "overwrite", "--allow-config-change": "allow_config_change"}
    elif "overwrite" in getattr(cls, "__dataclass_fields__", {}):  # the writers (embed, corrupt, prepare, ...)
        text = cls.__dataclass_fields__["overwrite"].metadata.get("help", "replace an output that already exists")
        p.add_argument("--overwrite", dest="overwrite", action="store_const", const="true", help=text)
        flags = {**flags, "--overwrite": "overwrite"}
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any config field, e.g. epochs=20")
    p.set_defaults(config_cls=config_cls_path, flags=flags, handler=_run_config_command)
    p.epilog = f"config fields (key=value):\n{_lazy_help(config_cls_path)}"


def _import(path: str):
    module, _, attr = path.rpartition(".")
    return getattr(__import__(module, fromlist=[attr]), attr)


def _lazy_help(config_cls_path: str) -> str:
    # imported here, not at the top: `mae --help` stays fast
    from mae.config import config_help

    return config_help(_import(config_cls_path))


def _run_config_command(args: argparse.Namespace) -> int:
    # imported here, not at the top: `mae --help` stays fast
    from mae.config import load_config

    overrides = list(args.overrides)
    for key in args.flags.values():
        value = getattr(args, key.replace(".", "__"), None)
        if value is not None:
            overrides.append(f"{key}={value}")
    cls = _import(args.config_cls)
    cfg = load_config(cls, args.config or _resume_base(cls, overrides), overrides)
    run = _import(args.config_cls.rsplit(".", 1)[0] + ".run")
    summary = run(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary (rank 0's), not one per process
        _print_summary(summary)
    return 0


def _override(overrides: Sequence[str], key: str) -> str | None:
    """The value the last ``key=value`` override gives, or None."""
    found = None
    for item in overrides:
        name, sep, value = item.partition("=")
        if sep and name.strip() == key:
            found = value.strip() or None
    return found


def _resume_base(cls: type, overrides: Sequence[str]):
    """With --resume and no --config, the run's own config.yaml is the base: the run continues with its own settings
    (what the command line overrides is then checked against the checkpoint). A checkpoint of another kind (another
    command's run, weights only) is refused first, named for what it is, before its run's config keys are read."""
    # imported here, not at the top: `mae --help` stays fast
    from pathlib import Path

    from mae.train.checkpoint_kinds import check_resume, recipe_command
    from mae.train.dcp import is_dcp_checkpoint

    resume = _override(overrides, "resume")
    if not resume or resume in ("null", "None"):
        return None
    if resume == "auto":
        path = Path(_override(overrides, "output_dir") or cls.__dataclass_fields__["output_dir"].default).expanduser()  # type: ignore[attr-defined]  # cls: a config dataclass
        candidate = path / "config.yaml"
    else:
        path = Path(resume).expanduser()
        candidate = (path if path.is_dir() and not is_dcp_checkpoint(path) else path.parent) / "config.yaml"
    check_resume(path, recipe_command(cls))
    if candidate.is_file():
        logging.getLogger("mae").info("resume: settings from %s", candidate)
        return candidate
    return None


def _print_summary(summary: dict) -> None:
    for key, value in summary.items():
        text = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key}: {text}")


def _cmd_visualize(args: argparse.Namespace) -> int:
    # imported here, not at the top: `mae --help` stays fast
    from mae.files import check_new_file
    from mae.interop import load_model, read_checkpoint
    from mae.interop.keys import has_decoder
    from mae.viz.reconstruction import save_reconstructions

    _check_num_images(args.num_images)
    for ratio in args.mask_ratio:
        if not (math.isfinite(ratio) and 0 <= ratio < 1):
            raise ConfigError(f"--mask-ratio must be in [0, 1) (the share of patches hidden), got {ratio}")
    check_new_file(args.out, args.overwrite)
    data, images, mean, std = _image_source(args)
    ckpt = read_checkpoint(args.checkpoint)
    if not has_decoder(ckpt.state_dict):
        # imported here, not at the top: `mae --help` stays fast
        from mae.train.checkpoint_kinds import describe

        what = describe(ckpt.path, fallback=f"{ckpt.label} holds the encoder only") if ckpt.path else ckpt.label
        raise MAEError(f"{what}: it has no MAE decoder, so its reconstructions would come from a random decoder; "
                       f"pass a full pre-training checkpoint (a pre-training run directory or its model.safetensors)")
    model = load_model(ckpt)
    out = save_reconstructions(model, data, args.out, mask_ratios=args.mask_ratio, num_images=args.num_images,
                               mean=mean, std=std, seed=args.seed, images=images)
    print(f"reconstructions: {out}")
    return 0


def _check_num_images(n: int) -> None:
    if n < 1:
        raise ConfigError(f"--num-images must be at least 1, got {n}")


def _add_image_flags(p: argparse.ArgumentParser) -> None:
    """--data and --images: which images a command that draws pictures draws, the same on each (`_image_source`)."""
    p.add_argument("--data", metavar="FOLDER", help="draw images of this dataset's validation split: a folder or "
                   "builtin:<name> (default: the run's own dataset, read from its config.yaml); not with --images")
    p.add_argument("--images", nargs="+", metavar="IMAGE", help="draw these image files, of any size and mode (a "
                   "folder: every image below it); not with --data")


def _image_source(args: argparse.Namespace):
    """(data, images, mean, std) of a drawing command: its --data or its --images (one line when both are given),
    else the dataset of the run its checkpoint belongs to; that run's normalisation either way."""
    if args.data is not None and args.images is not None:
        raise ConfigError("--data and --images both choose the images to draw; pass one of them")
    if args.images is not None:
        # imported here, not at the top: `mae --help` stays fast
        from mae.viz.images import image_files

        image_files(args.images)  # a missing file is named now, before the checkpoint loads
    saved = _run_data(args.checkpoint)
    data = args.data
    if data is None and args.images is None:
        if saved is None or not saved.path:
            raise MAEError("no images to draw: pass --data FOLDER (or builtin:<name>) or --images FILE ...")
        data = saved.path
    return data, args.images, getattr(saved, "mean", None), getattr(saved, "std", None)


def _run_data(checkpoint: str):
    """The data section of the run whose folder holds `checkpoint` (its config.yaml), or None: a checkpoint outside
    a run folder, a released model's name (no folder), or a run of a command without image data settings."""
    # imported here, not at the top: `mae --help` stays fast
    from pathlib import Path

    from mae.train.checkpoint_kinds import kind_of

    config_file = _run_config_file(checkpoint) if Path(checkpoint).expanduser().exists() else None
    if config_file is None:
        return None
    kind = kind_of(config_file.parent)
    command = "pretrain" if kind is None or kind.command is None else kind.command
    return _run_data_settings(config_file, command) if command in ("pretrain", "finetune", "linprobe") else None


def _run_data_settings(config_file, command: str = "pretrain"):
    """The data section of a run's config.yaml, read by the config loader (safe YAML: a Python tag is an error, never
    run; every key checked against the config of `command`, the run that wrote it). Errors name the file."""
    # imported here, not at the top: `mae --help` stays fast
    from mae.config import load_config

    try:
        return load_config(_import(CONFIG_COMMANDS[command][1]), config_file).data
    except ConfigError as e:
        if str(config_file) in str(e):
            raise
        raise ConfigError(f"the run's settings '{config_file}': {e}") from e


def _run_config_file(path: str):
    # imported here, not at the top: `mae --help` stays fast
    from pathlib import Path

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    return folder / "config.yaml" if (folder / "config.yaml").exists() else None


def _cmd_convert(args: argparse.Namespace) -> int:
    # imported here, not at the top: `mae --help` stays fast
    from mae.interop.convert_classifier import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, to=args.to, model_name=args.model, license=args.license,
                             overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    # imported here, not at the top: `mae --help` stays fast
    import difflib

    from mae.models import ARCHITECTURES, list_models

    names = list_models(args.pattern)
    if not names:
        close = difflib.get_close_matches(args.pattern.strip("*"), ARCHITECTURES, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"no registered architecture matches '{args.pattern}'; {hint}patterns are shell-style "
                          f"('*large*', 'mae_vit_base_*'); `mae models` lists all {len(ARCHITECTURES)}")
    for name in names:
        a = ARCHITECTURES[name]
        print(f"{name:32s} embed {a['embed_dim']:4d} depth {a['depth']:2d} heads {a['num_heads']:2d} "
              f"mlp {a.get('mlp_ratio', 4.0):g}x patch {a['patch_size']:2d} | decoder {a['decoder_embed_dim']} x "
              f"{a['decoder_depth']}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    # imported here, not at the top: `mae --help` stays fast
    from mae.presets import PRESETS_DIR, list_presets

    names = list_presets(args.recipe)
    if not names:
        kinds = sorted({n.split("/", 1)[0] for n in list_presets()})
        raise ConfigError(f"no presets for '{args.recipe}'; recipes with presets: {', '.join(kinds)}")
    for name in names:
        print(name)
    print(f"({len(names)} presets in {PRESETS_DIR}; use one with --config NAME)", file=sys.stderr)
    return 0


def _cmd_attention(args: argparse.Namespace) -> int:
    # imported here, not at the top: `mae --help` stays fast
    from mae.files import check_new_file
    from mae.interop import load_pretrained_model
    from mae.viz.attention import save_attention_maps

    _check_num_images(args.num_images)
    check_new_file(args.out, args.overwrite)
    data, images, mean, std = _image_source(args)
    out = save_attention_maps(load_pretrained_model(args.checkpoint), images, args.out, limit=args.num_images,
                              data=data, mean=mean, std=std)
    print(f"attention maps: {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    # imported here, not at the top: `mae --help` stays fast
    import importlib.util

    from mae.files import check_new_file
    from mae.interop.onnx_export import check_onnx, export_checkpoint_onnx

    check_new_file(args.out, args.overwrite)
    out, module, example = export_checkpoint_onnx(args.checkpoint, args.out, model_name=args.model)
    print(f"wrote {out}")
    if args.check and importlib.util.find_spec("onnxruntime") is not None:
        inputs = example.repeat(2, 1, 1, 1)  # another batch size than the exported example: the axis is dynamic
        print(f"onnxruntime vs PyTorch on {len(inputs)} random images: max |difference| "
              f"{check_onnx(out, module, inputs):.2e}")
    elif args.check:
        print("onnxruntime is not installed: the export was not checked (pip install onnxruntime)")
    return 0


def _cmd_weights(args: argparse.Namespace) -> int:
    # imported here, not at the top: `mae --help` stays fast
    from mae.weights.commands import run_command

    return run_command(args.action, args.names, print, lambda line: print(line, file=sys.stderr))


def _one_line(e: BaseException) -> str:
    """The error's own message on one line. An error raised in a DataLoader worker comes back wrapped with the
    worker's traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): keep its last
    line, the original message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.split(": ", 1)[0].replace(".", "").isidentifier() else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; with ``command`` given, only that config command is built in full (fast start-up). Long
    because it is the one declaration of every command that is not a config dataclass: the whole CLI reads in one
    place."""
    parser = argparse.ArgumentParser(prog="mae", description="Masked autoencoders (He et al., 2021): pre-train, "
                                     "fine-tune, probe, visualise and convert.")
    parser.add_argument("--version", action="version", version=f"mae {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks (accepted anywhere on the line)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (help_text, cls_path) in CONFIG_COMMANDS.items():
        try:
            _config_command(sub, name, help_text, cls_path, full=command is None or command == name)
        except ModuleNotFoundError as e:  # a recipe module that is not part of this installation
            if not cls_path.startswith(e.name or "-"):
                raise

    def command_parser(name: str, help_text: str, description: str, examples: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=description, epilog=f"examples:\n{examples}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command_parser(
        "visualize", "draw reconstructions (paper Figures 2 and 4)",
        "Draw a grid of reconstructions: for each mask ratio the masked input, the model's reconstruction and the "
        "reconstruction with the visible patches pasted back, then the original. Images come from the validation "
        "split of --data or from the files of --images (default: the run's own dataset, read from its config.yaml).",
        "  mae visualize runs/tiny\n"
        "  mae visualize runs/tiny --mask-ratio 0.5 0.75 0.9 --num-images 4 --out recon.png\n"
        "  mae visualize mae_pretrain_vit_base.pth --data /data/imagenet --seed 1\n"
        "  mae visualize mae_pretrain_vit_large.pth --images my_photo.jpg --out recon.png")
    p.add_argument("checkpoint", help="a pre-training run directory or any MAE checkpoint file the library reads")
    _add_image_flags(p)
    p.add_argument("--mask-ratio", type=float, nargs="+", default=[0.75], metavar="RATIO",
                   help="one or more mask ratios, one group of columns each (default: 0.75)")
    p.add_argument("--num-images", type=int, default=8, metavar="N", help="rows of the grid (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks (default: 0)")
    p.add_argument("--out", default="reconstructions.png", metavar="FILE.png",
                   help="where to write the PNG (default: reconstructions.png)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace FILE.png if it exists (without it an existing file is refused)")
    p.set_defaults(handler=_cmd_visualize)

    p = command_parser(
        "convert", "convert checkpoints between mae, reference, Hugging Face and timm formats",
        "Convert a checkpoint, losslessly. Pre-trained MAEs: mae (safetensors + config), reference (the original "
        "release's .pth), hf (a ViTMAEForPreTraining directory with preprocessor_config.json and a model card), "
        "timm (the encoder's state_dict, strict for timm.create_model(..., num_classes=0)). Classifiers (finetune "
        "/ linprobe checkpoints or run directories, anything with a head): timm (a directory for "
        "timm.create_model('local-dir:DIR', pretrained=True), or FILE.safetensors + FILE.json), hf "
        "(ViTForImageClassification; class-token pooling only) or reference; a linear probe's BatchNorm head is "
        "folded into one Linear. Training checkpoints (the whole run state): checkpoint (a DCP directory of an "
        "fsdp run -> one .pth file) or dcp (a .pth training checkpoint -> a DCP directory an fsdp run resumes on "
        "any number of processes); a DCP directory is also read as a source by every other format.",
        "  mae convert mae_pretrain_vit_base.pth vitb.safetensors --to mae\n"
        "  mae convert runs/vitb/model.safetensors vitb_hf --to hf --license cc-by-nc-4.0\n"
        "  mae convert runs/linprobe probe_timm --to timm\n"
        "  mae convert vit_l_encoder.pth vitl.safetensors --to mae --model mae_vit_large_patch16\n"
        "  mae convert runs/vit2b/checkpoint-last last.pth --to checkpoint\n"
        "  mae convert runs/vitb/checkpoint-last.pth runs/vitb/checkpoint-0100 --to dcp")
    p.add_argument("src", help="checkpoint file, run directory or Hugging Face directory")
    p.add_argument("dst", help="output file or directory")
    p.add_argument("--to", choices=["mae", "reference", "hf", "timm", "checkpoint", "dcp"], default="mae",
                   help="output format (default: mae)")
    p.add_argument("--model", metavar="NAME",
                   help="registered architecture (`mae models`) for files that store none, e.g. a reference .pth")
    p.add_argument("--license", default="unknown",
                   help="license of a Hugging Face model card or a timm classifier's pretrained_cfg (default: the "
                        "released weights' the source started from, else unknown), e.g. cc-by-nc-4.0")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file, or write into an existing output folder (files of the same "
                        "names are replaced, nothing else is touched; a DCP checkpoint is replaced whole); without it "
                        "an existing output is refused")
    p.set_defaults(handler=_cmd_convert)

    p = command_parser(
        "models", "list registered architectures",
        "List the registered architectures (for model.name=... and --model) with their encoder and decoder sizes.",
        "  mae models\n  mae models '*large*'\n  mae models 'mae_vit_base_*'")
    p.add_argument("pattern", nargs="?", default="*",
                   help="shell-style wildcard over the names (quote it); default: all")
    p.set_defaults(handler=_cmd_models)

    p = command_parser(
        "presets", "list the shipped YAML presets (for --config NAME)",
        "List the presets shipped inside the package: the paper's recipes (Tables 8-11) and the CPU demo configs. "
        "Any command's --config takes one by name.",
        "  mae presets\n  mae presets finetune\n  mae pretrain --config vit_l_800ep --data /data/imagenet/train")
    p.add_argument("recipe", nargs="?", help="only this recipe's presets (pretrain, finetune, linprobe, ...)")
    p.set_defaults(handler=_cmd_presets)

    p = command_parser(
        "attention", "draw the class token's attention of the last block over images",
        "For each image: the image, then the class token's attention weights in the encoder's last block for each "
        "head, then their mean over heads, drawn over the image (no masking). Images come from the files of --images "
        "or from the validation split of --data (default: the run's own dataset, read from its config.yaml).",
        "  mae attention runs/tiny --images digit.png --out attention.png\n"
        "  mae attention mae_pretrain_vit_base.pth --images photos/ --num-images 4 --out attn.png\n"
        "  mae attention mae_pretrain_vit_base.pth --data /data/imagenet --out attn.png")
    p.add_argument("checkpoint", help="a pre-training run directory or any MAE checkpoint file the library reads")
    _add_image_flags(p)
    p.add_argument("--out", default="attention.png", metavar="FILE.png", help="where to write the PNG")
    p.add_argument("--num-images", type=int, default=8, metavar="N", help="at most this many images (default: 8)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace FILE.png if it exists (without it an existing file is refused)")
    p.set_defaults(handler=_cmd_attention)

    p = command_parser(
        "export", "export a model to ONNX (MAE encoder or fine-tuned classifier)",
        "Export to ONNX with a dynamic batch axis: a pre-trained MAE as its encoder (pixel_values -> features "
        "[N, 1+L, D], no masking), a classifier (anything with a head) as logits. When onnxruntime is installed, "
        "the file is run on random images and compared with PyTorch.",
        "  mae export runs/vitb --to onnx --out vitb_encoder.onnx\n"
        "  mae export runs/finetune --to onnx --out classifier.onnx")
    p.add_argument("checkpoint", help="a run directory or any checkpoint file the library reads")
    p.add_argument("--to", choices=["onnx"], default="onnx", help="output format (default: onnx)")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="where to write the model")
    p.add_argument("--model", metavar="NAME", help="registered architecture for files that store none")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the onnxruntime comparison")
    p.add_argument("--overwrite", action="store_true",
                   help="replace FILE.onnx if it exists (without it an existing file is refused)")
    p.set_defaults(handler=_cmd_export)

    p = command_parser(
        "weights", "list, download and verify the released MAE weights (official:, hf:, timm: names)",
        "Released weights by name: `mae weights` lists the catalogue (what each holds, its target, size, licence, "
        "whether and where it is cached); download fetches names into the cache ahead of time (official files "
        "into $MAE_HOME, Hub repositories into the Hugging Face cache), checked against the published md5 and "
        "recorded; verify re-reads the cache. With MAE_OFFLINE=1 nothing touches the network. docs/weights.md "
        "has the details.",
        "  mae weights\n"
        "  mae weights download official:mae_pretrain_vit_base hf:facebook/vit-mae-base\n"
        "  mae weights verify\n"
        "  MAE_HOME=/shared/mae mae weights download official:mae_visualize_vit_large")
    # the action is checked by mae.weights.commands, not by argparse, so that a bad one is one error line
    p.add_argument("action", nargs="?", default="list", metavar="ACTION",
                   help="list (the default: every name, what it holds, its target, size, licence, whether and where "
                        "it is cached), download NAME... (fetch into the cache, checked and recorded), or verify "
                        "[NAME...] (re-read the cache; default: everything cached; exit code 2 if one is bad)")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="official:<file stem>, hf:ORG/REPO[@REVISION] or timm:<tag>")
    p.set_defaults(handler=_cmd_weights)
    return parser


def _normalise_argv(argv: list[str]) -> list[str]:
    """`--debug` / `--quiet` moved to the front wherever they stand; a command's leading bare words (`POSITIONAL`)
    turned into ``field=value`` overrides."""
    front = [a for a in argv if a in ANYWHERE]
    rest = [a for a in argv if a not in ANYWHERE]
    command_at = next((i for i, a in enumerate(rest) if not a.startswith("-")), None)
    if command_at is not None and rest[command_at] in POSITIONAL:
        fields = list(POSITIONAL[rest[command_at]])
        i = command_at + 1
        while i < len(rest) and fields:
            token = rest[i]
            if token.startswith("-"):
                i += 1 if "=" in token or token in _SWITCHES else 2  # a flag and its value
                continue
            if "=" not in token:
                rest[i] = f"{fields.pop(0)}={token}"
            i += 1
    return front + rest


def main(argv: Sequence[str] | None = None) -> int:
    argv = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in CONFIG_COMMANDS and "torch" not in sys.modules and not {"-h", "--help"} & set(argv):
        # imported here, not at the top: `mae --help` stays fast
        from mae.threads import configure

        configure()  # the OpenMP wait policy and thread count of this process, unless set: before torch starts
    parser = build_parser(command if command in CONFIG_COMMANDS else "")
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand anywhere among the flags; argparse only collects the first run of them
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    other_rank = os.environ.get("RANK", "0") != "0"  # torchrun: progress messages from rank 0 only
    logging.basicConfig(level=logging.WARNING if args.quiet or other_rank else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    handler: Callable[[argparse.Namespace], int] = args.handler
    from mae.train.run import COMMAND_LINE  # recorded in each run's config.yaml

    token = COMMAND_LINE.set(shlex.join(["mae", *argv]))
    try:
        with _signals_end_the_command():
            return handler(args)
    except Interrupted as e:  # a signal stopped the run after a checkpoint: 128 + the signal number
        print(f"mae {args.command}: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except _Terminated as e:  # a signal outside a training loop: the command's own clean-up has run
        print(f"mae {args.command}: stopped by {signal.Signals(e.signum).name}; nothing half-written was kept",
              file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"mae {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mae models | head`: the reader left; say nothing more
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if args.debug:
            raise
        message, code = describe_error(e)
        print(f"mae {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:
        COMMAND_LINE.reset(token)


EXIT_BUG = 1
_BUG_HINT = "this is a bug in mae: run the command again with --debug to see the traceback, and report it"


def describe_error(e: BaseException) -> tuple[str, int]:
    """One line for an exception that reached the command line, and the exit code: 2 for what a user can cause or
    meet (bad input, a full disk, a stray launch environment, too little memory), 1 for a bug."""
    if isinstance(e, MAEError):
        return _one_line(e), EXIT_USER_ERROR
    if isinstance(e, OSError) and e.errno is not None:
        return _os_error_line(e), EXIT_USER_ERROR
    kind = type(e)
    module = kind.__module__ or ""
    if module.startswith("yaml"):
        return f"could not read a YAML file: {_one_line(e)}; fix its syntax", EXIT_USER_ERROR
    if isinstance(e, MemoryError) or kind.__name__ == "OutOfMemoryError":
        return (f"out of memory ({_one_line(e)[:200] or kind.__name__}); lower batch_size (accum_iter keeps the "
                f"effective batch), use precision=bf16, or a smaller model"), EXIT_USER_ERROR
    if module.startswith("torch.distributed") or kind.__name__.startswith("Dist"):
        return (f"torch.distributed: {_one_line(e)[:300]}; start every process with the same torchrun command, or "
                f"unset WORLD_SIZE RANK LOCAL_RANK MASTER_ADDR MASTER_PORT to run as one process"), EXIT_USER_ERROR
    text = _one_line(e)
    if "DataLoader worker" in text and "killed by signal" in text:
        return (f"{text}: a data-loading process was killed (often for memory); lower data.num_workers or "
                f"batch_size"), EXIT_USER_ERROR
    return f"{kind.__name__}: {text[:300]}; {_BUG_HINT}", EXIT_BUG


def _os_error_line(e: OSError) -> str:
    """An OSError by errno: what failed, on which file, and the fix."""
    # imported here, not at the top: `mae --help` stays fast
    from mae.files import fix_for

    reason = e.strerror or _one_line(e)
    what = f"{reason}: '{e.filename}'" if e.filename else reason
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"{what}; check the path"
    if e.errno == errno.EISDIR:
        return f"{what}; give a file, not a folder"
    if e.errno == errno.EEXIST:
        return f"{what}; pass --overwrite to replace it, or choose another path"
    return f"{what}; {fix_for(e)}"


class _Terminated(BaseException):  # a signal, like KeyboardInterrupt: not an error of the command
    """SIGTERM / SIGHUP outside a training loop, raised in the main thread so `finally` blocks (temporary files of
    the atomic writer, locks) run before the process exits with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_end_the_command():
    """Turn SIGTERM and SIGHUP, where nothing else handles them, into `_Terminated`. A training run replaces these
    handlers with its own for its duration (`mae.train.preemption.SignalStop`: a checkpoint, then exit 128 + n)."""

    def stop(signum, frame):
        raise _Terminated(signum)

    def swallowed(unraisable) -> None:
        """`_Terminated` raised while Python code ran inside a C callback (numba's compiler, under `mae corrupt`'s
        imagecorruptions) is printed and dropped there: deliver the signal again, so that it lands in plain code."""
        if isinstance(unraisable.exc_value, _Terminated):
            # imported here, not at the top: `mae --help` stays fast
            import threading

            again = threading.Timer(0.05, os.kill, (os.getpid(), unraisable.exc_value.signum))
            again.daemon = True
            again.start()
            return
        hook(unraisable)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            with contextlib.suppress(ValueError):  # not the main thread (an embedding program): leave them alone
                previous[signum] = signal.signal(signum, stop)
    hook = sys.unraisablehook
    if previous:
        sys.unraisablehook = swallowed
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
