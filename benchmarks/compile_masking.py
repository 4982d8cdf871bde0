"""torch.compile and the masking strategies: graph breaks per training forward, as the model is, and with the
proposed change (host-side masks run eagerly under ``torch.compiler.disable``; see docs/benchmarks.md).

    python benchmarks/compile_masking.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mae.bench.suites import graph_breaks
from mae.models import masking as masking_lib
from mae.models import model_config


def main() -> None:
    results = {}
    for strategy in ("random", "grid", "block"):
        results[strategy] = {"as_is": graph_breaks(model_config("mae_vit_micro_patch4_28", mask_strategy=strategy))}
    # the proposal, applied to the module functions for this measurement only
    originals = {name: getattr(masking_lib, name) for name in ("block_masking", "grid_masking", "masking_from_mask")}
    try:
        for name, fn in originals.items():
            setattr(masking_lib, name, torch.compiler.disable(fn))
        for strategy in ("random", "grid", "block"):
            cfg = model_config("mae_vit_micro_patch4_28", mask_strategy=strategy)
            results[strategy]["host_masking_disabled"] = graph_breaks(cfg)
    finally:
        for name, fn in originals.items():
            setattr(masking_lib, name, fn)
    for strategy, r in results.items():
        print(f"{strategy:7s} as is: {r['as_is']['graphs']} graphs / {r['as_is']['graph_breaks']} breaks;  "
              f"with the proposal: {r['host_masking_disabled']['graphs']} graphs / "
              f"{r['host_masking_disabled']['graph_breaks']} breaks")
    out = Path("benchmarks/results/cpu/compile_masking.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
