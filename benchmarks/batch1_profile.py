"""Where the time goes at batch 1 on the CPU: per stage, prediction modules vs blocks, and the rest.

For a DynamicViT (default DeiT-S, keep ratio 0.7, random weights) and its dense backbone:
- eager PyTorch: forward hooks time the patch embedding, every block, every prediction module and the
  head; "selection + glue" is the forward's wall time minus those (top-k, gather, position embedding,
  concatenation and the Python between operators). ATen operators per component are counted too: at
  batch 1 each costs a few microseconds of framework overhead whatever its size.
- ONNX Runtime: its profiler's per-node kernel times, attributed to the same components by the node
  names (the TorchScript exporter names nodes by module path; the prediction modules run through a
  method, so their nodes, top-k, gather and the glue form one row); "ORT overhead" is the profiled
  run's wall time minus its kernel times; "total" is an unprofiled session's wall time.
- torch.compile: one fused graph, so only the total.

    python benchmarks/batch1_profile.py --threads 2                      # DeiT-S
    python benchmarks/batch1_profile.py --model vit_tiny_patch16_224 --model-kwargs img_size=32,patch_size=4 --repeats 20
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


GLUE = "top-k, gather, glue"
ORT_REST = "predictors, top-k, gather, glue"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-kwargs", default="", help="timm kwargs as key=value pairs")
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50, help="batch-1 forwards per measurement")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes a while to compile)")
    return p.parse_args(argv)


def component_of(name: str, prune_locs) -> str:
    """A module path or an ONNX node name -> 'embed', 'blocks of stage s', 'predictor s', 'head' or ''."""
    m = re.search(r"blocks[./_](\d+)", name)
    if m:
        block = int(m.group(1))
        return f"blocks, stage {sum(block >= loc for loc in prune_locs)}"
    m = re.search(r"predictors[./_](\d+)", name)
    if m:
        return f"predictor {int(m.group(1)) + 1}"
    if "patch_embed" in name:
        return "patch embedding"
    if re.search(r"backbone[./_](norm|fc_norm|head)\b", name) or re.search(r"/(norm|head)/", name):
        return "norm + head"
    return ""


def eager_profile(model, x, repeats: int, prune_locs) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from dynamicvit.core.vit import DynamicViT

    backbone = model.backbone if isinstance(model, DynamicViT) else model
    parts = [("patch embedding", backbone.patch_embed), ("norm + head", backbone.norm), ("norm + head", backbone.head)]
    parts += [(component_of(f"blocks.{i}", prune_locs), blk) for i, blk in enumerate(backbone.blocks)]
    times, ops, stack = defaultdict(float), defaultdict(int), []

    def enter(comp):
        stack.append((comp, time.perf_counter()))

    def leave():
        comp, start = stack.pop()
        times[comp] += time.perf_counter() - start

    handles = []
    for comp, mod in parts:
        handles.append(mod.register_forward_pre_hook(lambda *_, c=comp: enter(c)))
        handles.append(mod.register_forward_hook(lambda *_: leave()))
    # The inference path ranks tokens with `keep_score`, a method (no module hooks): wrap it per instance.
    for s, predictor in enumerate(getattr(model, "predictors", [])):
        def timed(*a, _f=predictor.keep_score, _c=f"predictor {s + 1}", **k):
            enter(_c)
            try:
                return _f(*a, **k)
            finally:
                leave()
        predictor.keep_score = timed

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[stack[-1][0] if stack else GLUE] += 1
            return func(*args, **(kwargs or {}))

    try:
        with torch.inference_mode():
            with Count():
                model(x)
            model(x)
            times.clear()
            start = time.perf_counter()
            for _ in range(repeats):
                model(x)
            total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
        for predictor in getattr(model, "predictors", []):
            del predictor.keep_score
    out = {k: v / repeats * 1e3 for k, v in times.items()}
    out[GLUE] = total / repeats * 1e3 - sum(out.values())
    out["total"] = total / repeats * 1e3
    return {"ms": out, "aten_ops": dict(ops)}


def onnx_profile(model, x, repeats: int, threads: int, folder: Path, prune_locs) -> dict:
    import onnxruntime as ort

    from dynamicvit.runtime.deploy import OnnxModel, export_onnx

    path = export_onnx(model, folder / f"{id(model)}.onnx", exporter="torchscript", overwrite=True).path
    plain = OnnxModel(path, threads=threads)  # wall time without the profiler's own cost
    plain(x)
    start = time.perf_counter()
    for _ in range(repeats):
        plain(x)
    total = (time.perf_counter() - start) / repeats * 1e3
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(folder / "ort_profile")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    session.run(None, feed)
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, feed)
    profiled = (time.perf_counter() - start) / repeats * 1e3
    events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    run_events = len(nodes) // (repeats + 1)
    times = defaultdict(float)
    for e in nodes[-repeats * run_events:]:  # the timed runs, not the first
        name = e["name"][: -len("_kernel_time")]
        # The prediction modules are called through a method, so their nodes carry no module path:
        # everything outside the embedding, the blocks and the head is prediction + selection.
        times[component_of(name, prune_locs) or ORT_REST] += e["dur"] / 1e3
    out = {k: v / repeats for k, v in times.items()}
    out["ORT overhead"] = profiled - sum(out.values())
    out["total (profiled)"] = profiled
    out["total"] = total
    return {"ms": out}


def compiled_total(model, x, repeats: int) -> float:
    import torch

    import dynamicvit

    compiled = dynamicvit.compile(model)
    with torch.inference_mode():
        for _ in range(3):
            compiled(x)
        start = time.perf_counter()
        for _ in range(repeats):
            compiled(x)
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv=None) -> int:
    import torch

    import dynamicvit
    from dynamicvit.commands._common import model_kwargs

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pruned = dynamicvit.create_model(args.model, keep_ratio=args.keep_ratio, **model_kwargs(args.model_kwargs)).eval()
    models = {"dense": pruned.backbone, f"keep {args.keep_ratio}": pruned}
    locs = pruned.prune_locs
    C, (H, W) = pruned.backbone.patch_embed.proj.in_channels, pruned.backbone.patch_embed.img_size
    x = torch.randn(1, C, H, W)
    columns = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tag, m in models.items():
            eager = eager_profile(m, x, args.repeats, locs)
            columns[f"eager {tag}"] = eager["ms"]
            columns[f"eager {tag}: ATen ops"] = eager["aten_ops"]
            columns[f"ORT {tag}"] = onnx_profile(m, x, args.repeats, args.threads, Path(tmp), locs)["ms"]
            if not args.no_compile:
                columns[f"compile {tag}"] = {"total": compiled_total(m, x, args.repeats)}
    rows = sorted({k for col in columns.values() for k in col}, key=_order)
    print(f"{args.model}, batch 1, {args.threads} threads, ms per image (ATen ops: operators per forward), "
          f"torch {torch.__version__}; prune before blocks {list(locs)}, tokens kept {list(pruned.keep_counts())}\n")
    print("| component | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for r in rows:
        cells = []
        for name, col in columns.items():
            v = col.get(r)
            cells.append("" if v is None else (str(v) if "ATen" in name else f"{v:.3f}"))
        print(f"| {r} | " + " | ".join(cells) + " |")
    return 0


def _order(row: str):
    order = ["patch embedding", "blocks, stage 0", "predictor 1", "blocks, stage 1", "predictor 2", "blocks, stage 2",
             "predictor 3", "blocks, stage 3", "predictor 4", "blocks, stage 4", "norm + head", GLUE, ORT_REST,
             "ORT overhead", "total (profiled)", "total"]
    return (order.index(row) if row in order else len(order) - 2, row)


if __name__ == "__main__":
    sys.exit(main())
