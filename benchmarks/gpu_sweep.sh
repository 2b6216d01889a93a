#!/usr/bin/env bash
# The GPU sweeps behind results/efficiency/gpu_*.csv, sized for a short lease of one GPU:
#   OUT=results/efficiency bash benchmarks/gpu_sweep.sh [part ...]
# Random-weight model shapes in fp16: dense vs 20 % depth- vs width-pruned (same parameter
# count), measured interleaved. Parts (default: all, in this order):
#   128   LLaMA-1-7B, batch 1..256, 128 new tokens, 2 rounds
#   13b   Vicuna-13B, batch 1 and 64, 128 new tokens
#   512   LLaMA-1-7B, batch 1 and 16, 512 new tokens
#   sens  (not in the default) the PPL-sensitivity sweep, naive vs prefix reuse, on the
#         LLaMA-1-7B shape: results/importance/bench_sensitivity_gpu_llama-1-7b.txt
# Each part has its own time limit (T_<part> seconds); its CSV is rewritten after every run,
# so a part cut short keeps what it measured.
set -u
OUT=${OUT:-results/efficiency}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
bench() { timeout "$1" python3 benchmarks/bench_generation.py --preset paper "${@:2}"; local rc=$?; echo "exit $rc"; return $rc; }
# a few seconds: fails fast if anything is broken before the long parts start
bench 120 --arch llama-1-7b --batch-sizes 1 --new-tokens 8 --rounds 1 --repeats 1 --out /tmp/gpu_check.csv || exit 1
parts=("$@"); [ $# -gt 0 ] || parts=(128 13b 512)
for part in "${parts[@]}"; do
  case $part in
    128) bench "${T_128:-300}" --arch llama-1-7b --batch-sizes 1 16 64 256 --new-tokens 128 --rounds 2 --repeats 1 \
           --out "$OUT/gpu_llama-1-7b_128.csv" ;;
    512) bench "${T_512:-240}" --arch llama-1-7b --batch-sizes 1 16 --new-tokens 512 --rounds 1 --repeats 1 \
           --out "$OUT/gpu_llama-1-7b_512.csv" ;;
    sens) mkdir -p results/importance
          timeout "${T_sens:-180}" python3 benchmarks/bench_sensitivity.py --arch llama-1-7b --device cuda --repeats 5 \
            | tee results/importance/bench_sensitivity_gpu_llama-1-7b.txt ;;
    13b) bench "${T_13b:-120}" --arch vicuna-13b --batch-sizes 1 64 --new-tokens 128 --rounds 1 --repeats 1 \
           --out "$OUT/gpu_vicuna-13b_128.csv" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
