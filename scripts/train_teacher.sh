#!/usr/bin/env bash
# Reproduce the dense Fashion-MNIST teacher that `dynamicvit demo` ships
# (src/dynamicvit/assets/fmnist_vit_teacher.safetensors + .json) with the project's own `train` command.
# About 25 minutes on 2 idle CPU cores (15 epochs of 90 s). Extra arguments go to `dynamicvit train` (e.g. --data-dir DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
OUT="${TEACHER_RUN_DIR:-runs/fmnist-teacher}"
ASSET="$ROOT/src/dynamicvit/assets/fmnist_vit_teacher"

# A ViT sized for a CPU: 28 px grayscale images, 4 px patches (7x7 = 49 tokens), width 64, 6 blocks,
# 4 heads, class-token pooling (0.31 M parameters, 0.017 GMACs per image).
ARCH='{"patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4, "global_pool": "token"}'
ARGS=(
    --dense --model vit_tiny_patch16_224 --timm-kwargs "$ARCH"
    --dataset fashion-mnist --output "$OUT"
    --epochs 15 --batch-size 128 --lr 2e-3 --warmup-epochs 1 --min-lr 1e-5 --weight-decay 0.05
    --clip-grad 1.0 --smoothing 0.1 --mixup 0 --cutmix 0 --seed 0 --num-workers 1 --no-tensorboard
)
"$VENV/bin/dynamicvit" train "${ARGS[@]}" "$@"

# Install the result as the demo's teacher, with a description of how it was made.
"$VENV/bin/python" - "$OUT/model.safetensors" "$ASSET" "${ARGS[*]} $*" <<'PY'
import datetime, hashlib, json, platform, shutil, sys
from pathlib import Path

import timm, torch

import dynamicvit
from dynamicvit.weights.formats import read_checkpoint

src, asset, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
_, settings = read_checkpoint(src)
final = (settings.get("extra") or {}).get("final") or {}
model = dynamicvit.load_model(src)
dst = asset.with_suffix(".safetensors")
shutil.copyfile(src, dst)
info = {
    "description": "dense ViT teacher for `dynamicvit demo` on Fashion-MNIST",
    "made_by": "bash scripts/train_teacher.sh",
    "command": f"dynamicvit train {args}",
    "model_name": settings["model_name"],
    "timm_kwargs": settings["timm_kwargs"],
    "params": sum(p.numel() for p in model.parameters()),
    "epochs": (settings.get("extra") or {}).get("epochs_done"),
    "val_top1": final.get("val_top1"),
    "val_top5": final.get("val_top5"),
    "val_images": 10000,
    "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(),
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "versions": {"torch": torch.__version__, "timm": timm.__version__, "dynamicvit": dynamicvit.__version__,
                 "python": platform.python_version()},
}
dst.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
print(f"teacher: {dst} (val top-1 {info['val_top1']}); description: {dst.with_suffix('.json')}")
PY
