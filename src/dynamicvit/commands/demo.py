"""`dynamicvit demo`: Fashion-MNIST end to end, dense teacher vs DynamicViT, in minutes on a CPU."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import int_list, non_negative_int, positive_int

HELP = "Fashion-MNIST end to end: dense teacher vs DynamicViT, accuracy, MACs, speed, pictures."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..core.losses import TOKEN_TARGETS
    from ..demo import DemoConfig

    d = DemoConfig()
    parser.add_argument("--output", default=d.output, metavar="DIR",
                        help=f"folder for report.json, the pictures and the fine-tuned model (default: {d.output})")
    parser.add_argument("--data", dest="data_dir", default=None, metavar="DIR",
                        help="folder with the Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--download", action="store_true", help="download Fashion-MNIST when it is missing (needs internet)")
    parser.add_argument("--teacher", default=None, metavar="PATH",
                        help="dense teacher checkpoint (default: the small ViT shipped with dynamicvit)")
    parser.add_argument("--keep-ratio", type=float, default=d.keep_ratio,
                        help=f"rho: stage s keeps int(49 * rho^s) patch tokens (default: {d.keep_ratio})")
    parser.add_argument("--keep-ratios", default=d.keep_ratios, metavar="LO:HI",
                        help=f"elastic training: a keep ratio drawn per step from LO:HI, low:LO:HI (small ratios more often) or A,B,C (default: {d.keep_ratios})")
    parser.add_argument("--single-ratio", dest="keep_ratios", action="store_const", const=None,
                        help="the paper's recipe: fine-tune at --keep-ratio alone, dropped tokens discarded, 4 epochs, "
                             "no gradient clipping (each can still be set)")
    parser.add_argument("--fuse-dropped", action=argparse.BooleanOptionalAction, default=None,
                        help="fold each stage's dropped tokens into one extra token (default: yes for elastic "
                             "training, no with --single-ratio or --merge-dropped)")
    parser.add_argument("--merge-dropped", action="store_true",
                        help="add each dropped token into its most similar kept token (size-weighted, with "
                             "proportional attention) instead of fusing or discarding it")
    parser.add_argument("--token-target", choices=TOKEN_TARGETS, default=None,
                        help="token distillation target of a merged token: position (the teacher's token at its "
                             "place, the default) or held (the teacher's tokens averaged over the patches it "
                             "holds; needs --merge-dropped)")
    parser.add_argument("--predictor-width", type=positive_int, default=None, metavar="W",
                        help="hidden width of the prediction modules, a multiple of 4 up to the model's width "
                             "(default: the model's width, 64 for the shipped teacher, the paper's layout)")
    parser.add_argument("--compare-single-ratio", action="store_true",
                        help="also fine-tune the single-ratio model for the keep-ratio plot (twice the fine-tuning "
                             "time; default: its sweep measured on the shipped teacher)")
    parser.add_argument("--prune-locs", type=int_list, default=None, metavar="I,J,K",
                        help="blocks before which to prune (default: 2,3,4 for the shipped teacher, evenly spaced for another)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="fine-tuning epochs (default: 6 for elastic training, 4 with --single-ratio)")
    parser.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                        help="clip the gradient norm to NORM, 0: no clipping (default: 1.0 for elastic training, "
                             "0 with --single-ratio)")
    parser.add_argument("--train-images", type=positive_int, default=None, metavar="N",
                        help="fine-tune on a fixed random subset of N training images (default: all 60,000)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help=f"fine-tuning batch size (default: {d.batch_size})")
    parser.add_argument("--lr", type=float, default=None, help=f"predictor learning rate (default: {d.lr})")
    parser.add_argument("--backbone-lr-scale", type=float, default=None,
                        help=f"backbone lr = lr * this (default: {d.backbone_lr_scale:.3g})")
    parser.add_argument("--ratio-weight", type=float, default=None,
                        help=f"weight of the keep-ratio loss (default: {d.ratio_weight})")
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--workers", dest="num_workers", type=non_negative_int, default=None,
                        help=f"data loader processes (default: {d.num_workers})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: a few steps on a small subset, 500 test images (seconds, not results)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def config_from_args(args: argparse.Namespace):
    """The `DemoConfig` the flags describe: only the settings given on the command line override the
    (full or quick) defaults."""
    from ..demo import DemoConfig

    settings = dict(
        output=args.output, data_dir=args.data_dir, download=args.download, teacher=args.teacher,
        keep_ratio=args.keep_ratio, keep_ratios=args.keep_ratios, fuse_dropped=args.fuse_dropped,
        merge_dropped=args.merge_dropped,
        compare_single_ratio=args.compare_single_ratio, device=args.device, threads=args.threads, seed=args.seed,
        progress=args.progress,
    )
    tuning = dict(epochs=args.epochs, train_images=args.train_images, batch_size=args.batch_size, lr=args.lr,
                  backbone_lr_scale=args.backbone_lr_scale, num_workers=args.num_workers,
                  ratio_weight=args.ratio_weight, clip_grad=args.clip_grad, token_target=args.token_target,
                  predictor_width=args.predictor_width,
                  prune_locs=tuple(args.prune_locs) if args.prune_locs else None)
    tuning = {k: v for k, v in tuning.items() if v is not None}
    return DemoConfig.quick_mode(**settings, **tuning) if args.quick else DemoConfig(**settings, **tuning)


def run(args: argparse.Namespace) -> int:
    from ..demo import format_table, run_demo
    from ..files import check_output_dir

    check_output_dir(args.output)  # a file or an unwritable folder: one line now, not after minutes of training
    cfg = config_from_args(args)

    report = run_demo(cfg)
    out = Path(cfg.output)
    print()
    print(f"DynamicViT demo on Fashion-MNIST ({report['elapsed_s'] / 60:.1f} min)")
    print(format_table(report))
    print()
    print(f"report:          {out / 'report.json'}")
    print(f"kept tokens:     {report['pictures']['kept_tokens']}")
    print(f"keep-ratio plot: {report['pictures']['keep_ratio_sweep']}")
    print(f"DynamicViT:      {report['dynamic']['checkpoint']}  (dynamicvit.load_model reads it)")
    if report.get("sweep_single_ratio"):
        print(f"single-ratio curve: {report['sweep_single_ratio']['source'].split(':')[0]}")
    return 0
