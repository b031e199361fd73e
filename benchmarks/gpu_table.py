"""The GPU table in one run: dense timm DeiT against DynamicViT, inference and training.

Rows (random weights: with fixed token counts per stage, speed does not depend on them):
- DeiT-S batch `--batch` (256): bf16 autocast and bf16 weights, each with timm's patch embedding in
  both models and with the fast one (`dynamicvit.fast_patch_embed`) in both; torch.compile;
- DeiT-S batch 1: bf16 autocast, and CUDA graphs (torch.compile mode "reduce-overhead");
- DeiT-B batch 256 and batch 1, bf16 autocast;
- the fast patch embedding alone (dense DeiT-S, bf16 weights);
- one pruning stage (fast scoring + top-k + gather, and the reference-exact scoring) against one block;
- the training step (DeiT-S, `--train-batch` 128, bf16 autocast): masked path + dense teacher + the
  full DynamicViT objective + AdamW, with the exact and the fused masked attention, against a dense
  CE step;
- the "free predictor" bound in every eager row: the prediction modules replaced by a free
  score (one channel of the tokens), so the remaining gap is what the blocks and the unprunable
  parts allow.

Protocol: every model of a row group is built once, warmed up, then timed in `--repeats` rounds
interleaved round-robin (starting model rotating), each round `--inner` calls between two CUDA
events; the median round gives the time per call. Inference under torch.inference_mode.

    PYTHONPATH=src python benchmarks/gpu_table.py                 # on a GPU; --budget-s caps it at 5 minutes
    PYTHONPATH=src python benchmarks/gpu_table.py --device cpu    # dry run at tiny sizes (the plumbing, not speed)

Prints the Markdown table; --output DIR also writes gpu_table.md and gpu_table.json (every timing).
A group that fails (e.g. a compiler error) is reported in the table and the run goes on; groups
left when `--budget-s` is spent are skipped and named.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

_logger = logging.getLogger("gpu_table")

MODELS = {"DeiT-S": "deit_small_patch16_224", "DeiT-B": "deit_base_patch16_224"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the table) or cpu (a dry run at tiny sizes)")
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument("--batch", type=int, default=None, help="large batch (default 256; 2 on cpu)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default 128; 2 on cpu)")
    p.add_argument("--img-size", type=int, default=None, help="image size (default 224; 48 on cpu)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per group (default 15; 2 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per model (default 5; 1 on cpu)")
    p.add_argument("--inner", type=int, default=None, help="calls per timed round (default 3; 1 on cpu)")
    p.add_argument("--budget-s", type=float, default=300.0, help="skip the groups left after this many seconds")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile / CUDA graph rows")
    p.add_argument("--output", default=None, metavar="DIR", help="also write gpu_table.md and gpu_table.json")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    for name, gpu, dry in (("batch", 256, 2), ("train_batch", 128, 2), ("repeats", 15, 2), ("warmup", 5, 1),
                           ("inner", 3, 1), ("img_size", 224, 48)):
        if getattr(args, name) is None:
            setattr(args, name, dry if cpu else gpu)
    return args


# -- timing ----------------------------------------------------------------------------------------


class Clock:
    """CUDA events on a GPU, perf_counter on a CPU; milliseconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.name = "CUDA events" if self.cuda else "perf_counter"

    def time(self, fn: Callable[[], object], calls: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls


def interleaved_medians(fns: dict[str, Callable[[], object]], clock: Clock, args) -> dict[str, float]:
    """Median ms per call of each function, timed round-robin with a rotating start."""
    names = list(fns)
    for name in names:
        for _ in range(args.warmup):
            fns[name]()
    if clock.cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(clock.time(fns[name], args.inner))
    return {n: statistics.median(t) for n, t in times.items()}


# -- models ----------------------------------------------------------------------------------------


class FreeScore(nn.Module):
    """Stands in for a prediction module: the score is one channel of the tokens (no computation)."""

    def keep_margin(self, patches: torch.Tensor) -> torch.Tensor:
        return patches[..., :1]  # (B, n, 1)


def build(arch: str, args, device: torch.device, dtype: Optional[torch.dtype], fast_embed: bool) -> dict[str, nn.Module]:
    """{"dense", "ours", "free"}: timm's model, the DynamicViT on a copy, and that with free scores."""
    import timm

    import dynamicvit

    kwargs = dict(embed_dim=48, num_heads=3, depth=4) if device.type == "cpu" else {}  # dry run: tiny
    torch.manual_seed(0)
    dense = timm.create_model(MODELS[arch], img_size=args.img_size, **kwargs)
    ours = dynamicvit.sparsify(copy.deepcopy(dense), args.keep_ratio)
    free = copy.deepcopy(ours)
    free.predictors = nn.ModuleList(FreeScore() for _ in free.predictors)
    models = {"dense": dense, "ours": ours, "free": free}
    for m in models.values():
        if fast_embed:
            dynamicvit.fast_patch_embed(m)
        m.to(device=device, dtype=dtype).eval()
    return models


def forward_fn(model: nn.Module, x: torch.Tensor, autocast: Optional[torch.dtype]) -> Callable[[], object]:
    def run():
        with torch.inference_mode(), _autocast(x.device, autocast):
            return model(x)

    return run


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def compiled(model: nn.Module, mode: Optional[str], device: torch.device) -> nn.Module:
    """torch.compile; on a CPU dry run the "eager" backend (checks the tracing, not the compiler)."""
    if device.type == "cpu":
        return torch.compile(model, backend="eager")
    return torch.compile(model, mode=mode)


# -- row groups ------------------------------------------------------------------------------------


@dataclass
class Row:
    """One table line: the dense model's ms and the speed-ups of ours and of the free-predictor bound."""

    label: str
    dense_ms: Optional[float] = None
    ours_ms: Optional[float] = None
    free_ms: Optional[float] = None
    note: str = ""
    cells: Optional[list] = None  # written as they are instead (the per-stage breakdown)


def inference_rows(arch: str, batch: int, precision: str, args, device: torch.device,
                   embeds=("timm", "fast"), compile_mode: Optional[str] = None, label: str = "",
                   kinds=("dense", "ours", "free")) -> list[Row]:
    """Dense / ours (/ free) at one batch size, for each patch embedding, timed in one interleaved group."""
    bf16 = torch.bfloat16
    weights = bf16 if precision == "bf16 weights" else None
    autocast = bf16 if precision == "bf16 autocast" else None
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device, dtype=weights or torch.float32)
    fns = {}
    for embed in embeds:
        for kind, model in build(arch, args, device, weights, fast_embed=embed == "fast").items():
            if kind not in kinds:
                continue
            if compile_mode:
                model = compiled(model, compile_mode, device)
            fns[f"{embed}/{kind}"] = forward_fn(model, x, autocast)
    ms = interleaved_medians(fns, Clock(device), args)
    rows = []
    for embed in embeds:
        what = "timm's embedding in both" if embed == "timm" else "fast embedding in both"
        rows.append(Row(f"{arch} batch {batch}, {label or precision}, {what}", ms[f"{embed}/dense"],
                        ms[f"{embed}/ours"], ms.get(f"{embed}/free")))
    if set(embeds) == {"timm", "fast"}:
        rows.append(Row(f"fast patch embedding alone: dense {arch} batch {batch}, {label or precision}",
                        ms["timm/dense"], ms["fast/dense"], note="ours = the same dense model with the fast embedding"))
    return rows


def stage_rows(args, device: torch.device) -> list[Row]:
    """Where the pruned model's extra time goes: one pruning stage (the inference path's fast scoring +
    top-k + gather, and the reference-exact scoring it replaces) against one block, DeiT-S, batch
    `--batch`, bf16 weights, on the full sequence of the first stage."""
    from dynamicvit.core.ops import prune_tokens, select_tokens

    ours = build("DeiT-S", args, device, torch.bfloat16, fast_embed=False)["ours"]
    P, N, k = ours.num_prefix_tokens, ours.num_patches, ours.keep_counts()[0]
    x = torch.randn(args.batch, P + N, ours.embed_dim, device=device, dtype=torch.bfloat16)
    block, predictor = ours.backbone.blocks[0], ours.predictors[0]

    def inference(fn):
        def run():
            with torch.inference_mode():
                return fn()
        return run

    ms = interleaved_medians({
        "block": inference(lambda: block(x)),
        "fast": inference(lambda: prune_tokens(x, predictor, k, P)),
        "reference": inference(lambda: select_tokens(x, predictor(x, num_prefix_tokens=P)[..., 0], k, P)),
    }, Clock(device), args)
    where = f"DeiT-S batch {args.batch}, bf16 weights, {P + N} tokens"
    return [
        Row(f"{where}: one block", cells=[f"{ms['block']:.3f} ms", "", ""]),
        Row(f"{where}: one pruning stage (keep_margin + top-k + gather)",
            cells=["", f"{ms['fast']:.3f} ms ({ms['fast'] / ms['block']:.0%} of a block)", ""]),
        Row(f"{where}: one pruning stage with the reference-exact scoring (log-softmax + select_tokens)",
            cells=["", f"{ms['reference']:.3f} ms ({ms['reference'] / ms['block']:.0%} of a block)", ""]),
    ]


def training_rows(args, device: torch.device) -> list[Row]:
    """Step time: dense CE step vs masked path + teacher + full objective (exact and fused attention)."""
    import dynamicvit
    from dynamicvit.core.losses import DynamicViTLoss

    B, autocast = args.train_batch, torch.bfloat16
    x = torch.randn(B, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 1000, (B,), device=device)
    fns = {}
    for embed in ("timm", "fast"):
        models = build("DeiT-S", args, device, None, fast_embed=embed == "fast")
        teacher = models["dense"]
        student = copy.deepcopy(models["ours"]).train()
        dense = copy.deepcopy(teacher).train()
        fns[f"{embed}/dense"] = _step(dense, None, None, x, y, autocast)
        fns[f"{embed}/exact"] = _step(student, teacher, DynamicViTLoss(args.keep_ratio), x, y, autocast)
        fused = dynamicvit.fused_masked_attention(copy.deepcopy(student))
        fns[f"{embed}/fused"] = _step(fused, teacher, DynamicViTLoss(args.keep_ratio), x, y, autocast)
    ms = interleaved_medians(fns, Clock(device), args)
    rows = []
    for embed in ("timm", "fast"):
        what = "timm's embedding" if embed == "timm" else "fast embedding"
        for attn in ("exact", "fused"):
            rows.append(Row(f"training step DeiT-S batch {B}, bf16 autocast, {attn} masked attention, {what} "
                            "(masked path + teacher + full objective vs dense CE step)",
                            ms[f"{embed}/dense"], ms[f"{embed}/{attn}"], note="time"))
    return rows


def _step(model: nn.Module, teacher: Optional[nn.Module], criterion, x, y, autocast) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        with _autocast(x.device, autocast):
            if teacher is None:
                loss = F.cross_entropy(model(x), y)
            else:
                with torch.no_grad():
                    feats = teacher.forward_features(x)  # (B, P + N, C), normed
                    t_logits, t_tokens = teacher.forward_head(feats), feats[:, teacher.num_prefix_tokens:]
                loss, _ = criterion(model(x), y, t_logits, t_tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def groups(args, device: torch.device) -> list[tuple[str, Callable[[], list[Row]]]]:
    """(name, thunk) in order of importance: the budget cuts from the end."""
    B = args.batch
    todo = [
        ("DeiT-S batch large, autocast", lambda: inference_rows("DeiT-S", B, "bf16 autocast", args, device)),
        ("DeiT-S batch large, bf16 weights", lambda: inference_rows("DeiT-S", B, "bf16 weights", args, device)),
        ("one pruning stage vs one block", lambda: stage_rows(args, device)),
        ("DeiT-S batch 1, autocast", lambda: inference_rows("DeiT-S", 1, "bf16 autocast", args, device)),
        ("DeiT-B batch large, autocast", lambda: inference_rows("DeiT-B", B, "bf16 autocast", args, device)),
        ("DeiT-B batch 1, autocast", lambda: inference_rows("DeiT-B", 1, "bf16 autocast", args, device)),
        ("training step", lambda: training_rows(args, device)),
    ]
    if not args.no_compile:
        todo += [
            ("DeiT-S batch 1, CUDA graphs", lambda: inference_rows(
                "DeiT-S", 1, "bf16 weights", args, device, embeds=("fast",), compile_mode="reduce-overhead",
                label='CUDA graphs (compile mode "reduce-overhead", bf16 weights)', kinds=("dense", "ours"))),
            ("DeiT-S batch large, torch.compile", lambda: inference_rows(
                "DeiT-S", B, "bf16 weights", args, device, embeds=("fast",), compile_mode="default",
                label="torch.compile (bf16 weights)", kinds=("dense", "ours"))),
        ]
    return todo


# -- the table -------------------------------------------------------------------------------------


def table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| | dense timm | dynamicvit | free-predictor bound |", "|---|---|---|---|"]
    for r in rows:
        if r.cells is not None:
            lines.append(f"| {r.label} | " + " | ".join(r.cells) + " |")
        elif r.dense_ms is None:
            lines.append(f"| {r.label} | {r.note} | | |")
        elif r.note == "time":  # training: ours takes this many times the dense step
            lines.append(f"| {r.label} | {r.dense_ms:.2f} ms | {r.ours_ms / r.dense_ms:.2f}x the time | |")
        else:
            free = f"{r.dense_ms / r.free_ms:.2f}x" if r.free_ms else ""
            note = f" ({r.note})" if r.note else ""
            lines.append(f"| {r.label} | {r.dense_ms:.2f} ms | {r.dense_ms / r.ours_ms:.2f}x{note} | {free} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import timm

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_table: error: CUDA is not available here; run with --device cpu for a dry run", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: more threads only add overhead
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}), DRY RUN at tiny widths"
    header = (f"{name}; torch {torch.__version__}, timm {timm.__version__}; {args.img_size} px, keep ratio "
              f"{args.keep_ratio}, random weights; median of {args.repeats} interleaved rounds of {args.inner} calls "
              f"({Clock(device).name}); speed-up = dense ms / ours ms")
    start = time.monotonic()
    rows: list[Row] = []
    for title, thunk in groups(args, device):
        spent = time.monotonic() - start
        if spent > args.budget_s:
            rows.append(Row(title, note=f"skipped: time budget ({args.budget_s:.0f} s) spent"))
            continue
        _logger.info("[%5.0f s] %s ...", spent, title)
        try:
            rows += thunk()
        except Exception as e:  # noqa: BLE001 - one failing group (e.g. the compiler) must not lose the table
            _logger.exception("%s failed", title)
            rows.append(Row(title, note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"))
        finally:
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    _logger.info("[%5.0f s] done", time.monotonic() - start)
    text = table(rows, header)
    print(text, end="")
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_table.md").write_text(text)
        (out / "gpu_table.json").write_text(json.dumps(
            {"header": header, "args": vars(args), "rows": [r.__dict__ for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
