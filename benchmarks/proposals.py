"""Measure speed fixes proposed for files this benchmark does not own, before they are applied, in one process.

Trainees, timed one step each in turn (the same weights and batch):
  mae <p>            the library as it is (``build_optimizer``'s AdamW choice, timm's attention)
  mae <p> +fused     ... with fused AdamW on CPU (proposed for mae/train/optim.py)
  mae <p> +fp32attn  ... with fused AdamW and the attention product in fp32 on CPU under bf16 autocast
                     (proposed for mae/models/mae.py; here patched onto the instance, see `fp32_attention_forward`)
  hf <p>             transformers' ViTMAEForPreTraining as its Trainer runs it (fused AdamW)

    OMP_WAIT_POLICY=PASSIVE python benchmarks/proposals.py --model mae_vit_base_patch16 --batch-size 16 --steps 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from mae.bench.measure import machine_info
from mae.bench.step import build_hf, build_ours, time_alternating, timed_step
from mae.models import model_config


def fp32_attention_forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    """timm's Attention.forward for our blocks (no qk-norm, no mask), with the attention product in fp32 on CPU."""
    n, length, dim = x.shape
    qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [N, heads, T, head_dim]
    if q.device.type == "cpu" and q.dtype != torch.float32:
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(n, length, dim))


def patch_attention(model: torch.nn.Module) -> None:
    for blk in [*model.blocks, *model.decoder_blocks]:
        blk.attn.forward = types.MethodType(fp32_attention_forward, blk.attn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mae_vit_base_patch16")
    ap.add_argument("--img-size", type=int)
    ap.add_argument("--in-chans", type=int)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/cpu/proposals.json")
    args = ap.parse_args()
    overrides = {k: v for k, v in (("img_size", args.img_size), ("in_chans", args.in_chans)) if v is not None}
    cfg = model_config(args.model, **overrides)
    device = torch.device("cpu")
    trainees = []
    for p in args.precisions.split(","):
        trainees.append(build_ours(cfg, args.batch_size, p, device, label=f"mae {p}"))
        trainees.append(build_ours(cfg, args.batch_size, p, device, optimizer="fused", label=f"mae {p} +fused"))
        if p != "fp32":
            patched = build_ours(cfg, args.batch_size, p, device, optimizer="fused", label=f"mae {p} +fp32attn")
            patch_attention(patched.model)
            trainees.append(patched)
        trainees.append(build_hf(cfg, args.batch_size, p, device, label=f"hf {p}"))
    for t in trainees:
        for _ in range(args.warmup):
            timed_step(t)
    times = time_alternating(trainees, args.steps)
    rows = {k: {"step_seconds": statistics.median(v), "images_per_s": args.batch_size / statistics.median(v),
                "all": v} for k, v in times.items()}
    # speed-ups as medians of per-round ratios (each round times every trainee within seconds: fair under load)
    for k, r in rows.items():
        for ref in ("hf fp32", f"hf {k.split()[1]}"):
            if ref in times and k != ref:
                r[f"vs {ref}"] = statistics.median(a / b for a, b in zip(times[ref], times[k]))
    print(f"{args.model} {overrides} batch {args.batch_size}, {torch.get_num_threads()} threads")
    for k, r in rows.items():
        extra = "".join(f"  {v:.2f}x {key}" for key, v in r.items() if key.startswith("vs "))
        print(f"  {k:18s} {r['step_seconds']:8.3f} s  {r['images_per_s']:8.2f} img/s{extra}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": machine_info(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
