"""Top-1 against MACs at equal budgets: DynamicViT variants and the token-merging baseline, all fine-tuned
from the demo's Fashion-MNIST teacher with the demo's recipe.

    python benchmarks/frontier.py --output frontier --threads 2                 # fused and merged variants
    python benchmarks/frontier.py --output frontier --variants fused,merged,plain-0.25 --seed 1
    python benchmarks/frontier.py --output frontier-smoke --quick               # a dry run in a minute or two
    python benchmarks/frontier.py --output all --combine a/frontier.json,b/frontier.json  # one table and plot

Every model starts from the same dense teacher (the one shipped with dynamicvit, or --teacher) and is
fine-tuned with `dynamicvit.training.loop.train` and the settings `dynamicvit demo` uses
(`demo.fine_tune_config`: optimizer, learning rates, schedule, warmup, augmentation, gradient clipping,
epochs, training images):
- the DynamicViT variants (`VARIANTS`: where the dropped tokens go, and the elastic keep-ratio range)
  with the full DynamicViT objective, one model for every keep ratio of the range;
- the merging baseline (`benchmarks/merging.py`: bipartite soft matching, proportional attention) with
  CE + KL to the teacher, r drawn per step from --r-range, one model for every r.
A model whose folder under --output already holds finetune/model.safetensors is loaded instead
(--retrain trains it again in a new folder next to it).

The budgets are the baseline's MACs at each r of --r-values (one image, every matrix product, the
matching and the merges included: `dynamicvit.runtime.flops.count_macs`). Each variant is evaluated at
the keep ratio whose MACs are closest to each budget, when within --tolerance (1%); otherwise the cell
is empty. The table and frontier.json list the MACs of every cell; frontier.png draws top-1 against MACs,
with the baseline also without training and the dense teacher. A run in a folder whose frontier.json
has the same baseline and settings adds its variants to it; an earlier report of other settings is
kept as frontier.earlier-N.json.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import torch

from dynamicvit.commands._common import int_list
from dynamicvit.data import build_dataset, resolve_dataset
from dynamicvit.demo import DATASET, FINETUNE_DIR, DemoConfig, fine_tune_config, load_teacher, teacher_path
from dynamicvit.errors import ConfigError, DynamicViTError
from dynamicvit.evaluate import evaluate
from dynamicvit.extras import require
from dynamicvit.files import atomic_write
from dynamicvit.runtime.device import resolve_device
from dynamicvit.runtime.flops import count_macs
from dynamicvit.core.settings import keep_counts
from dynamicvit.training.loop import train
from dynamicvit.weights.build import load_model

_spec = importlib.util.spec_from_file_location("merging", Path(__file__).resolve().parent / "merging.py")
merging = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(merging)

_logger = logging.getLogger("frontier")

# name -> DemoConfig settings: where the dropped tokens go and the keep ratios trained for.
VARIANTS = {
    "fused": dict(keep_ratios="low:0.4:1.0", fuse_dropped=True),  # the demo's shipped recipe
    "merged": dict(keep_ratios="low:0.25:1.0", merge_dropped=True),
    # Without token distillation (as the baseline): a merged token holds several patches, and the
    # teacher's single token at its place pulls it away from what it holds.
    "merged-kl": dict(keep_ratios="low:0.25:1.0", merge_dropped=True, token_weight=0.0),
    # A stage before every block but the first, as the baseline changes the sequence in every block: the
    # budget reaches 4.6 M MACs (rho 0.3) instead of 6.8 M with stages 2, 3, 4.
    "merged-deep": dict(keep_ratios="low:0.5:1.0", merge_dropped=True, prune_locs=(1, 2, 3, 4, 5)),
    "merged-deep-kl": dict(keep_ratios="low:0.5:1.0", merge_dropped=True, prune_locs=(1, 2, 3, 4, 5), token_weight=0.0),
    # The token distillation target of a merged token: the teacher's tokens averaged over what it holds.
    "merged-deep-held": dict(keep_ratios="low:0.5:1.0", merge_dropped=True, prune_locs=(1, 2, 3, 4, 5), token_target="held"),
    # The same with keep ratios drawn uniformly: "low" rarely trains near 1.0, and at every token the
    # fine-tuned backbone of merged-deep-held is below the baseline's (89.05 against 89.43, seed 1).
    "merged-deep-held-uniform": dict(keep_ratios="0.5:1.0", merge_dropped=True, prune_locs=(1, 2, 3, 4, 5),
                                     token_target="held"),
    # The same with the reference's keep-ratio loss weight (2 instead of the demo's 10): the loss reaches
    # the backbone through the prediction modules' input, and at every token the backbone stays near the
    # teacher while the baseline's ends above it.
    "merged-deep-held-r2": dict(keep_ratios="low:0.5:1.0", merge_dropped=True, prune_locs=(1, 2, 3, 4, 5),
                                token_target="held", ratio_weight=2.0),
    # merged-deep-held with prediction modules of width 16 instead of 64: at 6.1 M MACs the five modules
    # of width 64 cost 0.60 M (9.8%); these about a fifth of that, left to the tokens.
    "merged-deep-held-slim": dict(keep_ratios="low:0.5:1.0", merge_dropped=True, prune_locs=(1, 2, 3, 4, 5),
                                  token_target="held", predictor_width=16),
    # Slim, with the reference's ratio-loss weight; and slim with the demo's weight but no gradient from
    # the prediction modules into the backbone (at weight 2 the backbone with every token kept rose from
    # 89.05 to 89.28%, seed 1, but the kept fractions drifted above their targets).
    "merged-deep-held-slim-r2": dict(keep_ratios="low:0.5:1.0", merge_dropped=True, prune_locs=(1, 2, 3, 4, 5),
                                     token_target="held", predictor_width=16, ratio_weight=2.0),
    "merged-deep-held-slim-detached": dict(keep_ratios="low:0.5:1.0", merge_dropped=True, prune_locs=(1, 2, 3, 4, 5),
                                           token_target="held", predictor_width=16, detach_predictor_input=True),
    "merged-0.4": dict(keep_ratios="low:0.4:1.0", merge_dropped=True),
    "fused-0.25": dict(keep_ratios="low:0.25:1.0", fuse_dropped=True),
    "plain-0.25": dict(keep_ratios="low:0.25:1.0", fuse_dropped=False),
}
BASELINE = "merging"  # the baseline's folder and column
R_RANGE = (4, 10)  # r drawn per training step, as in the measurement the issue reports
R_VALUES = tuple(range(1, 13))
RATIO_GRID = tuple(round(0.2 + 0.005 * i, 3) for i in range(161))  # keep ratios searched for equal MACs
TOLERANCE = 0.01


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for the fine-tuned models, frontier.json and frontier.png")
    p.add_argument("--variants", default="fused,merged", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--r-range", type=int_list, default=list(R_RANGE), metavar="LO,HI", help="r drawn per training step")
    p.add_argument("--r-values", type=int_list, default=list(R_VALUES), metavar="R,R,...", help="budgets: the baseline at these r")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest relative MAC difference of an equal budget")
    p.add_argument("--teacher", default=None, help="dense teacher checkpoint (default: the demo's)")
    p.add_argument("--prune-locs", type=int_list, default=None, metavar="I,J,K",
                   help="every variant's stages (default: the variant's own, else the demo's, 2,3,4 for its teacher; the "
                        "lowest budget they reach is set by the blocks before the first stage: 6.8 M MACs at rho 0.2 "
                        "with 2,3,4)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the demo's elastic recipe, 6)")
    p.add_argument("--train-images", type=int, default=None, help="fine-tune on a random subset (default: all 60,000)")
    p.add_argument("--test-images", type=int, default=None, help="evaluate on a subset (default: all 10,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--retrain", action="store_true", help="fine-tune again even where a model is saved")
    p.add_argument("--quick", action="store_true", help="a dry run: the demo's quick settings, few budgets")
    p.add_argument("--combine", default=None, metavar="JSON,JSON,...",
                   help="train and evaluate nothing: one table and plot from the frontier.json of earlier runs "
                        "(the same baseline and test images; a variant named twice is taken from the last)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def recipe(args: argparse.Namespace, **variant) -> DemoConfig:
    """The demo's settings for one model (its elastic recipe unless `variant` says otherwise)."""
    given = {k: getattr(args, k) for k in ("epochs", "train_images", "test_images") if getattr(args, k) is not None}
    if args.prune_locs:
        given["prune_locs"] = tuple(args.prune_locs)
    common = {**dict(seed=args.seed, teacher=args.teacher, progress=args.progress), **variant, **given}
    cfg = DemoConfig.quick_mode(**common) if args.quick else DemoConfig(**common)
    cfg.validate()
    return cfg


def fine_tuned(path: Path, retrain: bool, fit) -> torch.nn.Module:
    """The model saved under `path` (`path`/finetune is its training run), or `fit(folder)` there (a new
    folder with --retrain)."""
    saved = path / FINETUNE_DIR / "model.safetensors"
    if saved.is_file() and not retrain:
        _logger.info("loading %s", saved)
        return load_model(saved).eval()
    folder = path
    while folder.exists():  # never replace an earlier run
        folder = folder.with_name(folder.name + "+")
    return fit(folder)


def train_variant(name: str, args, teacher_file: Path, out: Path, device) -> torch.nn.Module:
    cfg = recipe(args, **VARIANTS[name])
    return fine_tuned(out / name, args.retrain, lambda folder: train(fine_tune_config(cfg, folder, teacher_file, device)).model)


def train_baseline(args, teacher_file: Path, teacher: torch.nn.Module, out: Path, device) -> torch.nn.Module:
    """The merging baseline fine-tuned with the variants' recipe (the first variant's elastic settings
    without the DynamicViT parts), CE + KL to the teacher, r drawn per step from --r-range."""
    lo, hi = args.r_range
    cfg = recipe(args, **VARIANTS[args.variants[0]])

    def fit(folder: Path) -> torch.nn.Module:
        base = dataclasses.replace(fine_tune_config(cfg, folder, teacher_file, device),
                                   keep_ratios=None, fuse_dropped=False, merge_dropped=False, prune_locs=None)
        student = merging.TokenMergingViT(copy.deepcopy(teacher), r=hi, r_range=(lo, hi))
        return train(base, models=(student, copy.deepcopy(teacher))).model.backbone

    return fine_tuned(out / BASELINE, args.retrain, fit)


def equal_budget(model, target: int, tolerance: float) -> Optional[tuple[float, int]]:
    """(keep ratio, MACs) of `model` closest to `target` MACs, when within `tolerance`; the MACs depend on
    the keep counts alone, so each distinct set of counts is counted once."""
    by_counts: dict[tuple, tuple[float, int]] = {}
    for rho in RATIO_GRID:
        counts = keep_counts(model.num_patches, rho, len(model.prune_locs))
        if counts not in by_counts:
            by_counts[counts] = (rho, count_macs(model.at_keep_ratio(rho)).total)
    rho, macs = min(by_counts.values(), key=lambda v: abs(v[1] / target - 1))
    return (rho, macs) if abs(macs / target - 1) <= tolerance else None


def frontier(variants: dict, baseline, teacher, loader, device, r_values, tolerance: float) -> list[dict]:
    """One row per budget (the baseline's MACs at each r): top-1 and MACs of every model there."""
    rows = []
    for r in r_values:
        tuned = merging.TokenMergingViT(baseline, r=r).eval()
        untrained = merging.TokenMergingViT(teacher, r=r).eval()
        macs = count_macs(tuned).total
        row = {"r": r, "macs": macs, BASELINE: evaluate(tuned, loader, device)["top1"],
               f"{BASELINE}-untrained": evaluate(untrained, loader, device)["top1"], "variants": {}}
        for name, model in variants.items():
            match = equal_budget(model, macs, tolerance)
            if match is None:
                row["variants"][name] = None
                continue
            rho, vmacs = match
            row["variants"][name] = {"keep_ratio": rho, "macs": vmacs,
                                     "top1": evaluate(model.at_keep_ratio(rho).eval(), loader, device)["top1"]}
        rows.append(row)
        _logger.info("r %d, %.2f M MACs: %s", r, macs / 1e6, _cells(row))
    return rows


def _cells(row: dict) -> str:
    parts = [f"{BASELINE} {row[BASELINE]:.2f}", f"untrained {row[BASELINE + '-untrained']:.2f}"]
    for name, v in row["variants"].items():
        parts.append(f"{name} " + ("-" if v is None else f"{v['top1']:.2f} (rho {v['keep_ratio']:g})"))
    return ", ".join(parts)


def format_table(rows: list[dict], dense: dict, names: list[str]) -> str:
    head = ["MACs (M)", *names, f"{BASELINE} fine-tuned (r)", f"{BASELINE}, no training"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    lines.append(" | ".join([f"{dense['macs'] / 1e6:.2f}", *(f"{dense['top1']:.2f} (dense)" for _ in names),
                             f"{dense['top1']:.2f} (0)", f"{dense['top1']:.2f}"]))
    for row in rows:
        cells = [f"{row['macs'] / 1e6:.2f}"]
        for name in names:
            v = row["variants"][name]
            cells.append("-" if v is None else f"{v['top1']:.2f} ({v['keep_ratio']:g}, {v['macs'] / 1e6:.2f} M)")
        cells += [f"{row[BASELINE]:.2f} ({row['r']})", f"{row[BASELINE + '-untrained']:.2f}"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def save_plot(rows: list[dict], dense: dict, names: list[str], path: Path) -> Path:
    require("matplotlib", "the frontier plot").use("Agg")
    plt = require("matplotlib.pyplot", "the frontier plot")
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for name in names:
        pts = [(v["macs"] / 1e6, v["top1"]) for v in (r["variants"][name] for r in rows) if v is not None]
        if pts:
            ax.plot(*zip(*sorted(pts)), "o-", label=f"DynamicViT {name}")
    for key, style, label in ((BASELINE, "s-", "merging, fine-tuned"), (BASELINE + "-untrained", "s--", "merging, no training")):
        ax.plot([r["macs"] / 1e6 for r in rows], [r[key] for r in rows], style, ms=4, label=label)
    ax.plot([dense["macs"] / 1e6], [dense["top1"]], "*", ms=14, color="tab:red", label="dense teacher")
    ax.set_xlabel("MMACs per image")
    ax.set_ylabel("top-1 on the test set (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Fashion-MNIST: top-1 against MACs at equal budgets")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def combine(paths: list[str]) -> dict:
    """One report from several runs' frontier.json: every variant's cells next to the one baseline."""
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--combine: cannot read {path} ({e}); pass the frontier.json files earlier runs wrote") from None
    for path, rep in zip(paths[1:], reports[1:]):
        if _settings(rep) != _settings(reports[0]):
            raise ConfigError(f"--combine: {path} has another baseline, seed or test set than {paths[0]}; combine runs "
                              "that share the baseline's folder and settings")
    return {**_merged(reports), "combined": paths}


def _settings(report: dict) -> tuple:
    """What reports must share to sit in one table: the baseline's budgets and top-1, seed, test set."""
    return [(r["r"], r["macs"], r[BASELINE]) for r in report["rows"]], report["test_images"], report["seed"]


def _merged(reports: list[dict]) -> dict:
    """The reports' variants side by side (a variant in several: the last one's cells)."""
    out = {**reports[0], "rows": [dict(r, variants={}) for r in reports[0]["rows"]], "variants": {}, "prune_locs": {}}
    for rep in reports:
        out["variants"].update(rep["variants"])
        out["prune_locs"].update(rep["prune_locs"])
        for row, theirs in zip(out["rows"], rep["rows"]):
            row["variants"].update(theirs["variants"])
    return out


def with_earlier(report: dict, out: Path) -> dict:
    """A run whose folder already holds a frontier.json adds its variants to it (the same baseline and
    settings; a variant run again replaces its cells); an earlier report of other settings is kept
    under a new name, never replaced."""
    path = out / "frontier.json"
    if not path.is_file():
        return report
    try:
        earlier = json.loads(path.read_text())
        same = _settings(earlier) == _settings(report)
    except (ValueError, KeyError, TypeError):
        same = False
    if same:
        _logger.info("adding %s to the variants of %s", ", ".join(report["variants"]), path)
        return _merged([earlier, report])
    _set_aside(path)
    return report


def _set_aside(path: Path) -> None:
    """Keep an earlier report under the first free name frontier.earlier-N.json."""
    aside = next(p for p in (path.with_name(f"frontier.earlier-{i}.json") for i in range(1, 10_000)) if not p.exists())
    path.rename(aside)
    _logger.info("the earlier %s is kept as %s", path, aside)


def write_report(report: dict, out: Path) -> dict:
    names = list(report["variants"])
    atomic_write(out / "frontier.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    report["plot"] = str(save_plot(report["rows"], report["dense"], names, out / "frontier.png"))
    print(format_table(report["rows"], report["dense"], names))
    print(f"\n{report['test_images']} test images, seed {report['seed']}; frontier.json and frontier.png in {out}")
    return report


def run(args: argparse.Namespace) -> dict:
    if args.combine:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        paths = [p for p in args.combine.split(",") if p]
        report = combine(paths)
        target = out / "frontier.json"
        if target.is_file() and not any(Path(p).resolve() == target.resolve() for p in paths):
            _set_aside(target)
        return write_report(report, out)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        raise ConfigError(f"--variants: unknown {unknown or 'none given'}; choose from {', '.join(VARIANTS)}")
    if len(args.r_range) != 2 or not 0 <= args.r_range[0] <= args.r_range[1]:
        raise ConfigError(f"--r-range must be LO,HI with 0 <= LO <= HI, got {args.r_range}")
    if args.quick and args.r_values == list(R_VALUES):
        args.r_values = [4, 8]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    info = resolve_dataset(DATASET)
    teacher_file = teacher_path(args.teacher)
    teacher = load_teacher(teacher_file, info).to(device)
    test_images = recipe(args).test_images
    test_set = build_dataset(DATASET, "val", img_size=int(teacher.patch_embed.img_size[0]), subset=test_images, seed=args.seed)
    loader = torch.utils.data.DataLoader(test_set, batch_size=500, shuffle=False)

    variants = {name: train_variant(name, args, teacher_file, out, device).to(device).eval() for name in args.variants}
    baseline = train_baseline(args, teacher_file, teacher, out, device).to(device).eval()
    dense = {"macs": count_macs(teacher).total, "top1": evaluate(teacher, loader, device)["top1"]}
    rows = frontier(variants, baseline, teacher, loader, device, args.r_values, args.tolerance)
    report = {"dense": dense, "rows": rows, "variants": {n: VARIANTS[n] for n in args.variants},
              "prune_locs": {n: list(m.prune_locs) for n, m in variants.items()},
              "r_range": list(args.r_range), "tolerance": args.tolerance, "seed": args.seed,
              "test_images": len(test_set), "quick": args.quick}
    return write_report(with_earlier(report, out), out)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(parse_args(argv))
    except DynamicViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
