"""`dynamicvit visualize`: draw the tokens a DynamicViT keeps at each stage.

Per image one PNG: the original as the model sees it, one panel per stage with the dropped patches
faded, and the first stage's keep probability. Optionally contact sheets, an HTML page, or (with
--average) the keep frequency of every grid position over all inputs.
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Iterator, Optional

from ..files import OutputNames, prepare_output_dir
from ._common import float_list, model_kwargs, non_negative_int, positive_float, positive_float_list, positive_int
from ._model import add_budget_argument, set_budget

HELP = "Draw the tokens a DynamicViT keeps at each stage."

_logger = logging.getLogger("dynamicvit.visualize")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("inputs", nargs="*", metavar="IMAGE_OR_FOLDER", help="image files or folders (searched recursively)")
    add("--model", default=None, help="timm model name (optional with a checkpoint saved by dynamicvit)")
    add("--checkpoint", default=None, metavar="PATH",
        help="weights: a file saved by dynamicvit (knows its architecture), or reference DynamicViT / timm / "
        "DeiT weights for --model; without it the prediction modules are random")
    add("--output", required=True, metavar="DIR", help="folder for the pictures")
    add("--keep-ratio", type=float, default=None, help="rho (default: the checkpoint's, else 0.7)")
    add_budget_argument(parser)
    add("--img-size", type=positive_int, default=None, help="input resolution (default: the model's)")
    add("--model-kwargs", "--timm-kwargs", type=model_kwargs, default={}, metavar="KWARGS",
        help="extra timm.create_model arguments, as a JSON object ('{\"in_chans\": 1}') or comma-separated "
        "key=value pairs (in_chans=1,num_classes=10,patch_size=4)")
    add("--dataset", default=None,
        help="draw samples of a dataset: fashion-mnist, or an ImageFolder root (train/ and val/ of class folders); "
        "a plain folder is read as images")
    add("--split", default="val", choices=("train", "val", "test"), help="dataset split (test = val; default val)")
    add("--data-dir", default=None, help="Fashion-MNIST: the folder with the IDX files (default: the system package)")
    add("--num-samples", type=non_negative_int, default=16, help="dataset images, a fixed random subset (default 16; 0 = all)")
    add("--seed", type=int, default=0, help="which random subset of the dataset (default 0)")
    add("--average", action="store_true",
        help="instead of one picture per image: the keep frequency of each grid position over all inputs, per stage")
    add("--contact-sheet", action="store_true", help="also draw all images in one sheet (several if many)")
    add("--sheet-rows", type=positive_int, default=24, help="images per contact sheet (default 24)")
    add("--html", action="store_true", help="also write DIR/index.html showing every picture")
    add("--embed", action="store_true", help="embed the pictures in the HTML page instead of linking them")
    add("--mean", type=float_list, default=None, metavar="M[,M,M]",
        help="normalization mean of image files, e.g. 0.485,0.456,0.406 (default: the model's)")
    add("--std", type=positive_float_list, default=None, metavar="S[,S,S]",
        help="normalization std of image files (default: the model's)")
    add("--crop-pct", type=positive_float, default=None, help="center-crop fraction for image files (1.0 = no crop)")
    add("--batch-size", type=positive_int, default=32, help="images per forward pass")
    add("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def run(args: argparse.Namespace) -> int:

    from .. import visualize as vis
    from ..data import eval_transform, preprocessing_config
    from ..errors import ConfigError, DataError
    from ..runtime.device import resolve_device

    if not args.inputs and not args.dataset:
        raise ConfigError("nothing to draw: give image files or folders, or --dataset NAME --num-samples N")
    if args.batch_size < 1 or args.sheet_rows < 1 or args.num_samples < 0:
        raise ConfigError("--batch-size and --sheet-rows must be at least 1, --num-samples at least 0")
    device = resolve_device(args.device)
    model, trained, train_dataset = load_model(args)
    if not trained:
        _logger.warning(
            "warning: the prediction modules have random weights (no trained DynamicViT checkpoint given); "
            "the kept tokens are arbitrary and the picture is meaningless"
        )
    model.to(device).eval()
    out = prepare_output_dir(args.output)

    skipped: list[tuple[str, str]] = []
    sources = []  # iterators of (name, image tensor, label or None)
    input_files: list[Path] = []
    class_names = _class_names(model)
    mean = std = None
    use_dataset = bool(args.dataset) and _is_dataset(args.dataset)
    if use_dataset:
        samples, mean, std, class_names = _dataset_samples(args, model, skipped)
        sources.append(samples)
    inputs = list(args.inputs) + ([args.dataset] if args.dataset and not use_dataset else [])
    if inputs:
        files, missing = vis.find_images(inputs)
        input_files = list(files)
        if args.dataset and not args.inputs and args.num_samples:
            files = files[: args.num_samples]
        trained_on = args.dataset if use_dataset else train_dataset
        if trained_on is not None and (args.mean is None or args.std is None):
            _logger.info("image files normalized as for %s (the data the model was trained on)", trained_on)
        config = preprocessing_config(model, trained_on, mean=args.mean, std=args.std, crop_pct=args.crop_pct)
        transform = eval_transform(config)
        if mean is None:
            mean, std = config["mean"], config["std"]
        elif tuple(config["mean"]) != tuple(mean) or tuple(config["std"]) != tuple(std):
            raise ConfigError("image files and --dataset need the same normalization here; draw them in two runs")
        skipped += [(str(p), why) for p, why in missing]
        for p, why in missing:
            _logger.warning("skipping %s: %s", p, why)
        sources.append(_load_files(files, transform, config["input_size"][0], skipped))
        _logger.debug("image files: %s", config)

    batches = _batched((item for source in sources for item in source), args.batch_size)
    entries: list[tuple[str, Path]] = []
    # Output names never replace an input or any file we did not write (e.g. --output is the input folder).
    names = OutputNames(out, inputs=input_files, is_ours=vis.is_our_file)
    if args.average:
        drawn = _draw_average(model, batches, names, entries)
    else:
        drawn = _draw_images(model, batches, names, mean, std, class_names, args, entries)

    if args.html and entries:
        kept = (f"tokens kept per stage {list(model.keep_counts())} of {model.num_patches}"
                if getattr(model, "budget", "fixed") == "fixed" else
                f"per-image budget: each image keeps its own count (on average {list(model.keep_counts())} of "
                f"{model.num_patches})")
        notes = [f"{getattr(model, 'model_name', '')}, keep ratio {model.keep_ratio}, {kept}"]
        if not trained:
            notes.append("Warning: random prediction modules; the kept tokens are arbitrary.")
        page = vis.write_html(names.claim_file("index", ".html"), entries, notes=notes, embed=args.embed)
        print(f"wrote {page}")
    if drawn == 0:
        reasons = "; ".join(why for _, why in skipped[:5]) or "no inputs"
        raise DataError(f"nothing could be drawn from {len(skipped)} input(s): {reasons}")
    print(f"drew {drawn} image(s) into {out}" + (f"; skipped {len(skipped)} (see warnings)" if skipped else ""))
    return 0


def _is_dataset(spec: str) -> bool:
    """fashion-mnist, or an ImageFolder root (with train/ or val/); any other folder is a folder of images."""
    from ..data import IMAGE_FOLDER_VAL_NAMES, is_fashion_mnist

    p = Path(spec)
    if is_fashion_mnist(spec):
        return True
    if p.is_dir():
        return any((p / n).is_dir() for n in ("train", *IMAGE_FOLDER_VAL_NAMES))
    return True  # let the data module explain what is wrong with the name


# -- model --------------------------------------------------------------------------------------


def load_model(args: argparse.Namespace):
    """Build the model from --checkpoint / --model.

    Returns:
        (DynamicViT, whether its predictors are trained, the dataset it was trained on or None).
    """
    from ..core.base import SparseModel
    from ..core.layouts import has_predictor_weights
    from ..errors import ConfigError
    from ..weights.build import create_model, load, sparsify
    from ..weights.formats import read_checkpoint
    from ..weights.hf import has_predictors, is_hf_spec

    kwargs = dict(args.model_kwargs)
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    trained, train_dataset = False, None
    if is_hf_spec(args.checkpoint or args.model):  # a transformers folder (with our prediction modules, if saved)
        spec = args.checkpoint or args.model
        model, trained = load(spec, overrides=kwargs, sparse=True), has_predictors(spec)
    elif args.checkpoint:
        checkpoint = read_checkpoint(args.checkpoint)
        state, settings = checkpoint
        if settings is None and not args.model:
            raise ConfigError(
                f"{args.checkpoint} holds weights without dynamicvit settings; name its architecture with "
                "--model NAME (e.g. --model deit_small_patch16_224)"
            )
        # A file's settings win (an explicit --model that contradicts them is an error naming both);
        # plain dense weights get fresh prediction modules.
        model = load(args.checkpoint, args.model, overrides=kwargs, sparse=True, checkpoint=checkpoint)
        if settings is not None:
            train_dataset = ((settings.get("extra") or {}).get("train_config") or {}).get("dataset")
            trained = isinstance(model, SparseModel)
        else:
            trained = has_predictor_weights(state)
    elif args.model:
        model = create_model(args.model, **kwargs)
    else:
        raise ConfigError("give --checkpoint PATH (a file saved by dynamicvit) and/or --model NAME")
    if not isinstance(model, SparseModel):
        _logger.info("the checkpoint holds a dense model; adding fresh prediction modules")
        model = sparsify(model)
    set_budget(model, args.keep_ratio, args.budget)
    return model, trained, train_dataset


def _class_names(model) -> Optional[list[str]]:
    """The model's own class names (transformers' id2label), else ImageNet's for 1000 classes."""
    from ..runtime.deploy import default_class_names

    try:
        return default_class_names(model)
    except Exception:  # noqa: BLE001 - names are a nicety
        return None


# -- inputs -------------------------------------------------------------------------------------


def _load_files(files, transform, in_chans: int, skipped: list) -> Iterator[tuple[str, object, None]]:
    """Yield (name, image tensor, None) per readable file; unreadable ones are logged and added to `skipped`."""
    from .. import visualize as vis
    from ..errors import DataError

    for path in files:
        try:
            yield str(path), vis.load_image(path, transform, in_chans), None
        except DataError as e:
            _logger.warning("skipping %s", e)
            skipped.append((str(path), str(e)))


def _dataset_samples(args, model, skipped: list):
    """(samples, mean, std, class names) for --dataset, from dynamicvit.data; samples yield (name, image, label)."""
    from ..core.hosts import any_host
    from ..data import base_dataset, build_dataset, resolve_dataset
    from ..errors import ConfigError

    info = resolve_dataset(args.dataset, args.data_dir)
    host = any_host(model)
    C, (H, W) = host.in_chans, host.img_size
    if C != info.in_chans or H != W:
        raise ConfigError(
            f"{info.name} has {info.in_chans}-channel images but the model takes {C}x{H}x{W} inputs; "
            f"build the model with in_chans={info.in_chans} and a square img_size "
            f"(--model-kwargs in_chans={info.in_chans})"
        )
    split = "val" if args.split == "test" else args.split
    dataset = build_dataset(args.dataset, "val" if split == "val" else "train", img_size=H, data_dir=args.data_dir,
                            subset=args.num_samples or None, seed=args.seed)
    if split == "train":
        _logger.info("note: training images are drawn with training augmentation")
    indices = getattr(dataset, "indices", range(len(dataset)))
    classes = list(info.classes) or None

    def samples():
        for i, idx in enumerate(indices):
            x, y = dataset[i]
            if y < 0:  # an unreadable image (dynamicvit.data.CheckedImageFolder)
                path, why = base_dataset(dataset).describe(-y - 1)
                _logger.warning("skipping %s: %s", path, why)
                skipped.append((path, why))
                continue
            label = classes[y] if classes and 0 <= y < len(classes) else str(y)
            yield f"{info.name}_{split}_{idx:05d}", x, label

    return samples(), info.mean, info.std, classes


def _batched(samples, batch_size: int):
    """Group (name, tensor, label) triples into (names, (B, C, H, W) tensor, labels) batches."""
    import torch

    names, tensors, labels = [], [], []
    for name, x, label in samples:
        names.append(name)
        tensors.append(x)
        labels.append(label)
        if len(tensors) == batch_size:
            yield names, torch.stack(tensors), labels
            names, tensors, labels = [], [], []
    if tensors:
        yield names, torch.stack(tensors), labels


# -- drawing ------------------------------------------------------------------------------------


def _png_path(names: OutputNames, name: str) -> Path:
    """A free `<stem>.png` for an input called `name` (see `OutputNames`)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._") or "image"
    return names.claim_file(stem, ".png")


def _title(name: str, logits, class_names, label: Optional[str] = None) -> str:
    import numpy as np

    p = np.exp(logits - logits.max())
    p /= p.sum()
    k = int(p.argmax())
    predicted = class_names[k] if class_names and k < len(class_names) else f"class {k}"
    truth = f"true {label}, " if label is not None else ""
    return f"{name}: {truth}predicted {predicted} ({p[k]:.0%})"


def _draw_images(model, batches, names: OutputNames, mean, std, class_names, args, entries: list) -> int:
    from .. import visualize as vis
    from ..progress import progress_bar

    sheet_images, sheet_masks, sheet_titles = [], [], []
    drawn = 0
    for batch_names, x, labels in progress_bar(batches, desc="visualize", unit="batch"):
        tm = vis.kept_token_masks(model, x)
        pics = vis.to_uint8(x, mean, std)
        titles = [_title(n, tm.logits[i], class_names, labels[i]) for i, n in enumerate(batch_names)]
        for i, (name, title) in enumerate(zip(batch_names, titles)):
            path = vis.render_tokens(pics[i], tm, i, title=title).save(_png_path(names, name))
            entries.append((title, path))
            drawn += 1
        if args.contact_sheet:
            sheet_images.append(pics)
            sheet_masks.append(tm)
            sheet_titles += titles
    if args.contact_sheet and sheet_images:
        import numpy as np

        images, tm = np.concatenate(sheet_images), vis.TokenMasks.concat(sheet_masks)
        pages = range(0, len(images), args.sheet_rows)
        for page, start in enumerate(pages, 1):
            stop = start + args.sheet_rows
            name = "contact_sheet" if len(pages) == 1 else f"contact_sheet_{page:02d}"
            grid = vis.render_contact_sheet(images[start:stop], tm[start:stop], sheet_titles[start:stop])
            path = grid.save(names.claim_file(name, ".png"))
            entries.insert(page - 1, (f"contact sheet {page}/{len(pages)}", path))
            print(f"wrote {path}")
    return drawn


def _draw_average(model, batches, names: OutputNames, entries: list) -> int:
    import numpy as np

    from .. import visualize as vis
    from ..errors import DataError
    from ..files import atomic_write

    count = 0

    def images():
        nonlocal count
        for _, x, _ in batches:
            count += len(x)
            yield x

    try:
        maps = vis.average_keep_maps(model, images(), progress=True)
    except DataError:  # no image could be read
        return 0
    title = f"keep frequency per position over {count} image(s)"
    stem = names.claim("average_keep", (".png", ".npy"))
    path = vis.save_average(maps, stem.parent / f"{stem.name}.png", model.keep_counts(), title=title)
    array = stem.parent / f"{stem.name}.npy"

    def write_array(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a temp name
            np.save(f, maps)

    atomic_write(array, write_array)
    entries.append((title, path))
    print(f"wrote {path} and {array} (shape {maps.shape}: stage, row, column)")
    return count
