"""Why bf16 autocast was slower than fp32 on this CPU: PyTorch's CPU flash-attention kernel in bf16.

Times forward + backward of ``scaled_dot_product_attention`` at the attention shapes of our models (batch, heads,
tokens, head dim): the kernel in bf16 (what autocast runs), the math backend in bf16, and the flash kernel in fp32
on upcast inputs (what the proposed attention in mae/models/mae.py does on CPU).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/attention_cpu.py
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {  # name: (batch, heads, tokens, head_dim)
    "micro encoder (b128)": (128, 4, 13, 32),
    "micro decoder (b128)": (128, 4, 50, 16),
    "ViT-B encoder (b16)": (16, 12, 50, 64),
    "decoder 512x16 heads (b16)": (16, 16, 197, 32),
}


def _time(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _attention_step(backend, upcast: bool, q, k, v, grad) -> None:
    with sdpa_kernel(backend):
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v).to(torch.bfloat16)
    out.backward(grad)


def main() -> None:
    rows = []
    for name, shape in SHAPES.items():
        q0, k0, v0 = (torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(*shape, dtype=torch.bfloat16)
        row = {"shape": name, "bnhd": list(shape)}
        for label, backend, upcast in (("flash bf16", SDPBackend.FLASH_ATTENTION, False),
                                       ("math bf16", SDPBackend.MATH, False),
                                       ("flash fp32 (upcast)", SDPBackend.FLASH_ATTENTION, True)):
            row[label] = _time(lambda b=backend, u=upcast, t=(q0, k0, v0, grad): _attention_step(b, u, *t)) * 1e3
        rows.append(row)
        print(f"{name:28s} " + "  ".join(f"{k} {row[k]:7.1f} ms" for k in row if k not in ("shape", "bnhd")))
    out = Path("benchmarks/results/cpu/attention_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
