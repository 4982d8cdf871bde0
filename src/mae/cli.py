"""``mae <command>``: parses arguments, dispatches to a recipe's ``run``, and turns user errors into one line.

Every training command reads its config the same way: built-in defaults <- ``--config FILE`` <- ``--data``,
``--output-dir``, ``--resume`` <- dotted ``key=value`` overrides (e.g. ``model.patch_size=4 epochs=20``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from mae.errors import MAEError

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
    "prepare": ("convert an image folder into tar shards (webdataset layout) for --data shards:DIR",
                "mae.recipes.prepare.PrepareConfig"),
}
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
    p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with settings (see configs/)")
    for flag, key in flags.items():
        p.add_argument(flag, dest=key.replace(".", "__"), metavar=key.split(".")[-1].upper(),
                       help=f"shortcut for {key}=...")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any config field, e.g. epochs=20")
    p.set_defaults(config_cls=config_cls_path, flags=flags, handler=_run_config_command)
    p.epilog = f"config fields (key=value):\n{_lazy_help(config_cls_path)}"


def _import(path: str):
    module, _, attr = path.rpartition(".")
    return getattr(__import__(module, fromlist=[attr]), attr)


def _lazy_help(config_cls_path: str) -> str:
    from mae.config import config_help

    return config_help(_import(config_cls_path))


def _run_config_command(args: argparse.Namespace) -> int:
    from mae.config import load_config

    overrides = list(args.overrides)
    for key in args.flags.values():
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            overrides.append(f"{key}={value}")
    cls = _import(args.config_cls)
    cfg = load_config(cls, args.config, overrides)
    run = _import(args.config_cls.rsplit(".", 1)[0] + ".run")
    summary = run(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary (rank 0's), not one per process
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        print(f"{key}: {value}")


def _cmd_visualize(args: argparse.Namespace) -> int:
    from mae.recipes.pretrain import load_run_model
    from mae.viz.reconstruction import save_reconstructions

    model = load_run_model(args.checkpoint)
    data, mean, std = args.data, None, None
    config_file = _run_config_file(args.checkpoint)
    if config_file is not None:
        import yaml

        saved = yaml.safe_load(config_file.read_text()) or {}
        data_cfg = saved.get("data", {})
        data = data or data_cfg.get("path")
        mean, std = data_cfg.get("mean"), data_cfg.get("std")
    if not data:
        raise MAEError("no dataset to draw from: pass --data (e.g. --data builtin:mnist5k)")
    out = save_reconstructions(model, data, args.out, mask_ratios=args.mask_ratio, num_images=args.num_images,
                               mean=mean, std=std, seed=args.seed)
    print(f"reconstructions: {out}")
    return 0


def _run_config_file(path: str):
    from pathlib import Path

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    return folder / "config.yaml" if (folder / "config.yaml").exists() else None


def _cmd_convert(args: argparse.Namespace) -> int:
    from mae.interop import convert

    out = convert(args.src, args.dst, to=args.to, model_name=args.model)
    print(f"wrote {out}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from mae.models import ARCHITECTURES, list_models

    for name in list_models(args.pattern):
        a = ARCHITECTURES[name]
        print(f"{name:32s} embed {a['embed_dim']:4d} depth {a['depth']:2d} heads {a['num_heads']:2d} "
              f"patch {a['patch_size']:2d} | decoder {a['decoder_embed_dim']} x {a['decoder_depth']}")
    return 0


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
    """The CLI parser; with ``command`` given, only that config command is built in full (fast start-up)."""
    parser = argparse.ArgumentParser(prog="mae", description="Masked autoencoders (He et al., 2021): pre-train, "
                                     "fine-tune, probe, visualise and convert.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (help_text, cls_path) in CONFIG_COMMANDS.items():
        try:
            _config_command(sub, name, help_text, cls_path, full=command is None or command == name)
        except ModuleNotFoundError as e:  # a recipe module that is not part of this installation
            if not cls_path.startswith(e.name or "-"):
                raise

    p = sub.add_parser("visualize", help="draw reconstructions (paper Figures 2 and 4)")
    p.add_argument("checkpoint", help="a run directory or any checkpoint file the library reads")
    p.add_argument("--data", help="dataset to draw images from (default: the run's)")
    p.add_argument("--mask-ratio", type=float, nargs="+", default=[0.75], help="one or more mask ratios")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reconstructions.png")
    p.set_defaults(handler=_cmd_visualize)

    p = sub.add_parser("convert", help="convert checkpoints between mae, reference, Hugging Face and timm formats")
    p.add_argument("src", help="checkpoint file or Hugging Face directory")
    p.add_argument("dst", help="output file or directory")
    p.add_argument("--to", choices=["mae", "reference", "hf", "timm"], default="mae")
    p.add_argument("--model", help="registered architecture name when the source stores none")
    p.set_defaults(handler=_cmd_convert)

    p = sub.add_parser("models", help="list registered architectures")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(handler=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
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
    try:
        return handler(args)
    except MAEError as e:
        if args.debug:
            raise
        print(f"mae {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"mae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
