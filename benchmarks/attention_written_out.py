"""A tried and dropped speed-up, kept so its figures in docs/benchmarks.md can be reproduced: on CPU, the attention
product written out (q k^T scaled, softmax, times v) instead of the flash kernel for sequences of at most 64 tokens.
As an operation alone it is faster at the demo model's 13 and 50 tokens (benchmarks/attention_cpu.py shapes); this
times whole pre-training steps of the demo model with each, alternately in one process.

    python benchmarks/attention_written_out.py [--precision fp32|bf16] [--rounds 12]
    python benchmarks/attention_written_out.py --operation     # the fp32 operation alone, forward + backward
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mae.models.mae as mae_module
from mae.bench.step import build_ours
from mae.models import model_config

FLASH_FORWARD = mae_module.Attention.forward


def written_out_forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    n, length, dim = x.shape
    if length > 64 or x.device.type != "cpu" or attn_mask is not None or is_causal:
        return FLASH_FORWARD(self, x, attn_mask, is_causal)
    qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
    dtype = qkv.dtype
    with torch.autocast("cpu", enabled=False):
        q, k, v = qkv.float().unbind(0)
        out = (((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v).to(dtype)
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(n, length, dim)))


def _flash_step(q, k, v, grad) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)


def _written_out_step(q, k, v, grad) -> None:
    (((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v).backward(grad)


def operation_alone(rounds: int) -> None:
    """Forward + backward of the fp32 product alone at the demo model's shapes (batch, heads, tokens, head dim)."""
    for shape in ((128, 4, 13, 32), (128, 4, 50, 16)):
        tensors = [torch.randn(*shape, requires_grad=True) for _ in range(3)] + [torch.randn(*shape)]
        medians = []
        for step in (_flash_step, _written_out_step):
            step(*tensors)
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                step(*tensors)
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times) * 1e3)
        print(f"{shape}: flash {medians[0]:.2f} ms, written out {medians[1]:.2f} ms; written out is "
              f"{medians[0] / medians[1]:.2f}x as fast")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--operation", action="store_true", help="time the operation alone instead of whole steps")
    a = ap.parse_args()
    if a.operation:
        operation_alone(max(a.rounds, 30))
        return
    trainee = build_ours(model_config("mae_vit_micro_patch4_28"), a.batch_size, a.precision, torch.device("cpu"))
    variants = {"flash kernel": FLASH_FORWARD, "written out (<= 64 tokens)": written_out_forward}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(3):
        trainee.step()
    for _ in range(a.rounds):
        for name, forward in variants.items():
            mae_module.Attention.forward = forward
            t0 = time.perf_counter()
            trainee.step()
            trainee.step()
            times[name].append((time.perf_counter() - t0) / 2)
    mae_module.Attention.forward = FLASH_FORWARD
    flash, written = (statistics.median(times[name]) * 1e3 for name in variants)
    print(f"demo model, batch {a.batch_size}, {a.precision}, ATen {torch.backends.cpu.get_cpu_capability()}: "
          f"flash {flash:.0f} ms, written out {written:.0f} ms a step; written out is {flash / written:.2f}x as fast")


if __name__ == "__main__":
    main()
