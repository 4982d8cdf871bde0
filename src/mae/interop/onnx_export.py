"""ONNX export (``mae export CHECKPOINT --to onnx``): a pre-trained MAE's encoder (``forward_features``, no masking:
``pixel_values`` [N, C, H, W] -> ``features`` [N, 1+L, D]) or a fine-tuned classifier (-> ``logits`` [N, classes]),
with a dynamic batch axis, through ``torch.onnx.export``'s torch.export-based exporter (it needs ``onnxscript``:
``pip install 'mae[onnx]'``). `check_onnx` runs the file in onnxruntime and compares it with PyTorch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from pathlib import Path

import torch
from torch import nn

from mae.errors import ConfigError, MAEError, first_line
from mae.files import atomic_write_path
from mae.interop.classifier_io import is_classifier_checkpoint, load_classifier
from mae.interop.infer import check_model_name
from mae.interop.loading import load_pretrained_model
from mae.models.classifier import ClassifierConfig
from mae.models.mae import MAEConfig

__all__ = ["FeatureExtractor", "check_onnx", "export_checkpoint_onnx", "export_onnx"]

_log = logging.getLogger(__name__)
INPUT_NAME = "pixel_values"
OPSET = 18


class FeatureExtractor(nn.Module):
    """An MAE's encoder without masking, as a module whose ``forward`` is ``forward_features``: [N, 1+L, D]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixel_values)  # type: ignore[operator]  # Module.__getattr__ gives Tensor | Module


def _need(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MAEError(f"ONNX export needs the '{module}' package, which is not installed; pip install {extra}")


def export_onnx(module: nn.Module, path: str | Path, example: torch.Tensor, output_name: str) -> Path:
    """Export `module` (in eval mode, on CPU, fp32) to `path` with a dynamic batch axis; `example` is one input
    batch [N, C, H, W]. The file is written atomically."""
    _need("onnxscript", "onnxscript")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ConfigError(f"an ONNX export is a .onnx file, got '{path}'")
    module = module.eval().float().cpu()
    batch = torch.export.Dim("batch", min=1)

    def write(tmp: Path) -> None:
        with contextlib.redirect_stdout(io.StringIO()), _quiet("onnxscript", "onnx_ir"):  # the exporter's chatter
            program = torch.onnx.export(module, (example.float().cpu(),), dynamo=True, verbose=False,
                                        input_names=[INPUT_NAME], output_names=[output_name],
                                        dynamic_shapes=({0: batch},), opset_version=OPSET)
        program.save(str(tmp))  # type: ignore[union-attr]  # dynamo=True returns a program

    try:
        return atomic_write_path(path, write)
    except torch.onnx.OnnxExporterError as e:  # the exporter's own failure report (a RuntimeError)
        raise MAEError(f"torch.onnx.export could not export this model ({first_line(e)[:200]})") from e


@contextlib.contextmanager
def _quiet(*names: str):
    """Only warnings from these loggers (the ONNX optimiser reports every rewrite at INFO level)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def check_onnx(path: str | Path, module: nn.Module, inputs: torch.Tensor) -> float:
    """The largest absolute difference between onnxruntime's output for `inputs` and PyTorch's (needs
    ``onnxruntime``)."""
    _need("onnxruntime", "onnxruntime")
    import onnxruntime  # an optional dependency (`pip install onnxruntime`), checked just above

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {INPUT_NAME: inputs.float().cpu().numpy()})[0]
    with torch.no_grad():
        ours = module.eval().float().cpu()(inputs.float().cpu())
    return float((torch.from_numpy(theirs) - ours).abs().max())


def export_checkpoint_onnx(src: str | Path, dst: str | Path, model_name: str | None = None,
                           batch: int = 2) -> tuple[Path, nn.Module, torch.Tensor]:
    """Export the model of any checkpoint: a classifier (a ``head``: fine-tuned or probed, `load_classifier`) as
    logits, anything else as the MAE encoder's features. Returns (the .onnx path, the exported module, an example
    input batch of random images) for `check_onnx`."""
    config: ClassifierConfig | MAEConfig
    if is_classifier_checkpoint(src):
        module, config, _ = load_classifier(src, model_name=model_name)
        output = "logits"
    else:
        mae_model = load_pretrained_model(src)
        config = mae_model.config
        check_model_name(config, model_name, f"'{src}'")  # ONNX stores no name: a warning, the file's model is used
        module, output = FeatureExtractor(mae_model), "features"
    h, w = config.image_hw
    example = torch.randn(batch, config.in_chans, h, w, generator=torch.Generator().manual_seed(0))
    out = export_onnx(module, dst, example, output)
    _log.info("exported %s (%s) to %s", src, output, out)
    return out, module, example
