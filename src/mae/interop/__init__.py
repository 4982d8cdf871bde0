"""Reading and writing checkpoints of the reference MAE release, transformers, timm and this project.

    from mae.interop import load_model, save_model, convert, load_checkpoint
    model = load_model("mae_pretrain_vit_base.pth", model_name="mae_vit_base_patch16")  # any supported format
    save_model(model, "mae_b.safetensors")                                           # weights + config
    convert("mae_b.safetensors", "hf_dir", to="hf")        # ViTMAEForPreTraining.from_pretrained("hf_dir")
    convert("mae_b.safetensors", "vit_b.pth", to="timm")   # timm.create_model(..., num_classes=0), strict load

Our state_dict keys are the reference release's, which are timm's for the encoder; `mae.interop.huggingface`
maps them to and from transformers' names. `load_checkpoint` (behind ``mae.create_model(..., checkpoint_path=)``)
reads every format and says what it skipped; `read_encoder` gives the encoder of any of them (run directories
included) to the classifiers and the transfer backbone. `load_classifier` reads any classifier (finetune / linprobe
runs, timm and transformers exports) and `load_pretrained_model` any pre-trained MAE, refusing classifiers.
"""

from mae.interop.classifier_io import is_classifier_checkpoint, load_classifier
from mae.interop.huggingface import (
    config_from_hf,
    from_hf_state_dict,
    hf_config_dict,
    save_hf_pretrained,
    to_hf_state_dict,
)
from mae.interop.infer import infer_config
from mae.interop.loading import (
    WEIGHT_FORMATS,
    Checkpoint,
    EncoderSource,
    convert,
    load_checkpoint,
    load_model,
    load_pretrained_model,
    load_state_dict_any,
    read_checkpoint,
    read_encoder,
)
from mae.interop.native import save_model
from mae.interop.reference import to_reference_checkpoint
from mae.interop.timm_vit import encoder_for_timm, timm_vit_kwargs
from mae.models.loading import LoadReport

__all__ = [
    "WEIGHT_FORMATS", "Checkpoint", "EncoderSource", "LoadReport", "config_from_hf", "convert", "encoder_for_timm",
    "from_hf_state_dict", "hf_config_dict", "infer_config", "is_classifier_checkpoint", "load_checkpoint",
    "load_classifier", "load_model", "load_pretrained_model", "load_state_dict_any", "read_checkpoint",
    "read_encoder", "save_hf_pretrained", "save_model", "timm_vit_kwargs", "to_hf_state_dict",
    "to_reference_checkpoint",
]
