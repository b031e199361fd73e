"""Throughput and latency of a dense timm ViT and DynamicViTs, measured side by side, per runtime.

Runtimes (`run_benchmark(runtimes=...)`): eager PyTorch ("torch"), `dynamicvit.compile` ("compile") and
ONNX Runtime on the CPU ("onnxruntime", models exported and verified by `dynamicvit.deploy`); each
runtime's DynamicViTs are compared with the dense model on the same runtime.

Timing protocol (`compare_throughput`):
- every model runs in eval mode under `torch.inference_mode` (and autocast when asked) on the same
  random batch; with `threads` set, `torch.set_num_threads` for the duration;
- warm-up forwards first (they also absorb `torch.compile`), then `repeats` timed repetitions,
  interleaved round-robin across the models (the starting model rotates each round), so slow
  drifts and bursts of machine noise fall on all models alike;
- a repetition is one or more forwards (enough to last `min_repeat_s`, fixed per model after the
  warm-up), timed with `time.perf_counter` and, on CUDA, `torch.cuda.synchronize` on both ends;
- the median repetition gives the latency per batch; images/s = batch size / latency.

Peak memory (`BenchResult.peak_memory_mb`, measured in a separate untimed forward, for eager models,
and for compiled ones on CUDA only; not measurable inside ONNX Runtime): the model's
weights + the input + the most memory its tensors hold at once during the forward.
On CUDA this comes from the allocator (`torch.cuda.max_memory_allocated`); on CPU from tracking
the storages every operator creates and frees, so scratch space inside a kernel and allocator
overhead are not included there.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import tempfile
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..core.base import SparseModel
from ..core.vit import DynamicViT
from ..errors import ConfigError
from ..extras import require
from ..files import atomic_write
from ..progress import progress_bar
from ..weights.build import sparsify
from . import deploy
from .device import amp_dtype as resolve_amp
from .device import autocast, device_name, num_threads, resolve_device, synchronize
from .flops import MacsReport, count_macs, default_input_size
from .image_macs import PerImageMacs

_logger = logging.getLogger(__name__)

DEFAULT_KEEP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.5)


@dataclass
class BenchResult:
    """Timing of one model at one batch size.

    Attributes:
        name: the key the model was given.
        batch_size: images per forward.
        images_per_s: batch_size / latency.
        latency_ms: median time of one forward of the whole batch, in milliseconds.
        peak_memory_mb: weights + input + peak tensor memory of one forward, MiB (see module doc).
        times_ms: time of one forward in each timed repetition (the repetition time / forwards).
        forwards_per_repeat: forwards in each timed repetition.
    """

    name: str
    batch_size: int
    images_per_s: float
    latency_ms: float
    peak_memory_mb: Optional[float]
    times_ms: list[float] = field(default_factory=list)
    forwards_per_repeat: int = 1


def compare_throughput(
    models: Mapping[str, nn.Module],
    input_size: Sequence[int],
    batch_size: int,
    *,
    device: Union[str, torch.device] = "cpu",
    repeats: int = 10,
    warmup: int = 3,
    amp_dtype: Union[str, torch.dtype, None] = None,
    threads: Optional[int] = None,
    min_repeat_s: float = 0.05,
    measure_memory: bool = True,
    progress: bool = False,
    images: Optional[torch.Tensor] = None,
) -> dict[str, BenchResult]:
    """Time several models on the same batch, interleaved, and report the median of each.

    The models are moved to `device` and put in eval mode.

    Args:
        models: name -> model taking (B, C, H, W) images.
        input_size: (C, H, W).
        batch_size: images per forward.
        device: "cpu", "cuda", "cuda:1", or "auto".
        repeats: timed repetitions per model.
        warmup: untimed forwards per model first.
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16, or "bf16" / "fp16"); None: full precision.
        threads: intra-op CPU threads for the duration (restored afterwards); None leaves torch's setting.
        min_repeat_s: a repetition runs enough forwards to last at least this long (short forwards,
            e.g. at batch 1, are too brief to time one by one).
        measure_memory: also measure peak memory (one extra forward per model).
        progress: show a progress bar on stderr.
        images: the batch to time on, (batch_size, *input_size); default a random one. (Under the
            per-image budget the work depends on the images.)

    Returns:
        name -> `BenchResult`, in the order of `models`.
    """
    if not models:
        raise ConfigError("compare_throughput needs at least one model")
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ConfigError(f"need repeats >= 1, warmup >= 0 and batch_size >= 1; got {repeats}, {warmup}, {batch_size}")
    dev = resolve_device(device)
    amp = resolve_amp(amp_dtype, dev)
    names = list(models)
    x = torch.randn(batch_size, *input_size, device=dev) if images is None else images.to(dev)
    if tuple(x.shape) != (batch_size, *input_size):
        raise ConfigError(f"images of shape {tuple(x.shape)} given for batch size {batch_size} of {tuple(input_size)}")
    with num_threads(threads):
        for m in models.values():
            m.to(dev).eval()
        run = {name: _runner(models[name], x, dev, amp) for name in names}
        times, inner = _interleaved_times(run, dev, repeats, warmup, min_repeat_s,
                                          _progress(repeats * len(names), f"batch {batch_size}", progress))
        results = {}
        for name in names:
            latency = statistics.median(times[name])
            peak = peak_memory_mb(models[name], x, dev, amp) if measure_memory else None
            results[name] = BenchResult(
                name=name,
                batch_size=batch_size,
                images_per_s=batch_size / latency,
                latency_ms=latency * 1e3,
                peak_memory_mb=peak,
                times_ms=[t * 1e3 for t in times[name]],
                forwards_per_repeat=inner[name],
            )
    return results


def _interleaved_times(run: dict, dev: torch.device, repeats: int, warmup: int, min_repeat_s: float,
                       bar) -> tuple[dict[str, list[float]], dict[str, int]]:
    """(seconds per forward in each timed repetition, forwards per repetition), per name of `run`.

    The warm-up is interleaved too, and the last warm-up forward of each model sizes its repetitions;
    the timed rounds rotate which model starts, so drifts fall on all models alike.
    """
    names = list(run)
    last = {name: 0.0 for name in names}
    for _ in range(max(warmup, 1)):
        for name in names:
            last[name] = _timed(run[name], 1, dev)
    inner = {name: max(1, min(1000, math.ceil(min_repeat_s / max(last[name], 1e-9)))) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_timed(run[name], inner[name], dev) / inner[name])
            bar.update(1)
    bar.close()
    return times, inner


def _runner(model: nn.Module, x: torch.Tensor, dev: torch.device, amp: Optional[torch.dtype]):
    def forward():
        with torch.inference_mode(), autocast(dev, amp):
            return model(x)

    return forward


def _timed(forward, n: int, dev: torch.device) -> float:
    """Seconds for `n` forwards, synchronized on both ends."""
    synchronize(dev)
    start = time.perf_counter()
    for _ in range(n):
        forward()
    synchronize(dev)
    return time.perf_counter() - start


def _progress(total: int, desc: str, enabled: bool):
    return progress_bar(total=total, desc=desc, enabled=enabled, unit="run")


# -- peak memory ---------------------------------------------------------------------------------


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def peak_memory_mb(model: nn.Module, x: torch.Tensor, device: Union[str, torch.device], amp=None) -> float:
    """Weights + input + the most tensor memory held at once during one forward, in MiB."""
    dev = torch.device(device)
    amp = resolve_amp(amp, dev)
    fixed = _tensor_bytes(model) + x.numel() * x.element_size()
    forward = _runner(model, x, dev, amp)
    if dev.type == "cuda":
        synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        out = forward()
        synchronize(dev)
        grown = torch.cuda.max_memory_allocated(dev) - before
        del out
    else:
        tracker = _LiveTensorBytes()
        tracker.ignore([*model.parameters(), *model.buffers(), x])
        with tracker:
            out = forward()
        del out
        grown = tracker.peak
    return (fixed + grown) / 2**20


class _LiveTensorBytes(TorchDispatchMode):
    """Follows the bytes of storages created by operators while the mode is on; keeps the peak.

    A storage counts from the operator that creates it until it is freed (a finalizer on the
    storage object, which torch keeps alive exactly as long as the storage). Views share their
    base's storage and are not counted again.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def ignore(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            self._seen.add(t.untyped_storage().data_ptr())

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen:
                continue
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


# -- the keep-ratio sweep ------------------------------------------------------------------------


RUNTIMES = ("torch", "compile", "onnxruntime")


def run_benchmark(
    base: nn.Module,
    keep_ratios: Sequence[float] = DEFAULT_KEEP_RATIOS,
    batch_sizes: Sequence[int] = (32,),
    *,
    input_size: Optional[Sequence[int]] = None,
    device: Union[str, torch.device] = "cpu",
    repeats: int = 10,
    warmup: int = 3,
    amp: Union[str, torch.dtype, None] = None,
    threads: Optional[int] = None,
    compile: bool = False,
    runtimes: Sequence[str] = ("torch",),
    onnx_dir: Optional[Union[str, os.PathLike]] = None,
    compile_mode: str = "default",
    model_name: Optional[str] = None,
    progress: bool = False,
    budget: Optional[str] = None,
) -> list[dict]:
    """Dense model vs DynamicViT at several keep ratios, one row per (runtime, batch size, keep ratio).

    Keep ratio 1.0 is the unmodified dense timm model (the baseline; added when missing). The other
    ratios are DynamicViTs sharing `base`'s weights. Every model of every runtime is timed together by
    `compare_throughput` (interleaved), per batch size; each speed-up is against the dense model on the
    same runtime.

    Runtimes: "torch" (eager), "compile" (`dynamicvit.compile`, compiled in the warm-up), "onnxruntime"
    (each model exported with `dynamicvit.deploy.export_onnx`, verified, run by ONNX Runtime on the CPU
    with `threads` threads). Peak memory is measured where it can be: eager models on any device,
    compiled ones on CUDA (allocator statistics); None otherwise.

    Args:
        base: a DynamicViT (its prediction modules are used) or a dense timm ViT (random ones).
        keep_ratios: rho values; 1.0 means the dense model.
        batch_sizes: one timing round per batch size.
        input_size: (C, H, W); default the model's.
        compile: the same as runtimes=("compile",).
        runtimes: any of "torch", "compile", "onnxruntime".
        onnx_dir: where the ONNX files go (default: a temporary folder, removed afterwards).
        compile_mode: torch.compile mode of the "compile" runtime ("reduce-overhead": CUDA graphs on a GPU).
        budget: "fixed" or "per-image" for the DynamicViTs (default: `base`'s). Under the per-image
            budget the GMACs and kept counts of a row are the means over the timed batch.
        Others: as in `compare_throughput`.

    Returns:
        Rows with runtime, keep_ratio, batch_size, images_per_s, latency_ms, speedup (vs dense on the
        same runtime and batch size), gmacs, macs_ratio, peak_memory_mb, keep_counts and the settings.
    """
    runtimes = _check_runtimes(["compile"] if compile and tuple(runtimes) == ("torch",) else runtimes)
    lineup = _Lineup.of(base, keep_ratios, input_size, budget)
    dev = resolve_device(device)
    amp_dtype = resolve_amp(amp, dev)
    if "onnxruntime" in runtimes and (dev.type != "cpu" or amp_dtype is not None):
        raise ConfigError("--runtime onnxruntime is timed in fp32 on the CPU; use --device cpu and --amp none for it")
    settings = dict(
        model=model_name or getattr(lineup.base, "model_name", None) or lineup.dense.pretrained_cfg.get("architecture"),
        img_size=list(lineup.size[1:]),
        device=str(dev),
        device_name=device_name(dev),
        amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        threads=threads if threads is not None else torch.get_num_threads(),
        repeats=repeats,
        warmup=warmup,
        compile_mode=compile_mode if "compile" in runtimes else None,
        torch=torch.__version__,
    )
    timing = dict(device=dev, repeats=repeats, warmup=warmup, amp_dtype=amp_dtype, threads=threads, progress=progress)
    rows = []
    with _onnx_folder(onnx_dir if "onnxruntime" in runtimes else None) as folder:
        runnable = {
            (rt, r): runtime_model(m, rt, onnx_path=folder / f"{_slug(r)}.onnx" if folder else None, threads=threads,
                                   compile_mode=compile_mode)
            for rt in runtimes for r, m in lineup.models.items()
        }
        for bs in batch_sizes:
            _logger.info("timing %d models at batch size %d on %s", len(runnable), bs, settings["device_name"])
            x = torch.randn(bs, *lineup.size, device=dev)  # one batch for timing, memory and per-image MACs
            results = _time_together(runnable, lineup.size, bs, compiled="compile" in runtimes, images=x, **timing)
            rows += _rows(lineup, runnable, results, runtimes, x, timing, settings)
    return rows


@dataclass
class _Lineup:
    """The models a keep-ratio sweep times: one per ratio, 1.0 being the dense model, with their MACs
    (per-image models: counted per batch, from what each image kept)."""

    base: nn.Module  # the sparse model whose prediction modules every ratio shares (or the dense model alone)
    dense: nn.Module
    ratios: list[float]  # descending, 1.0 first
    models: dict[float, nn.Module]
    macs: dict[float, MacsReport]  # the fixed-budget ratios
    per_image: set[float]  # the ratios whose models run the per-image budget
    size: tuple[int, ...]  # (C, H, W)

    @classmethod
    def of(cls, base: nn.Module, keep_ratios: Sequence[float], input_size: Optional[Sequence[int]],
           budget: Optional[str] = None) -> "_Lineup":
        ratios = sorted({float(r) for r in keep_ratios} | {1.0}, reverse=True)
        if 1.0 not in {float(r) for r in keep_ratios}:
            _logger.info("adding keep ratio 1.0 (the dense baseline) to the comparison")
        if not isinstance(base, SparseModel) and min(ratios) < 1.0:
            base = sparsify(base, 1.0)  # one set of (untrained) prediction modules shared by all ratios
        dense = base.backbone if isinstance(base, SparseModel) else base
        if budget == "per-image" and not isinstance(base, DynamicViT):
            raise ConfigError(f"the per-image budget is for token models (ViT, DeiT, LV-ViT), not {type(base).__name__}")
        twin = (lambda r: base.at_keep_ratio(r, budget)) if budget and isinstance(base, DynamicViT) else base.at_keep_ratio
        models = {r: dense if r == 1.0 else twin(r) for r in ratios}
        for m in models.values():
            m.eval()
        size = tuple(input_size or default_input_size(dense))
        per_image = {r for r, m in models.items() if getattr(m, "budget", "fixed") == "per-image"}
        macs = {r: count_macs(m, size) for r, m in models.items() if r not in per_image}
        return cls(base, dense, ratios, models, macs, per_image, size)


def _time_together(runnable: dict, size: tuple[int, ...], batch_size: int, compiled: bool, **timing) -> dict[str, BenchResult]:
    """`compare_throughput` of every (runtime, keep ratio) model at one batch size; a failing
    torch.compile is one line."""
    try:
        return compare_throughput({_key(*k): m for k, m in runnable.items()}, size, batch_size,
                                  measure_memory=False, **timing)
    except Exception as e:
        if compiled and not isinstance(e, ConfigError):
            raise ConfigError(f"torch.compile failed: {type(e).__name__}: {e}; run without the compile runtime") from e
        raise


def _rows(lineup: _Lineup, runnable: dict, results: dict, runtimes: Sequence[str], x: torch.Tensor, timing: dict,
          settings: dict) -> list[dict]:
    """The rows of one batch size `x`: speed against the same runtime's dense model, MACs, peak memory."""
    dev, amp_dtype, threads = timing["device"], timing["amp_dtype"], timing["threads"]
    batch_size, dense_macs = x.shape[0], lineup.macs[1.0].total
    batch_macs = {r: batch_mean_macs(lineup.models[r], x) for r in lineup.per_image}
    rows = []
    for rt in runtimes:
        base_rate = results[_key(rt, 1.0)].images_per_s
        for r in lineup.ratios:
            res, m = results[_key(rt, r)], lineup.models[r]
            measurable = rt == "torch" or (rt == "compile" and dev.type == "cuda")
            with num_threads(threads):
                peak = peak_memory_mb(runnable[(rt, r)], x, dev, amp_dtype) if measurable else None
            total, counts = batch_macs[r] if r in lineup.per_image else (lineup.macs[r].total, None)
            rows.append(dict(
                runtime=rt,
                keep_ratio=r,
                budget=getattr(m, "budget", None),
                batch_size=batch_size,
                images_per_s=res.images_per_s,
                latency_ms=res.latency_ms,
                latency_ms_per_image=res.latency_ms / batch_size,
                speedup=res.images_per_s / base_rate,
                gmacs=total / 1e9,
                macs_ratio=total / dense_macs,
                params=sum(p.numel() for p in m.parameters()),
                peak_memory_mb=peak,
                keep_counts=counts or (list(m.keep_counts()) if isinstance(m, SparseModel) else []),
                times_ms=res.times_ms,
                compile=rt == "compile",
                **settings,
            ))
    return rows


def batch_mean_macs(model: nn.Module, images: torch.Tensor) -> tuple[float, list[float]]:
    """A per-image model's mean MACs and mean kept counts per stage over `images`."""
    with torch.inference_mode():
        counts = model.forward_pruned(images.to(next(model.parameters()).device)).kept_counts.cpu()
    return float(PerImageMacs.of(model).per_image(counts).mean()), counts.double().mean(0).tolist()


def runtime_model(
    model: nn.Module,
    runtime: str,
    *,
    onnx_path: Optional[Union[str, os.PathLike]] = None,
    threads: Optional[int] = None,
    compile_mode: str = "default",
) -> nn.Module:
    """`model` ready to time on `runtime`: itself, compiled, or exported to `onnx_path` and loaded in ONNX Runtime."""
    _check_runtimes([runtime])
    if runtime == "torch":
        return model
    if runtime == "compile":
        return deploy.compile(model.eval(), mode=compile_mode)
    if onnx_path is None:
        raise ConfigError("the onnxruntime runtime needs a path to export the model to")
    deploy.export_onnx(model.eval(), onnx_path, overwrite=True)
    # Timed interleaved with other models: spinning worker threads would slow whatever runs next.
    return deploy.OnnxModel(onnx_path, threads=threads, spinning=False)


def _check_runtimes(runtimes: Sequence[str]) -> list[str]:
    runtimes = list(dict.fromkeys(runtimes))
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad or not runtimes:
        raise ConfigError(f"unknown runtime(s) {bad or runtimes}; choose from {', '.join(RUNTIMES)} (comma-separated)")
    return runtimes


@contextmanager
def _onnx_folder(folder: Optional[Union[str, os.PathLike]]) -> Iterator[Optional[Path]]:
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="dynamicvit-bench-") as tmp:
        yield Path(tmp)


def _key(runtime: str, keep_ratio: float) -> str:
    return f"{runtime}/{_label(keep_ratio)}"


def _slug(keep_ratio: float) -> str:
    return "dense" if keep_ratio >= 1.0 else f"keep{keep_ratio:g}"


def _label(keep_ratio: float) -> str:
    return "dense" if keep_ratio >= 1.0 else f"keep {keep_ratio:g}"


# -- outputs -------------------------------------------------------------------------------------


def to_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of the rows, with the setup in a line above it."""
    if not rows:
        return ""
    r0 = rows[0]
    setup = (
        f"{r0['model']}, {'x'.join(map(str, r0['img_size']))} px, {r0['amp']}, {r0['device_name']}"
        + (f", {r0['threads']} threads" if r0["device"] == "cpu" else "")
        + f", median of {r0['repeats']} interleaved repetitions, torch {r0['torch']}"
    )
    lines = [
        setup,
        "",
        "| runtime | keep ratio | batch | images/s | latency (ms / batch) | speed-up | GMACs | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "1.0 (dense)" if r["keep_ratio"] >= 1.0 else f"{r['keep_ratio']:g}"
        if r.get("budget") == "per-image":
            ratio += " per-image (mean GMACs)"
        mem = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        runtime = r.get("runtime", "compile" if r.get("compile") else "torch")
        lines.append(
            f"| {runtime} | {ratio} | {r['batch_size']} | {r['images_per_s']:.1f} | {r['latency_ms']:.1f} | "
            f"{r['speedup']:.2f}x | {format_gmacs(r['gmacs'])} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def format_gmacs(gmacs: float) -> str:
    """Two decimals, or three significant digits for small models (0.0134)."""
    return f"{gmacs:.2f}" if gmacs >= 1 else f"{gmacs:.3g}"


def save_json(rows: Sequence[dict], path: Union[str, os.PathLike]) -> Path:

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: Path(f).write_text(json.dumps(list(rows), indent=2) + "\n"))
    return path


def save_markdown(rows: Sequence[dict], path: Union[str, os.PathLike]) -> Path:

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: Path(f).write_text(to_markdown(rows)))
    return path


def save_plot(rows: Sequence[dict], path: Union[str, os.PathLike]) -> Path:
    """Speed-up (one line per batch size) and GMACs against keep ratio, as a PNG."""
    require("matplotlib", "the benchmark plot").use("Agg")
    plt = require("matplotlib.pyplot", "the benchmark plot")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_speed, ax_macs) = plt.subplots(1, 2, figsize=(10, 4))
    ratios = sorted({r["keep_ratio"] for r in rows})
    runtimes = list(dict.fromkeys(r.get("runtime", "torch") for r in rows))
    for rt in runtimes:
        for bs in sorted({r["batch_size"] for r in rows}):
            pts = sorted((r["keep_ratio"], r["speedup"]) for r in rows if r["batch_size"] == bs and r.get("runtime", "torch") == rt)
            label = f"batch {bs}" if len(runtimes) == 1 else f"{rt}, batch {bs}"
            ax_speed.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    macs = {r["keep_ratio"]: r["gmacs"] for r in rows}
    dense = macs[max(ratios)]
    ax_speed.plot(ratios, [dense / macs[k] for k in ratios], "k--", label="dense MACs / MACs")
    ax_speed.axhline(1.0, color="grey", lw=0.8)
    ax_speed.set(xlabel="keep ratio", ylabel="speed-up vs dense", title="throughput")
    ax_speed.legend()
    ax_macs.plot(ratios, [macs[k] for k in ratios], marker="o", color="tab:green")
    for k in ratios:
        ax_macs.annotate(format_gmacs(macs[k]), (k, macs[k]), textcoords="offset points", xytext=(0, 6), ha="center")
    ax_macs.margins(y=0.15)
    ax_macs.set(xlabel="keep ratio", ylabel="GMACs per image", title="multiply-accumulates")
    r0 = rows[0]
    fig.suptitle(f"{r0['model']} on {r0['device_name']} ({r0['amp']})", fontsize=10)
    fig.tight_layout()

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


__all__ = [
    "BenchResult",
    "compare_throughput",
    "peak_memory_mb",
    "run_benchmark",
    "runtime_model",
    "save_json",
    "save_markdown",
    "save_plot",
    "to_markdown",
]
