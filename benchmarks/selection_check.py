"""Do the prediction modules choose better than chance? Top-1 of a trained model with its predictors'
choices against the same model with random and with inverted choices (same counts per stage).

    python benchmarks/selection_check.py CHECKPOINT [CHECKPOINT ...] [--images 10000] [--threads 2]

DynamicViT: each stage keeps k_s of the tokens the previous stage kept (random: a random subset;
inverted: the lowest scores), run on the masked path, which gives the inference path's outputs for the
same decisions. DynamicSpatial: each predictor sends k_s positions through the full FFN. If the three
agree, the predictors have learned nothing that matters and the model is a fixed-capacity one.
Fashion-MNIST test images at the checkpoint's image size.
"""
from __future__ import annotations

import argparse

import torch

import dynamicvit
from dynamicvit.data import build_dataset
from dynamicvit.train import _img_size


def _nested_masks(scores: list[torch.Tensor], counts, choose) -> list[torch.Tensor]:
    """Per stage a (B, N) 0/1 mask with counts[s] ones inside the previous stage's ones."""
    masks, alive = [], torch.ones_like(scores[0], dtype=torch.bool)
    for s, k in zip(scores, counts):
        key = choose(s).masked_fill(~alive, float("-inf"))
        mask = torch.zeros_like(alive).scatter(1, key.topk(k, dim=1).indices, True)
        masks.append(mask.float())
        alive = mask
    return masks


def check(path: str, images: int, batch_size: int = 250) -> dict:
    model = dynamicvit.load_model(path).eval()
    data = build_dataset("fashion-mnist", "val", img_size=_img_size(model))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(min(images, len(data)))), batch_size)
    counts = model.keep_counts()
    generator = torch.Generator().manual_seed(0)
    hits = {"predictors": 0, "random": 0, "inverted": 0}
    seen = 0
    with torch.no_grad():
        for x, y in loader:
            out = model.forward_pruned(x, return_scores=True)
            hits["predictors"] += (out.logits.argmax(1) == y).sum().item()
            scores = [torch.nan_to_num(s, nan=float("-inf")) for s in out.keep_scores]
            random = [torch.rand(s.shape, generator=generator) for s in scores]
            if isinstance(model, dynamicvit.DynamicSpatial):
                runs = {
                    "random": [r.topk(k, dim=1).indices for r, k in zip(random, counts)],
                    "inverted": [(-s).topk(k, dim=1).indices for s, k in zip(out.keep_scores, counts)],
                }
                logits = {name: model.forward_pruned(x, kept=kept).logits for name, kept in runs.items()}
            else:
                rand_iter = iter(random)
                runs = {
                    "random": _nested_masks(scores, counts, lambda s: next(rand_iter)),
                    "inverted": _nested_masks(scores, counts, lambda s: -s),
                }
                logits = {name: model.forward_masked(x, decisions=d).logits for name, d in runs.items()}
            for name, z in logits.items():
                hits[name] += (z.argmax(1) == y).sum().item()
            seen += len(y)
            print(f"\r{path}: {seen} images", end="", flush=True)
    print()
    return {name: 100.0 * h / seen for name, h in hits.items()} | {"images": seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'checkpoint':<60} {'predictors':>10} {'random':>8} {'inverted':>9}")
    for path in args.checkpoints:
        r = check(path, args.images)
        print(f"{path:<60} {r['predictors']:>10.2f} {r['random']:>8.2f} {r['inverted']:>9.2f}")


if __name__ == "__main__":
    main()
