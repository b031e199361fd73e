"""`dynamicvit predict`: classify image files and folders with a DynamicViT (or its ONNX export).

Runtimes (`--runtime`): `onnxruntime` (the default where it applies: the fastest on a CPU at batch 1,
see docs/deployment.md), `eager` (PyTorch as is), `compile` (`dynamicvit.compile`, also `--compile`). With
`--checkpoint` and the ONNX Runtime, the checkpoint is exported once (verified against PyTorch) into
the cache (`$DYNAMICVIT_CACHE/onnx`, default ~/.cache/dynamicvit/onnx) and reused by later runs.

Results go to stdout (one line per image, or JSON with `--json`); progress and skipped files to stderr.
Exit code: 0 when every input was classified, 1 when some were skipped (not an image, corrupt,
missing), 2 for a usage error.
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..files import OutputNames, prepare_output_dir
from ..text import printable
from ._common import json_text, model_kwargs
from ._model import add_budget_argument, set_budget

HELP = "Classify image files and folders (top-k with class names); optionally draw the kept tokens."

_logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "eager", "compile", "onnxruntime")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders (searched recursively)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", default=None, metavar="PATH", help="a model saved by dynamicvit (knows its settings)")
    source.add_argument("--model", default=None, help="timm name (random weights, for trying the command out), or "
                        "hf:DIR, a transformers model folder (its weights and image processor)")
    source.add_argument("--onnx", default=None, metavar="FILE", help="an ONNX file written by `dynamicvit export`")
    add("--model-kwargs", "--timm-kwargs", type=model_kwargs, default={}, metavar="KWARGS",
        help="extra timm.create_model arguments for --model (JSON object or key=value pairs)")
    add("--keep-ratio", type=float, default=None,
        help="keep ratio (default: the checkpoint's; fixed in an ONNX file, so not allowed with --onnx)")
    add_budget_argument(parser)
    add("--top-k", type=int, default=5, help="classes to report per image (default: %(default)s)")
    add("--json", action="store_true", help="print one JSON object with every result and every skipped file")
    add("--batch-size", type=int, default=32, help="images per forward (default: %(default)s)")
    add("--runtime", choices=RUNTIMES, default="auto",
        help="auto (default): ONNX Runtime on the CPU (an --onnx file, or --checkpoint exported once into the "
        "cache), eager PyTorch for --model or a GPU; eager; compile (torch.compile); onnxruntime")
    add("--compile", action="store_true", help="same as --runtime compile")
    add("--device", default="cpu", help="PyTorch device for eager/compile: cpu, cuda, cuda:N (default: %(default)s)")
    add("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    add("--show-tokens", default=None, metavar="DIR", help="also write the kept-token picture of each image into DIR")


@dataclass
class Runner:
    """What classifies a batch: returns logits and, for pictures, the kept-token masks."""

    runtime: str
    predict: object  # (B, C, H, W) tensor -> (B, num_classes) logits
    masks: object  # (B, C, H, W) tensor -> visualize.TokenMasks, or None for a dense model
    preprocessing: dict
    class_names: Optional[list]
    description: str
    last_counts: object = None  # per-image budget: () -> the last batch's kept counts (B, S)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import visualize as vis
    from ..errors import ConfigError, DataError
    from ..files import check_output_dir

    if args.top_k < 1 or args.batch_size < 1:
        raise ConfigError("--top-k and --batch-size must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    runtime = "compile" if args.compile else args.runtime
    if args.compile and args.runtime not in ("auto", "compile"):
        raise ConfigError(f"--compile and --runtime {args.runtime} contradict each other; give one")
    if args.show_tokens:
        check_output_dir(args.show_tokens, "--show-tokens")  # before a model is loaded or exported
    runner = _onnx_runner(args, Path(args.onnx)) if args.onnx else _torch_runner(args, runtime)
    if args.show_tokens and runner.masks is None:
        raise ConfigError("--show-tokens needs a sparse model (DynamicViT, DynamicSpatial): this model is dense, "
                          "so it keeps every token")
    _logger.info("%s", runner.description)

    files, missing = vis.find_images(args.inputs)
    failed = [(str(p), why) for p, why in missing]
    for path, why in failed:
        _logger.warning("skipping %s: %s", printable(path), why)
    out_dir = prepare_output_dir(args.show_tokens, "--show-tokens") if args.show_tokens else None
    # Pictures take free names: never an input image, never a file this command did not write.
    out_names = OutputNames(out_dir, inputs=files, is_ours=vis.is_our_file) if out_dir is not None else None
    results, non_finite = _classify(args, runner, files, failed, out_names)

    if args.json:
        print(json_text({"model": runner.description, "runtime": runner.runtime, "results": results,
                         "skipped": [{"file": f, "error": e} for f, e in failed], "non_finite": non_finite}))
    if not results and not failed:
        raise DataError(f"no image files found in {', '.join(map(printable, args.inputs))}")
    summary = f"classified {len(results)} image(s)"
    if failed:
        summary += f", skipped {len(failed)} (see warnings)"
    if non_finite:
        summary += f"; {non_finite} of the skipped gave non-finite outputs (NaN or Inf): the model or its input is broken"
    if out_dir is not None and results:
        summary += f"; kept-token pictures in {printable(str(out_dir))}"
    print(summary, file=sys.stderr)
    return 1 if failed else 0


def _classify(args, runner: "Runner", files: list, failed: list, out_names: Optional[OutputNames]) -> tuple[list, int]:
    """Results for `files` in batches (printed as they come unless --json); unreadable images and images
    with non-finite outputs are added to `failed`. Returns (results, images with non-finite outputs)."""
    import torch
    from tqdm.auto import tqdm  # the class progress_bar uses: its write() moves that bar

    from .. import visualize as vis
    from ..errors import DataError
    from ..progress import progress_bar

    transform = _transform(runner.preprocessing)
    in_chans = runner.preprocessing["input_size"][0]
    show_bar = any(Path(p).is_dir() for p in args.inputs) and not args.json
    results, non_finite = [], 0
    bar = progress_bar(total=len(files), desc="predict", unit="img", enabled=show_bar)
    for chunk in _chunks(files, args.batch_size):
        names, tensors = [], []
        for path in chunk:
            try:
                tensors.append(vis.load_image(path, transform, in_chans))
                names.append(str(path))
            except DataError as e:
                failed.append((str(path), str(e)))
                _logger.warning("skipping %s", printable(str(e)))
        bar.update(len(chunk))
        if not tensors:
            continue
        x = torch.stack(tensors)
        with torch.inference_mode():
            logits = runner.predict(x).float().cpu()
        finite = logits.isfinite().all(-1)
        for name in (n for n, ok in zip(names, finite) if not ok):
            failed.append((name, NON_FINITE))
            _logger.warning("skipping %s: %s", printable(name), NON_FINITE)
        non_finite += int((~finite).sum())
        counts = runner.last_counts().tolist() if runner.last_counts else None  # per-image budget: (B, S)
        batch = [{**_prediction(name, p, runner.class_names, args.top_k), **({"kept_counts": counts[i]} if counts else {})}
                 for i, (name, p, ok) in enumerate(zip(names, logits.softmax(-1), finite)) if ok]
        results += batch
        if not args.json:  # as they come, above the progress bar (tqdm.write moves a bar on a terminal)
            for r in batch:
                kept = f" [kept {'/'.join(map(str, r['kept_counts']))}]" if "kept_counts" in r else ""
                tqdm.write(f"{printable(r['file'])}: " + ", ".join(
                    f"{p['name']} {p['probability']:.1%}" for p in r["predictions"]) + kept, file=sys.stdout)
        if out_names is not None and batch:
            _draw(runner, x[finite], [r["file"] for r in batch], batch, out_names, len(results) - len(batch))
    bar.close()
    return results, non_finite


NON_FINITE = "the model's output for this image is not finite (NaN or Inf); no prediction"


def _prediction(name: str, probs, class_names: Optional[list], top_k: int) -> dict:
    top = probs.topk(min(top_k, probs.shape[-1]))
    return {"file": name, "predictions": [
        {"class": int(c), "name": _name(class_names, int(c)), "probability": float(p)}
        for p, c in zip(top.values, top.indices)
    ]}


# -- runtimes -----------------------------------------------------------------------------------


def _onnx_runner(args, path: Path, description: Optional[str] = None) -> Runner:
    from ..errors import ConfigError
    from ..runtime import deploy

    if args.keep_ratio is not None and args.checkpoint is None:
        raise ConfigError("--keep-ratio: an ONNX file has its keep ratio fixed at export; export again with --keep-ratio")
    if args.compile or args.runtime in ("eager", "compile"):
        raise ConfigError(f"--runtime {args.runtime if not args.compile else 'compile'} needs a PyTorch model "
                          "(--checkpoint); an ONNX file runs in ONNX Runtime")
    session = deploy.OnnxModel(path, threads=args.threads)
    meta = session.metadata
    if "preprocessing" not in meta:
        raise ConfigError(f"{path} has no dynamicvit metadata (preprocessing); export it with `dynamicvit export`")
    kept_names = [n for n in session.output_names if n.startswith(deploy.KEPT_NAME.format(""))]

    def masks(x):
        return _masks_from_kept(session.run(x), kept_names, meta)

    kind = deploy.sparsity_summary(meta)
    return Runner("onnxruntime", session, masks if kept_names else None, meta["preprocessing"],
                  meta.get("class_names"), description or f"{meta.get('model_name')} ({kind}) in ONNX Runtime from {path}")


def _torch_runner(args, runtime: str) -> Runner:

    from .. import visualize as vis
    from ..core.base import SparseModel, logits_of
    from ..core.budget import CountRecorder
    from ..data import num_classes_of, preprocessing_config
    from ..runtime import deploy
    from ..runtime.device import resolve_device
    from ..weights.build import create_model, load, load_model
    from ..weights.formats import read_settings
    from ..weights.hf import is_hf_spec

    device = resolve_device(args.device)
    settings = None
    hf_source = is_hf_spec(args.checkpoint or args.model)
    if hf_source:  # a transformers folder: its weights, image processor and saved prediction modules
        model = load(args.checkpoint or args.model, keep_ratio=args.keep_ratio, sparse=True, overrides=args.model_kwargs)
    elif args.checkpoint:
        settings = read_settings(args.checkpoint)
        if settings is None:
            from ..errors import ConfigError

            raise ConfigError(f"{args.checkpoint} holds weights without dynamicvit settings; save the model with "
                              "dynamicvit.save_model or use the model.safetensors that `dynamicvit train` writes")
        model = load_model(args.checkpoint, **args.model_kwargs)
    else:
        _logger.warning("random weights (--model without --checkpoint): the predictions are meaningless")
        model = create_model(args.model, keep_ratio=args.keep_ratio or 0.7, **args.model_kwargs)
    if args.keep_ratio is not None and not isinstance(model, SparseModel):
        from ..errors import ConfigError

        raise ConfigError(f"{args.checkpoint} holds a dense model; --keep-ratio needs a sparse model "
                          "(DynamicViT, DynamicSpatial)")
    set_budget(model, args.keep_ratio, args.budget)
    per_image = getattr(model, "budget", "fixed") == "per-image"
    model.eval()
    train_dataset = (((settings or {}).get("extra") or {}).get("train_config") or {}).get("dataset")
    num_classes = num_classes_of(model)
    names = deploy.checkpoint_class_names(settings, num_classes) or deploy.default_class_names(model)
    preprocessing = preprocessing_config(model, train_dataset)
    sparse = isinstance(model, SparseModel)
    kind = deploy.sparsity_summary(deploy.sparsity_settings(model))
    if per_image:
        kind = f"keep ratio {model.keep_ratio}, per-image budget (tokens kept on average {list(model.keep_counts())})"
    source = args.checkpoint or (args.model if hf_source else f"{args.model} (random weights)")

    if runtime == "auto":  # the per-image budget has no ONNX graph (export_onnx says why)
        runtime = "onnxruntime" if args.checkpoint and not hf_source and device.type == "cpu" and not per_image else "eager"
    if runtime == "onnxruntime":
        if device.type != "cpu":
            from ..errors import ConfigError

            raise ConfigError("--runtime onnxruntime runs on the CPU here; drop --device or use --runtime eager")
        description = f"{model.model_name if sparse else source} ({kind}) in ONNX Runtime, exported from {source} to "
        if args.checkpoint and not hf_source:
            runner = _cached_runner(model, args, names, preprocessing, description)
        else:  # random weights or a folder: not cached; the temporary folder lives as long as the process
            folder = tempfile.TemporaryDirectory(prefix="dynamicvit-predict-")
            atexit.register(folder.cleanup)
            path = deploy.export_onnx(model, Path(folder.name) / "model.onnx", class_names=names,
                                      preprocessing=preprocessing).path
            runner = _onnx_runner(args, path, f"{description}{path}")
        if sparse:  # pictures from PyTorch: they also show the keep probabilities
            runner.masks = lambda x: vis.kept_token_masks(model, x)
        return runner

    model.to(device)
    recorder = CountRecorder(model).eval() if per_image else None
    runnable = model if recorder is None else recorder
    forward = deploy.compile(runnable) if runtime == "compile" else runnable

    def predict(x):
        return logits_of(forward(x.to(device)))

    def masks(x):
        return vis.kept_token_masks(model, x.to(device))

    return Runner(runtime, predict, masks if sparse else None, preprocessing, names,
                  f"{source} ({kind}) in PyTorch ({runtime}, {device})",
                  recorder.last if recorder is not None else None)


def _cached_runner(model, args, class_names, preprocessing, description: str) -> Runner:
    """ONNX Runtime on the checkpoint's cache entry: exported once (verified against PyTorch) and reused;
    an entry that cannot be loaded any more (truncated, damaged) is reported and exported again."""
    from ..errors import ConfigError, OutputError
    from ..runtime import deploy

    path = _cache_entry(model, args)
    if path.is_file():
        try:
            return _onnx_runner(args, path, f"{description}{path}")
        except ConfigError as e:
            _logger.warning("the cached ONNX export is damaged (%s); exporting %s again. If this repeats, delete the "
                            "cache folder %s", e, args.checkpoint, path.parent)
    _logger.info("exporting %s to ONNX once (verified against PyTorch): %s", args.checkpoint, path)
    try:
        deploy.export_onnx(model, path, class_names=class_names, preprocessing=preprocessing, overwrite=True,
                           extra_metadata={"source": str(args.checkpoint)})
    except OutputError as e:
        raise OutputError(f"{e}. The ONNX export is cached in {path.parent}: set DYNAMICVIT_CACHE to a writable "
                          "folder, or run without an export: --runtime eager") from None
    return _onnx_runner(args, path, f"{description}{path}")


def _cache_entry(model, args) -> Path:
    """The cache file of the checkpoint's export: named by a digest of its content and what shapes the graph."""
    import torch

    from ..data import cache_dir
    from ..version import __version__

    digest = hashlib.sha256()
    with open(args.checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(json.dumps([getattr(model, "keep_ratio", 1.0), args.model_kwargs, __version__, torch.__version__],
                             sort_keys=True, default=str).encode())
    return cache_dir() / "onnx" / f"{Path(args.checkpoint).stem}-{digest.hexdigest()[:16]}.onnx"


# -- helpers ------------------------------------------------------------------------------------


def _transform(preprocessing: dict):
    from ..data import eval_transform

    return eval_transform(preprocessing)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _name(class_names: Optional[list], index: int) -> str:
    return class_names[index] if class_names and index < len(class_names) else f"class {index}"


def _masks_from_kept(outputs: dict, kept_names: list[str], meta: dict):
    """TokenMasks from an ONNX graph's kept-token outputs (keep probabilities are not in the graph: NaN)."""
    import numpy as np

    from ..visualize import TokenMasks

    gh, gw = meta["grid_size"]
    C, H, W = meta["input_size"]
    kept = [outputs[n].numpy() for n in kept_names]
    B = kept[0].shape[0]
    masks = np.zeros((B, len(kept), gh * gw), dtype=bool)
    for s, idx in enumerate(kept):
        np.put_along_axis(masks[:, s], idx, True, axis=1)
    nan = np.full((B, len(kept), gh, gw), np.nan)
    return TokenMasks(
        masks=masks.reshape(B, len(kept), gh, gw), keep_prob=nan[:, 0].copy(), stage_keep_prob=nan,
        kept_indices=kept, logits=outputs["logits"].numpy(), keep_counts=tuple(meta["keep_counts"]),
        patch_size=(H // gh, W // gw),
    )


def _draw(runner: Runner, x, names: list, results: list, out_names: OutputNames, first: int) -> None:
    """One picture per image, numbered in input order so that equal file names in two folders stay apart;
    a name taken by a file this command did not write (or by an input image) gets a `_2`, `_3`, ... suffix."""
    import re

    from .. import visualize as vis

    tm = runner.masks(x)
    pics = vis.to_uint8(x, runner.preprocessing["mean"], runner.preprocessing["std"])
    for i, (name, r) in enumerate(zip(names, results)):
        best = r["predictions"][0]
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._") or "image"
        title = f"{Path(name).name}: {best['name']} ({best['probability']:.0%})"
        vis.render_tokens(pics[i], tm, i, title=title).save(out_names.claim_file(f"{first + i:05d}_{stem}", ".png"))
