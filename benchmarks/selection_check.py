"""Do the prediction modules choose better than chance? Top-1 of a trained model with its predictors'
choices against the same model with random and with inverted choices (same counts per stage), and
with two fixed rules: object-first (grid cells whose pixels differ most from the image's corner, i.e.
from the background, first) and background-first.

    python benchmarks/selection_check.py CHECKPOINT [CHECKPOINT ...] [--images 10000] [--threads 2]
    python benchmarks/selection_check.py DENSE_CHECKPOINT --sparsify-dense --prune-locs 1,2,3

`--sparsify-dense` wraps a dense checkpoint with fresh prediction modules (and fresh fast paths for
ConvNeXt / Swin): how much the choice matters before any fine-tuning (its predictors column is chance).

DynamicViT: each stage keeps k_s of the tokens the previous stage kept (random: a random subset;
inverted: the lowest scores), run on the masked path, which gives the inference path's outputs for the
same decisions. DynamicSpatial: each predictor sends k_s positions through the full FFN. If the three
agree, the predictors have learned nothing that matters and the model is a fixed-capacity one. It also
prints each predictor's keep-probability spread per image (largest minus smallest): near 0, the
predictor scores every position alike and its top-k is decided by noise.
Fashion-MNIST test images at the checkpoint's image size.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import dynamicvit
from dynamicvit.commands._common import int_list
from dynamicvit.data import build_dataset
from dynamicvit.errors import ConfigError, DynamicViTError
from dynamicvit.core.base import SparseModel
from dynamicvit.data import square_img_size


COLUMNS = ("predictors", "random", "inverted", "object-first", "background-first")


def _nested_masks(scores: list[torch.Tensor], counts, choose) -> list[torch.Tensor]:
    """Per stage a (B, N) 0/1 mask with counts[s] ones inside the previous stage's ones."""
    masks, alive = [], torch.ones_like(scores[0], dtype=torch.bool)
    for s, k in zip(scores, counts):
        key = choose(s).masked_fill(~alive, float("-inf"))
        mask = torch.zeros_like(alive).scatter(1, key.topk(k, dim=1).indices, True)
        masks.append(mask.float())
        alive = mask
    return masks


def _object_energy(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, cells): mean absolute difference of each grid cell's pixels from the top-left 4x4 corner."""
    background = x[:, :, :4, :4].mean(dim=(2, 3), keepdim=True)
    energy = (x - background).abs().mean(1, keepdim=True)
    return F.adaptive_avg_pool2d(energy, grid).flatten(1)


def check(path: str, images: int, batch_size: int = 250, sparsify_dense: bool = False, prune_locs=None,
          data: torch.utils.data.Dataset | None = None) -> dict:
    """Top-1 per way of choosing (see the module's text). `data`: test images at the model's size
    (default: Fashion-MNIST's test set)."""
    model = dynamicvit.load_model(path)
    if sparsify_dense:
        model = dynamicvit.sparsify(model, prune_locs=prune_locs)
    elif not isinstance(model, SparseModel):
        raise ConfigError(f"{path} holds a dense model; pass --sparsify-dense to add fresh prediction modules")
    model.eval()
    if data is None:
        data = build_dataset("fashion-mnist", "val", img_size=square_img_size(model))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(min(images, len(data)))), batch_size)
    counts = model.keep_counts()
    generator = torch.Generator().manual_seed(0)
    hits = dict.fromkeys(COLUMNS, 0)
    seen, spread = 0, torch.zeros(len(counts))
    with torch.no_grad():
        for x, y in loader:
            out = model.forward_pruned(x, return_scores=True)
            hits["predictors"] += (out.logits.argmax(1) == y).sum().item()
            scores = [torch.nan_to_num(s, nan=float("-inf")) for s in out.keep_scores]
            spread += torch.stack([_spread(s) for s in scores])
            random = [torch.rand(s.shape, generator=generator) for s in scores]
            energy = _object_energy(x, model.grid_size)
            energy = energy + 1e-6 * torch.rand(energy.shape, generator=generator)  # ties broken at random
            rules = {
                "random": lambda s, r: r,
                "inverted": lambda s, r: -s,
                "object-first": lambda s, r: energy,
                "background-first": lambda s, r: -energy,
            }
            if isinstance(model, dynamicvit.DynamicSpatial):  # each predictor chooses among all positions
                logits = {
                    name: model.forward_pruned(
                        x, kept=[rule(s, r).topk(k, dim=1).indices for s, r, k in zip(scores, random, counts)]).logits
                    for name, rule in rules.items()
                }
            else:  # nested: each stage among the tokens the previous one kept
                logits = {}
                for name, rule in rules.items():
                    pairs = iter(zip(scores, random))
                    masks = _nested_masks(scores, counts, lambda s: rule(*next(pairs)))
                    logits[name] = model.forward_masked(x, decisions=masks).logits
            for name, z in logits.items():
                hits[name] += (z.argmax(1) == y).sum().item()
            seen += len(y)
            print(f"\r{path}: {seen} images", end="", flush=True)
    print()
    return {name: 100.0 * h / seen for name, h in hits.items()} | {"images": seen, "spread": (spread / seen).tolist()}


def _spread(log_p: torch.Tensor) -> torch.Tensor:
    """Summed over the images of a batch: the largest minus the smallest keep probability of a predictor
    among the positions it scored (0: it gives every position the same score)."""
    p = log_p.exp()  # dropped tokens (DynamicViT) score -inf -> 0; leave them out
    alive = torch.isfinite(log_p)
    top = p.masked_fill(~alive, float("-inf")).amax(1)
    bottom = p.masked_fill(~alive, float("inf")).amin(1)
    return (top - bottom).sum()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sparsify-dense", action="store_true",
                        help="the checkpoints are dense: add fresh prediction modules (and fast paths) first")
    parser.add_argument("--prune-locs", type=int_list, default=None,
                        help="with --sparsify-dense: e.g. 1,2,3 (default: the model's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows = [(path, check(path, args.images, sparsify_dense=args.sparsify_dense, prune_locs=args.prune_locs))
                for path in args.checkpoints]
    except DynamicViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'checkpoint':<60} " + " ".join(f"{c:>16}" for c in COLUMNS))
    for path, r in rows:
        print(f"{path:<60} " + " ".join(f"{r[c]:>16.2f}" for c in COLUMNS))
    print("keep-probability spread per predictor (mean over images of the largest minus the smallest):")
    for path, r in rows:
        print(f"{path:<60} " + " / ".join(f"{v:.3f}" for v in r["spread"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
