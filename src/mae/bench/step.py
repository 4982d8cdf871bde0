"""One training step, packaged for timing: this library's model (as the training engine runs it) or Hugging Face's
``ViTMAEForPreTraining`` with the same architecture and weights (as its ``Trainer`` runs it by default).

A step is what a training loop does per batch: zero the gradients, forward under autocast (bf16 / fp16), the
loss, backward, the AdamW update, and the ``loss.item()`` the engine reads for logging. The batch is a fixed
synthetic tensor already on the device, so the input pipeline is left out (the ``data`` suite times that).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mae.errors import ConfigError
from mae.models.mae import MAEConfig, MaskedAutoencoderViT
from mae.train.optim import build_optimizer, param_groups
from mae.train.precision import autocast_context, make_grad_scaler

OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for-loop")


@dataclass
class Trainee:
    """A model with its optimizer and a fixed batch; ``step()`` runs one full training step and returns the loss."""

    label: str
    model: torch.nn.Module
    run_step: Callable[[], float]
    config: MAEConfig
    precision: str
    device: torch.device
    info: dict = field(default_factory=dict)
    compile_seconds: float | None = None  # first-step time minus a steady step, when compiled

    def step(self) -> float:
        return self.run_step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _adamw_kwargs(impl: str, device: torch.device) -> dict:
    if impl not in OPTIMIZER_IMPLS:
        raise ConfigError(f"optimizer implementation '{impl}' is not one of {', '.join(OPTIMIZER_IMPLS)}")
    if impl == "auto":
        return {}
    if impl == "fused":
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True}
    return {"foreach": False, "fused": False}


def build_ours(cfg: MAEConfig, batch_size: int, precision: str, device: torch.device, *, compile: bool = False,
               grad_checkpointing: bool = False, optimizer: str = "auto", seed: int = 0,
               label: str = "mae") -> Trainee:
    """This library's MAE with the training engine's optimizer (``build_optimizer``: weight decay 0.05 on matrices,
    betas (0.9, 0.95)) and precision handling (``autocast_context`` + a grad scaler that is active for fp16 only).

    ``optimizer='auto'`` keeps ``build_optimizer``'s own choice (what ``mae pretrain`` uses); 'fused', 'foreach'
    and 'for-loop' force an AdamW implementation.
    """
    torch.manual_seed(seed)
    model: torch.nn.Module = MaskedAutoencoderViT(cfg).to(device)
    model.train()
    if grad_checkpointing:
        model.set_grad_checkpointing(True)  # type: ignore[operator]  # Module.__getattr__ gives Tensor | Module
    groups = param_groups(model, weight_decay=0.05)
    if optimizer == "auto":
        opt = build_optimizer(groups, "adamw", lr=1e-4, weight_decay=0.05)
    else:
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                **_adamw_kwargs(optimizer, device))
    scaler = make_grad_scaler(precision, device)
    train_model = torch.compile(model) if compile else model
    imgs = torch.randn(batch_size, cfg.in_chans, *cfg.image_hw, device=device)
    ratio = cfg.mask_ratio

    def run_step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast_context(precision, device):
            loss = train_model(imgs, ratio)[0]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.item()

    info = {"implementation": "mae", "batch_size": batch_size, "optimizer": _describe_optimizer(opt),
            "compile": compile, "grad_checkpointing": grad_checkpointing,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    return Trainee(label, model, run_step, cfg, precision, device, info)


def build_reference(cfg: MAEConfig, batch_size: int, precision: str, device: torch.device, *, seed: int = 0,
                    label: str = "reference") -> Trainee:
    """The reference release's training step as its code runs it, on `build_ours`'s weights (same seed): attention
    written out (q k^T scaled, softmax, times v: timm's ``Attention`` with ``fused_attn=False``, the arithmetic of the
    timm 0.3.2 blocks the release builds on), ``torch.optim.AdamW`` with its defaults (betas (0.9, 0.95), weight decay
    0.05 on matrices, as the release sets them), the loss under autocast. The release autocasts only on CUDA
    (``torch.cuda.amp``, fp16 with a loss scaler): on a CPU it trains in fp32, and a bf16 row here is what it would
    do with autocast there."""
    from timm.layers import Attention as TimmAttention  # slow to import: only the reference model

    torch.manual_seed(seed)
    model: torch.nn.Module = MaskedAutoencoderViT(cfg)
    # `build_ours`'s batch: drawn before the timm attention modules below take their (discarded) random init
    imgs = torch.randn(batch_size, cfg.in_chans, *cfg.image_hw, device=device)
    for block in [*model.blocks, *model.decoder_blocks]:  # type: ignore[misc]  # Module.__getattr__ gives Tensor | Module
        dim = block.attn.qkv.in_features
        attn = TimmAttention(dim, num_heads=block.attn.num_heads, qkv_bias=block.attn.qkv.bias is not None)
        attn.load_state_dict(block.attn.state_dict())
        attn.fused_attn = False  # type: ignore[misc]  # timm marks it Final; the benchmark turns it off on purpose
        block.attn = attn
    model = model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.05), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    scaler = make_grad_scaler(precision, device)

    def run_step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast_context(precision, device):
            loss = model(imgs, cfg.mask_ratio)[0]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.item()

    info = {"implementation": "reference-style (explicit attention, default AdamW)", "batch_size": batch_size,
            "optimizer": _describe_optimizer(opt), "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    return Trainee(label, model, run_step, cfg, precision, device, info)


def _describe_optimizer(opt: torch.optim.Optimizer) -> str:
    d = opt.defaults
    impl = "fused" if d.get("fused") else "foreach" if d.get("foreach") else (
        "default" if d.get("foreach") is None else "for-loop")
    return f"{type(opt).__name__}({impl})"


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------------------------------


def hf_config(cfg: MAEConfig):
    """A transformers ``ViTMAEConfig`` with exactly `cfg`'s architecture (LayerNorm eps 1e-6, exact GELU, no
    dropout)."""
    from transformers import ViTMAEConfig  # optional (a test dependency): only the peer suite

    h, w = cfg.image_hw
    if h != w:
        raise ConfigError(f"Hugging Face ViTMAE needs square images, got img_size {h}x{w}")
    if cfg.target not in ("pixel", "norm_pixel") or cfg.mask_in_encoder or cfg.mask_strategy != "random":
        raise ConfigError("the Hugging Face peer supports only the plain MAE: random masking, pixel / norm_pixel "
                          f"targets, no mask tokens in the encoder (got target={cfg.target}, "
                          f"mask_strategy={cfg.mask_strategy}, mask_in_encoder={cfg.mask_in_encoder})")
    return ViTMAEConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=cfg.norm_eps, image_size=h, patch_size=cfg.patch_size,
        num_channels=cfg.in_chans, qkv_bias=True, decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_hidden_size=cfg.decoder_embed_dim, decoder_num_hidden_layers=cfg.decoder_depth,
        decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio), mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.target == "norm_pixel",
    )


# our block sub-key -> HF sub-keys, for transformers 5.x module names and for 4.x ones
_HF_BLOCK = {
    5: {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        "qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj")},
    4: {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
        "qkv": ("attention.attention.query", "attention.attention.key", "attention.attention.value")},
}
_HF_PREFIX = {5: ("vit.layers.", "decoder.decoder_layers."), 4: ("vit.encoder.layer.", "decoder.decoder_layers.")}
_HF_TOP = {
    "cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias", "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
}


def to_hf_layout(state_dict: dict[str, torch.Tensor], hf_keys: set[str]) -> dict[str, torch.Tensor]:
    """Our state_dict under the module names of the installed transformers' ViTMAEForPreTraining (4.x or 5.x)."""
    version = 5 if any(k.startswith("vit.layers.") for k in hf_keys) else 4
    block, (enc_prefix, dec_prefix) = _HF_BLOCK[version], _HF_PREFIX[version]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("target."):
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        if key.startswith(("decoder_embed.", "decoder_norm.", "decoder_pred.")):
            out["decoder." + key] = value
            continue
        prefix, rest = ("blocks.", enc_prefix) if key.startswith("blocks.") else ("decoder_blocks.", dec_prefix)
        index, sub = key[len(prefix):].split(".", 1)
        module, kind = sub.rsplit(".", 1)
        if module == "attn.qkv":
            for name, part in zip(block["qkv"], value.chunk(3, dim=0), strict=False):
                out[f"{rest}{index}.{name}.{kind}"] = part
        else:
            out[f"{rest}{index}.{block[module]}.{kind}"] = value
    return out


def hf_from_ours(model: MaskedAutoencoderViT):
    """Hugging Face ViTMAEForPreTraining holding exactly `model`'s weights (its default attention: sdpa)."""
    from transformers import ViTMAEForPreTraining  # optional (a test dependency): peer suite only

    hf = ViTMAEForPreTraining(hf_config(model.config))
    mapped = to_hf_layout(model.state_dict(), set(hf.state_dict()))
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ConfigError(f"weight mapping to Hugging Face ViTMAE failed: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    return hf


def build_hf(cfg: MAEConfig, batch_size: int, precision: str, device: torch.device, *, compile: bool = False,
             optimizer: str = "fused", seed: int = 0, label: str = "hf") -> Trainee:
    """Hugging Face ViTMAEForPreTraining as its ``Trainer`` runs it by default with torch >= 2.8: AdamW
    ``adamw_torch_fused`` (betas (0.9, 0.999), no decay for biases / LayerNorm weights), autocast for bf16/fp16,
    and the same weights as ``build_ours`` with the same seed."""
    torch.manual_seed(seed)
    ours = MaskedAutoencoderViT(cfg)
    model = hf_from_ours(ours).to(device)
    del ours
    model.train()
    # the Trainer's grouping: no weight decay for biases and LayerNorm parameters
    norm_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")
             and id(p) not in norm_ids]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, **_adamw_kwargs(optimizer, device))
    scaler = make_grad_scaler(precision, device)
    train_model = torch.compile(model) if compile else model
    imgs = torch.randn(batch_size, cfg.in_chans, *cfg.image_hw, device=device)

    def run_step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast_context(precision, device):
            loss = train_model(pixel_values=imgs).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.item()

    import transformers  # optional (a test dependency): only the peer suite

    info = {"implementation": "transformers", "batch_size": batch_size, "optimizer": _describe_optimizer(opt),
            "compile": compile, "transformers": transformers.__version__,
            "attn_implementation": model.config._attn_implementation,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    return Trainee(label, model, run_step, cfg, precision, device, info)


# ---------------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------------


def timed_step(trainee: Trainee) -> tuple[float, float]:
    """(seconds, loss) of one step, the device synchronised before and after."""
    synchronize(trainee.device)
    t0 = time.perf_counter()
    loss = trainee.step()
    synchronize(trainee.device)
    return time.perf_counter() - t0, loss


def warm_up(trainee: Trainee, steps: int) -> list[float]:
    """Run `steps` untimed steps (at least one); returns their times (the first holds compilation, if any)."""
    times = [timed_step(trainee)[0] for _ in range(max(1, steps))]
    if len(times) > 1 and trainee.info.get("compile"):
        trainee.compile_seconds = max(0.0, times[0] - min(times[1:]))
    return times


def time_alternating(trainees: list[Trainee], steps: int, seed: int = 0) -> dict[str, list[float]]:
    """Time `steps` steps of each trainee in rounds of one step each, in a new random order every round, so that
    drifts of the machine (other processes, clocks, thermals) hit every trainee alike, periodic ones included."""
    times: dict[str, list[float]] = {t.label: [] for t in trainees}
    rng = random.Random(seed)
    for _ in range(steps):
        for t in rng.sample(trainees, len(trainees)):
            times[t.label].append(timed_step(t)[0])
    return times


@contextlib.contextmanager
def threads(n: int):
    """Run with `n` intra-op threads (0: leave torch's setting)."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
