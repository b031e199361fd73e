"""Do the spatial predictors learn to choose when the choice must matter? Fashion-MNIST items placed at a
random spot of a blank canvas twice their size, so that about a quarter of the stage-3 map holds the
object and the rest is empty; a small ConvNeXt is trained dense here (the teacher), fine-tuned as
DynamicSpatial, and `selection_check` compares its predictors' choices with random, inverted,
object-first and background-first ones on the 10,000 test items (each at a fixed spot).

On plain Fashion-MNIST (the item fills the image) the fine-tuned spatial models are indifferent to
which positions take the full path (docs/experiments/2026-11-27-spatial-fashion-mnist.md); this is the
control experiment (docs/experiments/2026-11-27-spatial-canvas.md).

    python benchmarks/spatial_canvas.py [--output runs/spatial-canvas] [--keep-ratios 0.7,0.5]
        [--teacher-epochs 4 | --teacher FILE] [--student-epochs 2] [--threads 2]

Writes OUTPUT/teacher, OUTPUT/dynamic-<rho> (training runs), OUTPUT/selection.md (the table) and
OUTPUT/dynamic-<rho>/choices.png (which positions took the full path on 8 test items).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import dynamicvit
from dynamicvit.commands._common import positive_float_list, positive_int
from dynamicvit.data import FASHION_MNIST, fashion_mnist_root
from dynamicvit.errors import ConfigError, DynamicViTError
from dynamicvit.evaluate import evaluate
from dynamicvit.training.config import TrainConfig
from dynamicvit.training.loop import train
from dynamicvit.visualize import save_contact_sheet

sys.path.insert(0, str(Path(__file__).parent))
from selection_check import COLUMNS, check  # noqa: E402

ARCH = {"depths": [1, 1, 9, 1], "dims": [16, 32, 64, 128], "img_size": 112}
COMMON = dict(dataset="fashion-mnist", batch_size=128, num_workers=1, tensorboard=False, seed=0, mixup=0.0,
              cutmix=0.0, smoothing=0.1, weight_decay=0.05, clip_grad=1.0, min_lr=1e-6)


class CanvasFashionMNIST(Dataset):
    """Fashion-MNIST items at a random spot of a `canvas`-pixel blank field, resized to `img_size`.

    Training items get a new spot (and a horizontal flip half the time) at every access; test items a
    fixed spot drawn from `seed`."""

    def __init__(self, split: str, canvas: int = 56, img_size: int = 112, seed: int = 0):
        from torchvision.datasets import FashionMNIST

        base = FashionMNIST(str(fashion_mnist_root()), train=split == "train", download=False)
        self.images, self.targets = base.data, base.targets
        self.train, self.canvas, self.img_size = split == "train", canvas, img_size
        room = canvas - self.images.shape[-1] + 1
        self.spots = torch.randint(0, room, (len(self.images), 2), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        item = self.images[i].float() / 255.0
        size = item.shape[-1]
        if self.train:
            top, left = torch.randint(0, self.canvas - size + 1, (2,)).tolist()
            if torch.rand(()) < 0.5:
                item = item.flip(-1)
        else:
            top, left = self.spots[i].tolist()
        field = torch.zeros(self.canvas, self.canvas)
        field[top:top + size, left:left + size] = item
        x = F.interpolate(field[None, None], size=self.img_size, mode="bilinear", align_corners=False)[0]
        x = (x - FASHION_MNIST.mean[0]) / FASHION_MNIST.std[0]
        return x, int(self.targets[i])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/spatial-canvas")
    parser.add_argument("--keep-ratios", type=positive_float_list, default=[0.7, 0.5])
    parser.add_argument("--teacher-epochs", type=positive_int, default=4)
    parser.add_argument("--teacher", default=None, help="a canvas teacher trained before (default: OUTPUT/teacher)")
    parser.add_argument("--student-epochs", type=positive_int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut epochs short (a smoke run)")
    parser.add_argument("--images", type=int, default=10000, help="test items for the selection check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    except DynamicViTError as e:  # a missing teacher, a bad keep ratio, a non-empty run folder, ...
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    teacher = Path(args.teacher) if args.teacher else out / "teacher" / "model.safetensors"
    if args.teacher and not teacher.is_file():
        raise ConfigError(f"no teacher at {teacher}: pass a canvas teacher's model.safetensors, or leave out --teacher "
                          "to train one in OUTPUT/teacher")
    train_set, test_set = CanvasFashionMNIST("train"), CanvasFashionMNIST("val")
    test_set = torch.utils.data.Subset(test_set, range(min(args.images, len(test_set))))
    common = {**COMMON, "max_steps_per_epoch": args.max_steps_per_epoch}
    val_set = torch.utils.data.Subset(test_set, range(min(2000, len(test_set))))

    if not teacher.exists():
        train(TrainConfig(dense=True, model="convnext_tiny", timm_kwargs={**ARCH, "num_classes": 10, "in_chans": 1},
                          output=str(out / "teacher"), epochs=args.teacher_epochs, lr=2e-3, warmup_epochs=0.5, **common),
              train_set=train_set, val_set=val_set)
    rows = {}
    for rho in args.keep_ratios:
        run_dir = out / f"dynamic-{rho}"
        if not (run_dir / "model.safetensors").exists():
            train(TrainConfig(teacher=str(teacher), output=str(run_dir), prune_locs=[1, 2, 3], keep_ratio=rho,
                              ratio_weight=10.0, distill_weight=0.5, token_weight=0.5, epochs=args.student_epochs,
                              lr=3e-3, backbone_lr_scale=0.333, freeze_backbone_epochs=0, warmup_epochs=0.2, **common),
                  train_set=train_set, val_set=val_set)
        rows[f"DynamicSpatial {rho}, fine-tuned"] = check(str(run_dir / "model.safetensors"), len(test_set), data=test_set)
        model = dynamicvit.load_model(run_dir / "model.safetensors").eval()
        images = torch.stack([test_set[i][0] for i in range(8)])
        save_contact_sheet(model, images, run_dir / "choices.png", mean=FASHION_MNIST.mean, std=FASHION_MNIST.std,
                           titles=[FASHION_MNIST.classes[test_set[i][1]] for i in range(8)])
    rows["teacher + fresh predictors and fast paths, 0.7"] = check(
        str(teacher), len(test_set), data=test_set, sparsify_dense=True, prune_locs=[1, 2, 3])
    dense = evaluate(dynamicvit.load_model(teacher), torch.utils.data.DataLoader(test_set, 250))
    lines = [f"Teacher (dense) top-1 on the {dense['images']} canvas test items: {dense['top1']:.2f}", "",
             "| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    lines += [f"| {name} | " + " | ".join(f"{r[c]:.2f}" for c in COLUMNS) + " |" for name, r in rows.items()]
    lines += ["", "Keep-probability spread per predictor (mean over images of the largest minus the smallest):"]
    lines += [f"- {name}: " + " / ".join(f"{v:.3f}" for v in r["spread"]) for name, r in rows.items()]
    (out / "selection.md").write_text("\n".join(lines) + "\n")
    (out / "selection.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
