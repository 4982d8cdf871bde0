#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, in one call (under 8 minutes on one H100 / H200):
#   1. ViT-L/16 MAE pre-training step at bf16: images/s, memory, MFU against a measured bf16 matmul peak
#      (target >= 45%), eager and torch.compile'd
#   2. this library vs Hugging Face ViTMAEForPreTraining on the same card, same weights (target >= 1.3x)
#   3. paper Table 2 at full 224 px: encoder with mask tokens vs MAE encoder, decoder depth 8 vs 1, ViT-B and ViT-L
#   4. the JPEG input pipeline, including GPU decoding (nvjpeg), at 0 / 4 / 8 workers
#   5. a 20-step pre-training run through the real CLI with data.decode=nvjpeg
#   6. every CUDA test (pytest -m gpu): nvjpeg end to end, no host synchronisation in the training step, ...
# Every run writes bench.json + bench.md under $OUT (default runs/gpu_check); summary.md compares with the targets.
# Needs: a CUDA GPU, python with torch, torchvision, timm, transformers (the test extra); no network.
#   bash benchmarks/gpu_check.sh            # or: OUT=/some/dir PYTHON=/path/to/python bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1
"$PY" - > "$OUT/env.txt" 2>&1 <<'PY'
import torch, timm, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__,
      "transformers", transformers.__version__, "gpu", torch.cuda.get_device_name(0))
PY
cat "$OUT/gpu.csv" "$OUT/env.txt"

bench() {  # bench NAME SECONDS ARGS...: one `mae bench` run under a time limit; a failure does not stop the rest
  local name=$1 limit=$2; shift 2
  echo "=== $name: mae bench $*"
  local t0=$SECONDS
  timeout "$limit" "$PY" -m mae -q bench --device cuda --output-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "    exit $? after $((SECONDS - t0)) s"; tail -n 12 "$OUT/$name.log"
}

# 1. MFU of ViT-L/16 pre-training at bf16 (batch 128 per GPU), eager then compiled
bench vitl_bf16 90 --model mae_vit_large_patch16 --batch-size 128 --precision bf16 warmup=5 steps=20
bench vitl_bf16_compiled 240 --model mae_vit_large_patch16 --batch-size 128 --precision bf16 warmup=3 steps=20 \
  compile=true
# 2. vs Hugging Face, same card: fp32 and bf16 each, and the two defaults (ours: precision auto = bf16; HF: fp32)
bench peer_vitl 150 --suite peer --model mae_vit_large_patch16 --batch-size 64 warmup=3 steps=10 \
  "peer.precisions=[fp32,bf16]"
# 3. paper Table 2 at 224 px, bf16
bench table2 120 --suite table2 --precision bf16 "table2.encoders=[base,large]" table2.batch_size=64 warmup=3 steps=10
# 4. input pipeline: PIL vs torchvision.io + v2 on uint8 vs nvjpeg, 0 / 4 / 8 workers
bench data 120 --suite data "data.decoders=[pil,tensor,nvjpeg]" "data.workers=[0,4,8]" data.num_images=256 \
  data.batches=16 data.batch_size=64

"$PY" benchmarks/summarize.py "$OUT" | tee "$OUT/summary.md"

# 5. a 20-step pre-training run through the CLI, batches decoded on the GPU (nvjpeg), on generated JPEGs
echo "=== mae pretrain data.decode=nvjpeg (20 updates)"
"$PY" - "$OUT/jpegs" <<'PY'
import sys, numpy as np
from pathlib import Path
from PIL import Image
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(320):
    Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(out / f"{i:04d}.jpg", quality=90)
PY
t0=$SECONDS
timeout 240 "$PY" -m mae pretrain --data "$OUT/jpegs" --output-dir "$OUT/nvjpeg_run" --overwrite \
  model.name=mae_vit_base_patch16 data.decode=nvjpeg data.num_workers=4 batch_size=16 epochs=1 \
  save_every_minutes=0 progress=false visualize=false > "$OUT/nvjpeg_run.log" 2>&1
echo "    exit $? after $((SECONDS - t0)) s"; tail -n 6 "$OUT/nvjpeg_run.log"

# 6. the CUDA-only tests
echo "=== pytest -m gpu"
timeout 300 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider 2>&1 | tail -n 8 | tee "$OUT/pytest_gpu.txt"
