#!/usr/bin/env bash
# The CPU figures of docs/benchmarks.md, one suite after another (about 1.5 h on the 2-core AMD EPYC).
# Results: benchmarks/results/cpu/<name>/bench.{json,md} (+ PNGs).
#   bash benchmarks/cpu_suite.sh             # everything
#   bash benchmarks/cpu_suite.sh peer_vitb   # only the named runs
# OMP_WAIT_POLICY=PASSIVE: on a machine shared with other jobs, OpenMP's default spin-waiting makes two threads
# several times slower than one; passive waiting removes that (see docs/benchmarks.md). Override it if you like.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
PY=${PYTHON:-.venv/bin/python}
R=benchmarks/results/cpu
ONLY=" $* "

want() { [[ "$ONLY" == "  " || "$ONLY" == *" $1 "* ]]; }
bench() {  # bench NAME ARGS...
  local name=$1; shift
  want "$name" || return 0
  echo "=== $name ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"
  local cache=""
  [[ "$name" == compile_* ]] && cache=$(mktemp -d)  # an empty inductor cache: the compile time is a cold one
  TORCHINDUCTOR_CACHE_DIR=${cache:-${TORCHINDUCTOR_CACHE_DIR:-}} "$PY" -m mae bench --device cpu --output-dir "$R/$name" \
    "$@" 2>&1 | grep -v Warning | tail -n 40
  [[ -n "$cache" ]] && rm -rf "$cache"
}

bench2() {  # bench2 NAME ARGS...: the same under torchrun, 2 processes of 1 thread each (gloo)
  local name=$1; shift
  want "$name" || return 0
  echo "=== $name ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"
  OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m mae bench --device cpu \
    --output-dir "$R/$name" "$@" 2>&1 | grep -v Warning | tail -n 40
}

bench table1c --suite table1c
bench peer_vitb --suite peer --model mae_vit_base_patch16 --batch-size 16 warmup=1 steps=8
bench peer_micro28 --suite peer --model mae_vit_micro_patch4_28 --batch-size 128 warmup=3 steps=20
bench peer_tiny32 --suite peer --model mae_vit_micro_patch4_28 model.img_size=32 model.in_chans=3 --batch-size 128 \
  warmup=3 steps=20
bench table2 --suite table2 table2.batch_size=4 warmup=1 steps=3
bench scaling --suite scaling --model mae_vit_base_patch16 warmup=1 steps=2 "scaling.precisions=[fp32]"
bench data --suite data data.batches=16
bench compile_micro28 --suite peer --model mae_vit_micro_patch4_28 --batch-size 128 compile=true warmup=3 steps=20 \
  "peer.precisions=[bf16]"
bench compile_vitb --suite peer --model mae_vit_base_patch16 --batch-size 16 compile=true warmup=2 steps=3 \
  "peer.precisions=[bf16]"
bench threads1_micro28 --suite peer --model mae_vit_micro_patch4_28 --batch-size 128 --threads 1 warmup=3 steps=20
bench vitl_b32 --model mae_vit_large_patch16 --batch-size 32 warmup=1 steps=1 flop_check=false
bench vitl_b32_ckpt --model mae_vit_large_patch16 --batch-size 32 warmup=1 steps=1 flop_check=false \
  grad_checkpointing=true
# memory per GPU: the plans of the ViT-L/H/2B/6.5B runs, and the planner against measured peaks (docs/benchmarks.md)
bench memory_plan --suite memory
bench2 memory_vitl_2proc --suite memory --model mae_vit_large_patch16 --batch-size 2 --precision fp32 \
  "memory.measure=[ddp,fsdp]" "memory.models=[]"
bench memory_vitb_1proc --suite memory --model mae_vit_base_patch16 --batch-size 8 --precision fp32 \
  "memory.measure=[ddp]" "memory.models=[]"
bench2 memory_micro_2proc --suite memory --model mae_vit_micro_patch4_28 --batch-size 128 --precision fp32 \
  "memory.measure=[ddp,fsdp]" "memory.models=[]"
