"""Collect every bench.json under a folder into one Markdown page, with the issue's targets checked.

    python benchmarks/summarize.py runs/gpu_check > summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mae.bench.report import suite_tables


def targets(results: dict[str, dict]) -> list[str]:
    """Pass / fail lines for the targets of the speed issue that these results speak to."""
    lines = []
    for name, res in results.items():
        on_gpu = "gpu" in res["machine"]
        for suite, body in res["suites"].items():
            if suite == "step":
                row = body["rows"][0]
                if "large" in row["model"] and row["precision"] == "bf16" and on_gpu:
                    ok = row["mfu"] >= 0.45
                    verdict = "PASS" if ok else "FAIL"
                    lines.append(f"- {name}: ViT-L bf16 MFU {row['mfu']:.1%} (target >= 45%): {verdict}")
            elif suite == "peer":
                model = body["rows"][0]["model"]
                ratios = body["same_precision_ratio"]
                d = body["default_ratio"]
                if on_gpu:
                    ok = d >= 1.3 and ratios.get("bf16", 0) >= 1.0
                    lines.append(f"- {name}: {model} ours/HF defaults {d:.2f}x, bf16 {ratios.get('bf16', 0):.2f}x, "
                                 f"fp32 {ratios.get('fp32', 0):.2f}x (target >= 1.3x): {'PASS' if ok else 'FAIL'}")
                else:
                    need_default = 1.8 if "base" in model else None
                    ok = all(r >= 1.0 for r in ratios.values()) and (need_default is None or d >= need_default)
                    req = f"defaults >= {need_default}x, " if need_default else ""
                    lines.append(f"- {name}: {model} ours/HF defaults {d:.2f}x, "
                                 + ", ".join(f"{p} {r:.2f}x" for p, r in ratios.items())
                                 + f" (target {req}same precision >= 1.0x): {'PASS' if ok else 'FAIL'}")
            elif suite == "table2":
                for s in body["speedups"]:
                    paper = f" (paper {s['paper_dec8']}x / {s['paper_dec1']}x)" if s["paper_dec8"] else ""
                    lines.append(f"- {name}: Table 2 ViT-{s['encoder']} speed-up dec 8 {s['speedup_dec8']:.2f}x, "
                                 f"dec 1 {s['speedup_dec1']:.2f}x{paper}")
            elif suite == "table1c":
                lines.append(f"- {name}: Table 1c ViT-L FLOPs ratio {body['ratio_large']:.2f}x (paper 3.3x)")
    return lines


def main(folder: str) -> int:
    found = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(folder).glob("**/bench.json"))}
    if not found:
        print(f"no bench.json under {folder}", file=sys.stderr)
        return 1
    first = next(iter(found.values()))["machine"]
    print(f"# Benchmark summary: {first.get('gpu') or first['cpu']}, torch {first['torch']}\n")
    print("## Targets\n")
    print("\n".join(targets(found)) or "(none of the targeted measurements is present)")
    for name, res in found.items():
        print(f"\n## {name}\n\n`{res['command']}`\n")
        for suite, body in res["suites"].items():
            print(f"### {suite}\n\n{suite_tables(suite, body)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check"))
