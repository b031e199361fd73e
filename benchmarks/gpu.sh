#!/usr/bin/env bash
# The GPU table in one run (benchmarks/gpu_table.py): dense timm DeiT-S / DeiT-B against
# DynamicViT at keep ratio 0.7, eager (bf16 autocast, bf16 weights), torch.compile, CUDA graphs,
# batch 256 and 1, timm's and the fast patch embedding, the training step, the free-predictor bound.
# Then the per-image budget against the fixed one at the same mean token count (benchmarks/
# per_image_speed.py: DeiT-S, bf16, batch 256, varlen_attn and the padded kernel).
#
#   benchmarks/gpu.sh                    # on a GPU machine, from anywhere; --budget-s caps it at 5 minutes
#   benchmarks/gpu.sh --device cpu       # dry run at tiny sizes (checks the plumbing, not speed)
#   OUT=results benchmarks/gpu.sh        # where gpu_table.md / gpu_table.json go (default: gpu-results)
#
# Needs torch and timm; runs the checkout's sources (PYTHONPATH=src), no install needed.
# Extra arguments go to gpu_table.py (--repeats, --batch, --no-compile, --budget-s, ...); with --device cpu
# the per-image comparison is a dry run too.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python3}"
out="${OUT:-gpu-results}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader >&2 || true
fi
"$python" -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}, cuda {torch.version.cuda}")' >&2
"$python" "$root/benchmarks/gpu_table.py" --output "$out" "$@"
if [[ " $* " == *" --device cpu "* ]]; then
    per_image=(--dry-run)
else
    per_image=(--device cuda --amp bf16 --batch-sizes 256 --kernels varlen,padded)
fi
"$python" "$root/benchmarks/per_image_speed.py" "${per_image[@]}" --json "$out/per_image_speed.json" | tee "$out/per_image_speed.md"
