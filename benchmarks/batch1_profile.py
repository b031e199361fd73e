"""Where the time goes at batch 1 on the CPU: the blocks of each stage against the pruning machinery.

Three models with the same random weights (perturbed so that no two tensors are equal: exporters merge
equal initializers, which trained weights never have): the dense backbone, the DynamicViT at
`--keep-ratio` ("pruned") and "first-k", which keeps the same number of tokens per stage by slicing
off the first k patch tokens (no prediction module, no top-k, no gather): pruned minus first-k is the
fixed cost of pruning, dense over first-k the speed-up the token counts alone allow.

- eager PyTorch: wall-clock marks at every block boundary. What runs between block loc-1 and block loc
  of a pruning stage (prediction module, top-k, gather, concatenation, the Python around them) is
  "pruning, stage s"; ATen operators per component are counted the same way.
- ONNX Runtime: the graph `export_onnx` writes (the dynamo exporter, as deployed) in a session with
  `OnnxModel`'s options; its profiler's per-node kernel times, attributed by the module path the
  exporter records on every node and by position (nodes between two blocks belong to the pruning
  stage there). A pruning stage splits into its prediction module (compute nodes) and its selection
  (TopK, gathers, concatenation, split and reshape nodes). "between nodes" is the profiled run's wall
  time minus its kernel times; "total" is an unprofiled session's wall time. Node counts per component
  are those of the graph ONNX Runtime runs after its own optimizations.
- torch.compile: the total, and the kernels the compiled code calls per forward.
- The pruning table: each stage's share of the pruned model's ONNX Runtime kernel time and of its eager
  time, against the prediction module's share of the MACs.

    python benchmarks/batch1_profile.py --threads 2                      # DeiT-S, on a quiet machine
    python benchmarks/batch1_profile.py --threads 1 --instructions       # load-independent: see below
    python benchmarks/batch1_profile.py --model vit_tiny_patch16_224 --model-kwargs img_size=64 --repeats 3   # smoke run

`--instructions` counts the instructions of `--calls` batch-1 forwards at one thread under valgrind's
callgrind (needs valgrind, its headers and a C compiler), per runtime and model: a figure that does not
depend on what else runs on the machine, for comparing graphs and code paths on a shared one. Valgrind
emulates fused multiply-add about a hundred times slower than other vector instructions, so eager
PyTorch runs with its vector kernels and MKL / oneDNN limited to SSE4 (ATEN_CPU_CAPABILITY=default,
MKL_ENABLE_INSTRUCTIONS=SSE4_2, ONEDNN_MAX_CPU_ISA=SSE41): the counts are of those code paths, not of
the AVX2 / AVX-512 ones that run natively. ONNX Runtime's matrix kernels choose FMA whatever the
environment, so DeiT-S in ONNX Runtime takes tens of minutes per forward there: count it on a narrow
model (e.g. `--model-kwargs embed_dim=96,num_heads=2`), which keeps the graph and the token counts.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

MODELS = ("dense", "pruned", "first-k")
RUNTIMES = ("eager", "ort", "compile")
EMBED, HEAD = "patch embedding", "norm + head"
SELECTION_OPS = {"TopK", "GatherElements", "Gather", "GatherND", "Expand", "Concat", "Squeeze", "Unsqueeze", "Split",
                 "Slice", "Reshape", "Shape", "Identity"}
# Vector code paths valgrind runs at full speed (see the module docstring).
NO_FMA_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-kwargs", default="", help="timm kwargs as key=value pairs")
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--opset", type=int, default=None, help="ONNX opset of the exported graphs (default: export_onnx's)")
    p.add_argument("--repeats", type=int, default=50, help="batch-1 forwards per measurement")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="per component over the repeats: median (a quiet machine) or min (less sensitive to other load)")
    p.add_argument("--runtimes", default="eager,ort,compile", help=f"comma-separated, from {', '.join(RUNTIMES)}")
    p.add_argument("--instructions", action="store_true", help="count instructions under callgrind instead of timing")
    p.add_argument("--calls", type=int, default=2, help="forwards counted per model with --instructions")
    p.add_argument("--child", nargs=3, metavar=("RUNTIME", "MODEL", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    bad = [r for r in args.runtimes if r not in RUNTIMES]
    if bad:
        p.error(f"unknown runtime(s) {bad}; choose from {', '.join(RUNTIMES)}")
    return args


# -- models --------------------------------------------------------------------------------------


def build_models(args) -> dict:
    """{"dense", "pruned", "first-k"} with the same (perturbed random) weights, in eval mode."""
    import torch

    import dynamicvit
    from dynamicvit.commands._common import model_kwargs
    from dynamicvit.core.vit import DynamicViT

    class FirstK(DynamicViT):
        """The pruned model's token counts without its machinery: stage s keeps the first k_s patch tokens.

        Overrides `_pruned_tokens`, which both `forward` (eager, torch.compile) and `forward_pruned`
        (the exported graph) run."""

        def _pruned_tokens(self, images: torch.Tensor, return_scores: bool = False):
            host, P, kept = self.host, self.num_prefix_tokens, []
            x = host.embed(images)
            counts, stage_at = self.keep_counts(), self._stage_at()
            for i in range(host.depth):
                if i in stage_at:
                    k = counts[stage_at[i]]
                    x = x[:, : P + k]
                    kept.append(torch.arange(k, device=x.device).expand(x.shape[0], k))
                x = host.block(i, x)
            return host.norm(x), kept, [], []

    torch.manual_seed(0)
    pruned = dynamicvit.create_model(args.model, keep_ratio=args.keep_ratio, **model_kwargs(args.model_kwargs)).eval()
    with torch.no_grad():
        for p in pruned.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    first_k = FirstK(pruned.backbone, pruned.keep_ratio, pruned.prune_locs, pruned.model_name, pruned.timm_kwargs).eval()
    first_k.predictors = pruned.predictors
    return {"dense": pruned.backbone, "pruned": pruned, "first-k": first_k}


def stage_of(block: int, prune_locs) -> int:
    return sum(block >= loc for loc in prune_locs)


def example_input(model):
    import torch

    from dynamicvit.runtime.flops import default_input_size

    return torch.randn(1, *default_input_size(model), generator=torch.Generator().manual_seed(1))


# -- eager ---------------------------------------------------------------------------------------


class Timeline:
    """Attributes wall time and ATen operators to the component that runs, marked at block boundaries."""

    def __init__(self, depth: int, prune_locs, pruning: bool):
        self.depth, self.locs, self.pruning = depth, tuple(prune_locs), pruning
        self.current, self.start = EMBED, 0.0
        self.times: dict[str, float] = defaultdict(float)
        self.ops: Counter = Counter()

    def enter(self, component: str) -> None:
        now = time.perf_counter()
        self.times[self.current] += now - self.start
        self.current, self.start = component, now

    def after_block(self, i: int) -> str:
        if i == self.depth - 1:
            return HEAD
        if self.pruning and i + 1 in self.locs:
            return f"pruning, stage {stage_of(i + 1, self.locs)}"
        return f"blocks, stage {stage_of(i, self.locs)}"

    def hooks(self, model, blocks) -> list:
        handles = [model.register_forward_pre_hook(lambda *_: self.enter(EMBED)),
                   model.register_forward_hook(lambda *_: self.enter("(done)"))]
        for i, blk in enumerate(blocks):
            handles.append(blk.register_forward_pre_hook(lambda *_, i=i: self.enter(f"blocks, stage {stage_of(i, self.locs)}")))
            handles.append(blk.register_forward_hook(lambda *_, i=i: self.enter(self.after_block(i))))
        return handles


def eager_profile(model, tag: str, x, repeats: int, prune_locs, stat) -> dict:
    """ms per component (`stat` over `repeats` forwards), ATen operators per component, unhooked total."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from dynamicvit.core.base import backbone_of

    blocks = backbone_of(model).blocks
    timeline = Timeline(len(blocks), prune_locs, pruning=tag != "dense")

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            timeline.ops[timeline.current] += 1
            return func(*args, **(kwargs or {}))

    per_call = defaultdict(list)
    handles = timeline.hooks(model, blocks)
    try:
        with torch.inference_mode():
            model(x)
            with Count():
                model(x)
            ops = dict(timeline.ops)
            for _ in range(repeats):
                timeline.times.clear()
                model(x)
                for k, v in timeline.times.items():
                    per_call[k].append(v * 1e3)
    finally:
        for h in handles:
            h.remove()
    ms = {k: stat(v) for k, v in per_call.items() if k != "(done)"}
    ms["total"] = timed_ms(lambda: model(x), repeats, stat)
    ops.pop("(done)", None)
    return {"ms": ms, "ops": ops}


def timed_ms(fn, repeats: int, stat) -> float:
    import torch

    with torch.inference_mode():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return stat(times)


# -- ONNX Runtime --------------------------------------------------------------------------------


def export(model, tag: str, folder: Path, opset) -> Path:
    """`export_onnx` as deployed; first-k, which has no scores to check ties with, is not verified."""
    from dynamicvit.runtime.deploy import export_onnx

    return export_onnx(model, folder / f"{tag}.onnx", opset=opset, overwrite=True, verify=tag != "first-k").path


def node_components(path: Path, depth: int, prune_locs) -> dict[str, str]:
    """{node name: component} of an exported graph, from the module path the exporter records on each node
    and the node's position (between blocks loc-1 and loc of a pruning stage: that stage's machinery).
    Output tensor names map too: ONNX Runtime's fused nodes keep them."""
    import onnx

    out, last = {}, None
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        block = re.search(r"blocks\.(\d+)'", scopes)
        last = int(block.group(1)) if block else last
        if last is None:
            comp = EMBED
        elif not block and last == depth - 1:
            comp = HEAD
        elif not block and last + 1 in prune_locs:
            comp = f"pruning, stage {stage_of(last + 1, prune_locs)}"
        else:
            comp = f"blocks, stage {stage_of(last, prune_locs)}"
        out[node.name] = comp
        out.update({t: comp for t in node.output})
    return out


def split_pruning(component: str, op_type: str) -> str:
    """A pruning stage's node goes to its prediction module or to its selection, by operator."""
    if not component.startswith("pruning"):
        return component
    return component + (": selection" if op_type in SELECTION_OPS else ": prediction module")


def onnx_session(path: Path, threads: int, **options):
    import onnxruntime as ort

    from dynamicvit.runtime.deploy import session_options

    opts = session_options(threads)
    for key, value in options.items():
        setattr(opts, key, value)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_profile(path: Path, x, repeats: int, threads: int, folder: Path, depth: int, prune_locs, stat) -> dict:
    """ms per component from ONNX Runtime's profiler (`stat` per node), nodes per component, unprofiled total."""
    import onnx

    plain = onnx_session(path, threads)
    feed = {plain.get_inputs()[0].name: x.numpy()}
    total = timed_ms(lambda: plain.run(None, feed), repeats, stat)
    optimized = folder / f"{path.stem}.ort.onnx"
    session = onnx_session(path, threads, enable_profiling=True, profile_file_prefix=str(folder / path.stem),
                           optimized_model_filepath=str(optimized))
    walls = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        session.run(None, feed)
        walls.append((time.perf_counter() - start) * 1e3)
    events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) // (repeats + 1)
    known = node_components(path, depth, prune_locs)
    ort_graph = onnx.load(str(optimized), load_external_data=False).graph
    component, nodes, previous = {}, Counter(), EMBED
    for node in ort_graph.node:  # ONNX Runtime's own nodes, in the order it runs them
        base = known.get(node.name) or next((known[t] for t in node.output if t in known), previous)
        component[node.name] = split_pruning(base, node.op_type)
        nodes[component[node.name]] += 1
        previous = base
    per_node = defaultdict(list)
    for e in kernels[per_run:]:  # the first run allocates
        per_node[e["name"][: -len("_kernel_time")]].append(e["dur"] / 1e3)
    ms = defaultdict(float)
    for name, durations in per_node.items():
        ms[component.get(name, "unattributed")] += stat(durations)
    kernel_ms = sum(ms.values())
    ms["between nodes"] = stat(walls[1:]) - kernel_ms
    ms["kernels"], ms["total"] = kernel_ms, total
    return {"ms": dict(ms), "nodes": dict(nodes), "graph_nodes": len(onnx.load(str(path), load_external_data=False).graph.node)}


# -- torch.compile -------------------------------------------------------------------------------


def compiled_profile(model, x, repeats: int, stat) -> dict:
    """ms of the compiled model and the kernels its generated code calls per forward."""
    import torch
    from torch._inductor.utils import run_and_get_code

    import dynamicvit

    torch._dynamo.reset()
    compiled = dynamicvit.compile(model)
    with torch.inference_mode():
        _, codes = run_and_get_code(compiled, x)
    call = codes[-1][codes[-1].index("def call("):]
    kernels = re.findall(r"^\s+(?:\w+ = )?(cpp_fused_\w+|extern_kernels\.\w+|torch\.ops\.\w+\.\w+)", call, re.M)
    return {"ms": {"total": timed_ms(lambda: compiled(x), repeats, stat)}, "kernels": len(kernels)}


# -- instruction counts --------------------------------------------------------------------------

MARKERS_C = """#include <valgrind/callgrind.h>
void marks_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT; }
void marks_stop(void) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_DUMP_STATS_AT("forwards"); CALLGRIND_STOP_INSTRUMENTATION; }
"""


def build_markers(folder: Path) -> Path:
    """A tiny library whose two functions start and stop callgrind's counting (client requests)."""
    source, lib = folder / "markers.c", folder / "markers.so"
    source.write_text(MARKERS_C)
    try:
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"--instructions needs a C compiler (cc) and valgrind's headers (valgrind/callgrind.h): {getattr(e, 'stderr', e)}")
    return lib


def child(args) -> int:
    """Under callgrind: build one model on one runtime, warm it up, count `--calls` forwards between the markers."""
    import ctypes

    import torch

    torch.set_num_threads(1)
    runtime, tag, path = args.child
    marks = ctypes.CDLL(os.environ["BATCH1_MARKERS"])
    models = build_models(args)
    x = example_input(models["pruned"])
    if runtime == "ort":
        session = onnx_session(Path(path), 1)
        feed = {session.get_inputs()[0].name: x.numpy()}
        run = lambda: session.run(None, feed)  # noqa: E731
    else:
        run = lambda: models[tag](x)  # noqa: E731
    with torch.inference_mode():
        for _ in range(2):
            run()
        marks.marks_start()
        for _ in range(args.calls):
            run()
        marks.marks_stop()
    return 0


def count_instructions(args, runtime: str, tag: str, path: Path, folder: Path, markers: Path) -> float:
    """Instructions per batch-1 forward of one model on one runtime, one thread (callgrind)."""
    out = folder / f"cg.{runtime}.{tag}.out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BATCH1_MARKERS": str(markers), **(NO_FMA_ENV if runtime == "eager" else {})}
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no", f"--callgrind-out-file={out}",
               sys.executable, __file__, "--model", args.model, "--model-kwargs", args.model_kwargs,
               "--keep-ratio", str(args.keep_ratio), "--calls", str(args.calls), "--child", runtime, tag, str(path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"callgrind run of {runtime} {tag} failed:\n{result.stderr[-3000:]}")
    # The dump at the stop marker holds the forwards; the one at exit holds nothing (collection is off).
    dumps = [d.read_text() for d in folder.glob(f"{out.name}*")]
    total = sum(int(m) for text in dumps if "Trigger: Client Request: forwards" in text
                for m in re.findall(r"^totals: (\d+)", text, re.M))
    return total / args.calls


def instructions(args) -> int:
    import torch

    runtimes = [r for r in args.runtimes if r in ("eager", "ort")]
    models = build_models(args)
    with tempfile.TemporaryDirectory(prefix="batch1-cg-") as tmp:
        folder = Path(tmp)
        markers = build_markers(folder)
        counts = {}
        for runtime in runtimes:
            for tag, model in models.items():
                path = export(model, tag, folder, args.opset) if runtime == "ort" else folder
                counts[runtime, tag] = count_instructions(args, runtime, tag, path, folder, markers)
                print(f"{runtime} {tag}: {counts[runtime, tag] / 1e6:.1f} M instructions per forward", file=sys.stderr)
    print(f"{args.model} {args.model_kwargs}, keep ratio {args.keep_ratio} (tokens kept {list(models['pruned'].keep_counts())}), "
          f"batch 1, 1 thread, instructions per forward (callgrind, mean of {args.calls}; eager with "
          f"{', '.join(f'{k}={v}' for k, v in NO_FMA_ENV.items())}), torch {torch.__version__}\n")
    print("| runtime | dense | pruned | first-k | pruning machinery (pruned - first-k) | dense / pruned | dense / first-k |")
    print("|---|---|---|---|---|---|---|")
    for runtime in runtimes:
        d, p, f = (counts[runtime, t] for t in MODELS)
        print(f"| {runtime} | {d / 1e6:.1f} M | {p / 1e6:.1f} M | {f / 1e6:.1f} M | {(p - f) / 1e6:.1f} M ({(p - f) / p:.1%}) "
              f"| {d / p:.3f}x | {d / f:.3f}x |")
    return 0


# -- the tables ----------------------------------------------------------------------------------


def profile(args) -> dict:
    """{runtime: {model: result}} for the requested runtimes."""
    import torch

    torch.set_num_threads(args.threads)
    models = build_models(args)
    pruned = models["pruned"]
    depth, locs = pruned.host.depth, pruned.prune_locs
    x = example_input(pruned)
    stat = min if args.stat == "min" else statistics.median
    results = defaultdict(dict)
    with tempfile.TemporaryDirectory(prefix="batch1-") as tmp:
        for tag, model in models.items():
            if "eager" in args.runtimes:
                results["eager"][tag] = eager_profile(model, tag, x, args.repeats, locs, stat)
            if "ort" in args.runtimes:
                path = export(model, tag, Path(tmp), args.opset)
                results["ort"][tag] = onnx_profile(path, x, args.repeats, args.threads, Path(tmp), depth, locs, stat)
            if "compile" in args.runtimes:
                results["compile"][tag] = compiled_profile(model, x, args.repeats, stat)
    return results


def time_table(results: dict) -> list[str]:
    columns = {f"{runtime} {tag}": r["ms"] for runtime, by_model in results.items() for tag, r in by_model.items()}
    rows = sorted({k for col in columns.values() for k in col}, key=_order)
    lines = ["| component, ms per image | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join("" if row not in c else f"{c[row]:.3f}" for c in columns.values()) + " |")
    return lines


def count_table(results: dict) -> list[str]:
    columns = {}
    for tag, r in results.get("eager", {}).items():
        columns[f"eager {tag}: ATen ops"] = r["ops"]
    for tag, r in results.get("ort", {}).items():
        columns[f"ORT {tag}: nodes run"] = r["nodes"]
    if not columns:
        return []
    rows = sorted({k for col in columns.values() for k in col}, key=_order)
    lines = ["| component | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(str(c.get(row, "")) for c in columns.values()) + " |")
    totals = [str(sum(c.values())) for c in columns.values()]
    lines.append("| total | " + " | ".join(totals) + " |")
    extra = [f"exported graph: {tag} {r['graph_nodes']} nodes" for tag, r in results.get("ort", {}).items()]
    extra += [f"compiled code: {tag} {r['kernels']} kernel calls" for tag, r in results.get("compile", {}).items()]
    return lines + ([""] + ["; ".join(extra)] if extra else [])


def pruning_table(results: dict, macs) -> list[str]:
    """Each stage's machinery: share of the pruned model's time against the prediction module's share of the MACs."""
    head = ["| pruning stage | prediction module, share of MACs |"]
    shares = {}
    if "ort" in results:
        ort = results["ort"]["pruned"]["ms"]
        shares["ONNX Runtime"] = {k: v / ort["kernels"] for k, v in ort.items() if k.startswith("pruning")}
    if "eager" in results:
        eager = results["eager"]["pruned"]["ms"]
        shares["eager"] = {k: v / sum(w for c, w in eager.items() if c != "total") for k, v in eager.items() if k.startswith("pruning")}
    for name in shares:
        head[0] += f" {name}: share of time | {name}: time / MACs share |"
    lines = [head[0], "|---|---|" + "---|---|" * len(shares)]
    for s, stage in enumerate(macs.stages[2:-1], start=1):
        mac_share = stage["predictor_macs"] / macs.total
        cells = [f"{mac_share:.2%}"]
        for by_part in shares.values():
            t = sum(v for k, v in by_part.items() if k.startswith(f"pruning, stage {s}"))
            cells += [f"{t:.2%}", f"{t / mac_share:.2f}x"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def ratio_table(results: dict) -> list[str]:
    lines = ["| runtime | dense / pruned | dense / first-k | pruned - first-k, ms |", "|---|---|---|---|"]
    for runtime, by_model in results.items():
        d, p, f = (by_model[t]["ms"]["total"] for t in MODELS)
        lines.append(f"| {runtime} | {d / p:.3f}x | {d / f:.3f}x | {p - f:.3f} |")
    return lines


def _order(row: str):
    m = re.search(r"stage (\d+)", row)
    stage = int(m.group(1)) if m else 0
    rank = 0 if row == EMBED else 1 if m else 2 if row == HEAD else 3
    rest = ["between nodes", "unattributed", "kernels", "total"]
    return (rank, stage, row.startswith("blocks"), rest.index(row) if row in rest else -1, row)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.instructions:
        return instructions(args)
    import torch

    from dynamicvit.runtime.flops import count_macs

    results = profile(args)
    pruned = build_models(args)["pruned"]
    print(f"{args.model} {args.model_kwargs}, batch 1, {args.threads} thread(s), {args.stat} of {args.repeats} forwards, "
          f"torch {torch.__version__}; pruning before blocks {list(pruned.prune_locs)} keeps {list(pruned.keep_counts())} "
          "patch tokens; first-k: the same counts without prediction modules or selection\n")
    for lines in (time_table(results), count_table(results), pruning_table(results, count_macs(pruned)), ratio_table(results)):
        if lines:
            print("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
