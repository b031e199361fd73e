"""Deployment: ONNX export that checks itself, int8 quantization, ONNX Runtime inference, torch.compile.

The inference path keeps a fixed number of tokens per stage (int(N * rho^s)), so every tensor shape
except the batch is known when the model is built. That is what makes the pruned model exportable as
one static graph (top-k and gather are ordinary ONNX operators: TopK, GatherElements) and capturable
whole as a CUDA graph: token-merging methods whose token count depends on the data cannot do either.

- `export_onnx`: the inference path (prediction modules, top-k, gather, attention) as one ONNX graph
  with a dynamic batch axis and metadata (settings, keep ratio, class names, preprocessing). The file
  is verified with ONNX Runtime on the CPU against PyTorch at two batch sizes before it is moved into
  place; a disagreement raises `ExportError` and leaves no file behind.
- `quantize_int8`: ONNX Runtime dynamic quantization of the linear layers (`evaluate.onnx_accuracy`
  says what it costs on a dataset).
- `OnnxModel`: an ONNX Runtime session that takes and returns torch tensors, with the file's metadata.
- `compile`: `torch.compile` of the inference path with a dynamic batch dimension.

ONNX graph interface: input `images` (B, C, H, W) float32; output `logits` (B, num_classes) and, for a
sparse model, `kept_tokens_<s>` (B, k_s) int64 per stage (kept patches, or for ConvNeXt / Swin the
positions of the stage-3 map on the full path, as indices into the row-major grid).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import math
import warnings
from glob import escape as glob_escape
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..core.base import SparseModel, backbone_of, logits_of
from ..core.hosts import any_host
from ..data import (FASHION_MNIST, check_eval_config, check_input_size, is_fashion_mnist, num_classes_of,
                    preprocessing_config)
from ..errors import ConfigError, DynamicViTError, UnsupportedModelError
from ..extras import require
from ..files import PathLike, atomic_write
from ..text import printable, short_repr
from ..version import __version__
from ..weights.formats import is_int, is_number, model_settings
from .flops import default_input_size

_logger = logging.getLogger(__name__)

Exporter = Literal["dynamo", "torchscript"]

INPUT_NAME = "images"
LOGITS_NAME = "logits"
KEPT_NAME = "kept_tokens_{}"  # one output per stage, 1-based
METADATA_KEY = "dynamicvit"
CLASS_NAMES_KEY = "class_names"
KEEP_RATIO_KEY = "keep_ratio"
# 18: the dynamo exporter's lowest. Opset 20 writes GELU as ONNX's Gelu operator, which ONNX Runtime fuses
# with its bias (13 nodes per prediction module instead of 27), but on the 2-core AMD EPYC it was not
# faster in two runs (benchmarks/ort_settings.py): pruned DeiT-S 1.2% faster in one, 8.8% slower in the other.
DEFAULT_OPSET = 18
MIN_OPSET = {"dynamo": 18, "torchscript": 17}  # 17: the first opset with LayerNormalization
MAX_OPSET = {"dynamo": 23, "torchscript": 20}
ONNX_ATTENTION_OPSET = 23  # the first opset with an Attention operator
VERIFY_BATCH_SIZES = (1, 4)
FP32_ATOL = 1e-4
# Two patch scores (keep log-probabilities) closer than this are a tie: which of them survives top-k is decided by rounding,
# and ONNX Runtime may break the tie the other way than PyTorch (it happens with untrained, nearly
# uniform prediction modules). Such images are reported and left out of the logits comparison.
SCORE_TIE = 1e-4
# Bounds for what a file's metadata states: a crafted file must not make predict allocate or print without end.
MAX_CLASSES = 1_000_000
MAX_NAME_LENGTH = 1000  # characters of a class or model name


class ExportError(DynamicViTError):
    """The exported graph does not compute what the PyTorch model computes, or the export failed."""


# -- settings stored with the graph -------------------------------------------------------------


def default_class_names(model: nn.Module) -> Optional[list[str]]:
    """The class names the model carries (transformers' id2label), else ImageNet's class descriptions for
    a 1000-class model (from timm), else None."""
    try:
        names = any_host(model).class_names
    except UnsupportedModelError:  # a timm model of no host family
        names = None
    if names is not None or num_classes_of(model) != 1000:
        return names
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def checkpoint_class_names(settings: Optional[dict], num_classes: int) -> Optional[list[str]]:
    """Class names a checkpoint knows, made printable (`text.printable`): stored ones, or those of the
    dataset it was trained on when that is known by its name (Fashion-MNIST). A folder named in a
    checkpoint is never read: the file may come from anyone, the folder may be anyone's."""
    extra = (settings or {}).get("extra") or {}
    names = extra.get("class_names")
    if names is None:
        dataset = (extra.get("train_config") or {}).get("dataset")
        names = FASHION_MNIST.classes if dataset and is_fashion_mnist(dataset) else None
    if not names or len(names) != num_classes:
        return None
    return [printable(str(n)[:MAX_NAME_LENGTH]) for n in names]


def sparsity_settings(model: nn.Module) -> dict:
    """A model's settings (`model_settings`) with, for a sparse model, its kept counts and grid."""
    settings = model_settings(model)
    if isinstance(model, SparseModel):
        settings.update(keep_counts=list(model.keep_counts()), num_patches=model.num_patches,
                        grid_size=list(model.grid_size))
    return settings


def sparsity_summary(settings: dict) -> str:
    """`keep ratio 0.7, tokens kept [34, 24, 16]` for `sparsity_settings` (or an ONNX file's metadata);
    ConvNeXt / Swin keep every position and send the kept ones through the full path; `dense` otherwise."""
    if settings.get("kind") != "dynamicvit" or "keep_counts" not in settings:
        return "dense"
    kept = "positions on the full path" if "stage_ratios" in settings else "tokens kept"
    return f"keep ratio {settings.get('keep_ratio')}, {kept} {settings['keep_counts']}"


def graph_metadata(model: nn.Module, *, class_names=None, preprocessing=None, extra=None) -> dict[str, str]:
    """The ONNX metadata_props of an exported model: JSON settings, keep ratio, class names."""
    settings = sparsity_settings(model)
    settings.update(
        input_size=list(default_input_size(model)),
        num_classes=num_classes_of(model),
        preprocessing=preprocessing or preprocessing_config(model),
        versions={"dynamicvit": __version__, "torch": torch.__version__},
        **(extra or {}),
    )
    meta = {METADATA_KEY: json.dumps(settings), KEEP_RATIO_KEY: str(getattr(model, "keep_ratio", 1.0))}
    if class_names is not None:
        meta[CLASS_NAMES_KEY] = json.dumps(list(class_names))
    return meta


def read_metadata(path: PathLike) -> dict:
    """The settings stored in an ONNX file by `export_onnx` (with `class_names`, None when absent), checked
    (`check_metadata`); a file without dynamicvit metadata gives `{"class_names": ...}` alone."""
    onnx = require("onnx", "reading an ONNX file")

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no ONNX file at {path}; export one with `dynamicvit export ... --output {path}`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for a bad file
        raise ConfigError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e})") from None
    return check_metadata({p.key: p.value for p in model.metadata_props}, path, *_graph_shapes(model.graph))


def check_metadata(
    props: dict[str, str], path: PathLike, graph_input: Optional[list] = None, graph_outputs: Optional[dict] = None
) -> dict:
    """Parse and check the dynamicvit metadata of an ONNX file before anything is built from it.

    Every value must have its type and stay within bounds, and agree with the graph: the input size
    with the graph's input, the class count with its logits, the kept counts with its kept-token
    outputs. Names are made printable (`text.printable`): no escape sequence reaches a terminal.

    Args:
        props: the file's metadata_props.
        graph_input: the dims of the graph's image input (None for one without a fixed size).
        graph_outputs: {output name: dims}.

    Raises:
        ConfigError: one line naming the file, the value and what was expected.
    """
    where = f"{path}: the dynamicvit metadata"
    graph_outputs = graph_outputs or {}
    logits = (graph_outputs.get(LOGITS_NAME) or [None])[-1]  # the graph's class count, if fixed
    settings = _json_prop(props, METADATA_KEY, f"{where} ({METADATA_KEY})", dict) or {}
    if settings:
        kept_outputs = sum(1 for name in graph_outputs if name.startswith(KEPT_NAME.format("")))
        _check_graph_settings(settings, where, graph_input, logits, kept_outputs)
    names = _json_prop(props, CLASS_NAMES_KEY, f"{where} ({CLASS_NAMES_KEY})", list)
    if names is not None:
        num_classes = settings.get("num_classes", logits)
        if not all(isinstance(n, str) for n in names) or (num_classes is not None and len(names) != num_classes):
            raise ConfigError(f"{where}: class_names is {short_repr(names)}; expected {num_classes or 'one'} name(s) "
                              "for the classes the graph predicts")
        names = [printable(n[:MAX_NAME_LENGTH]) for n in names]
    settings["class_names"] = names
    return settings


def _json_prop(props: dict[str, str], key: str, where: str, kind: type):
    if key not in props:
        return None
    try:
        value = json.loads(props[key])
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{where} is not valid JSON ({'nested too deeply' if isinstance(e, RecursionError) else e}); "
                          "the file is damaged: export the model again with `dynamicvit export`") from None
    if not isinstance(value, kind):
        raise ConfigError(f"{where} is {short_repr(value)}; expected a JSON {'object' if kind is dict else 'list'}")
    return value


def _check_graph_settings(
    settings: dict, where: str, graph_input: Optional[list], logits: Optional[int], kept_outputs: int
) -> None:
    """The values of `settings` that predict, export and the runtimes use, in place (strings made printable)."""
    for key in ("model_name", "source", "family"):
        if key in settings:
            if not isinstance(settings[key], str):
                raise ConfigError(f"{where}: {key} is {short_repr(settings[key])}; expected a name")
            settings[key] = printable(settings[key][:MAX_NAME_LENGTH])
    if settings.get("kind", "dense") not in ("dynamicvit", "dense"):
        raise ConfigError(f"{where}: kind is {short_repr(settings.get('kind'))}; expected dynamicvit or dense")
    if "preprocessing" in settings:
        settings["preprocessing"] = check_eval_config(settings["preprocessing"], f"{where}: preprocessing")
    preprocessed = settings.get("preprocessing", {}).get("input_size")
    size = settings.get("input_size", preprocessed)
    if size is not None:
        size = list(check_input_size(size, f"{where}: input_size"))
        graph = (graph_input or [None])[1:]
        if preprocessed not in (None, size) or any(g not in (None, v) for g, v in zip(graph, size)):
            raise ConfigError(f"{where}: input_size {size} disagrees with the preprocessing or the graph's input "
                              f"{graph_input}; the file is damaged: export the model again")
        settings["input_size"] = size
    num_classes = settings.get("num_classes")
    if num_classes is not None and (not is_int(num_classes) or not 1 <= num_classes <= MAX_CLASSES
                                    or logits not in (None, num_classes)):
        raise ConfigError(f"{where}: num_classes is {short_repr(num_classes)}; expected the graph's class count "
                          f"({logits if logits is not None else f'1 to {MAX_CLASSES}'})")
    if settings.get("kind") == "dynamicvit":
        _check_kept(settings, where, size, kept_outputs)


def _check_kept(settings: dict, where: str, size: Optional[list], kept_outputs: int) -> None:
    """keep_ratio, and where the graph has kept-token outputs, the grid and the counts that draw them."""
    ratio = settings.get("keep_ratio")
    if not is_number(ratio) or not 0 < ratio <= 1:
        raise ConfigError(f"{where}: keep_ratio is {short_repr(ratio)}; expected a number in (0, 1]")
    if not kept_outputs:
        return
    grid, counts = settings.get("grid_size"), settings.get("keep_counts")
    if size is None:
        raise ConfigError(f"{where} has no input_size; the file is damaged: export the model again")
    H, W = size[1:]
    if not (isinstance(grid, list) and len(grid) == 2 and all(is_int(g) and g >= 1 for g in grid)
            and grid[0] <= H and grid[1] <= W):
        raise ConfigError(f"{where}: grid_size is {short_repr(grid)}; expected [rows, columns] of at most the "
                          f"input size {[H, W]}")
    if not (isinstance(counts, list) and len(counts) == kept_outputs
            and all(is_int(k) and 1 <= k <= grid[0] * grid[1] for k in counts)):
        raise ConfigError(f"{where}: keep_counts is {short_repr(counts)}; expected {kept_outputs} count(s) of 1 to "
                          f"{grid[0] * grid[1]} (the graph's kept-token outputs)")


def _graph_shapes(graph) -> tuple[Optional[list], dict[str, list]]:
    """(dims of the first input, {output name: dims}); a dimension without a fixed size is None."""
    def dims(value_info) -> list:
        return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]

    return (dims(graph.input[0]) if graph.input else None), {o.name: dims(o) for o in graph.output}


# -- export -------------------------------------------------------------------------------------


@dataclass
class Verification:
    """ONNX Runtime (CPU) against PyTorch on the same random inputs.

    Attributes:
        batch_sizes: the batch sizes run (the graph's batch axis is dynamic).
        max_abs_diff: largest |logit difference| over the compared images.
        top1_agreement: fraction of all images on which both predict the same class.
        images: images run.
        compared: images whose logits were compared (all but the tied ones).
        tied: images where two patch scores at a stage boundary were closer than `SCORE_TIE`, and the two
            runtimes kept different tokens (rounding decides ties); excluded from `max_abs_diff`.
        kept_agreement: fraction of images on which both runtimes kept the same tokens at every stage.
        atol: the tolerance the logits had to meet.
    """

    batch_sizes: list[int]
    max_abs_diff: float
    top1_agreement: float
    images: int
    compared: int
    tied: int
    kept_agreement: float
    atol: float

    @property
    def passed(self) -> bool:
        return self.compared > 0 and self.max_abs_diff <= self.atol

    def summary(self) -> str:
        tied = f"; {self.tied} image(s) with tied token scores left out" if self.tied else ""
        return (
            f"ONNX Runtime vs PyTorch on {self.images} random images (batch sizes "
            f"{', '.join(map(str, self.batch_sizes))}): max abs logit diff {self.max_abs_diff:.2e} "
            f"(tolerance {self.atol:g}), top-1 agreement {self.top1_agreement:.1%}, same kept tokens "
            f"{self.kept_agreement:.1%}{tied}"
        )


@dataclass
class ExportResult:
    """What `export_onnx` wrote and how it checked it."""

    path: Path
    metadata: dict
    verification: Optional[Verification]
    opset: int
    exporter: str
    outputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


class _InferenceGraph(nn.Module):
    """What is exported: images -> (logits, kept tokens of each stage) for a sparse model, logits otherwise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        if isinstance(self.model, SparseModel):
            out = self.model.forward_pruned(images)
            return (out.logits, *out.kept_indices)
        return logits_of(self.model(images))


def export_onnx(
    model: nn.Module,
    path: PathLike,
    keep_ratio: Optional[float] = None,
    opset: Optional[int] = None,
    dense: bool = False,
    class_names: Optional[Sequence[str]] = None,
    *,
    preprocessing: Optional[dict] = None,
    overwrite: bool = False,
    verify: bool = True,
    verify_batch_sizes: Sequence[int] = VERIFY_BATCH_SIZES,
    atol: float = FP32_ATOL,
    exporter: Exporter = "dynamo",
    extra_metadata: Optional[dict] = None,
) -> ExportResult:
    """Export the inference path as one ONNX graph with a dynamic batch axis, and check it.

    Args:
        model: a sparse model (exported with tokens removed) or a dense timm model, in eval mode, fp32, on the CPU.
        path: the .onnx file to write; an existing file is an error unless `overwrite`.
        keep_ratio: export at this keep ratio (the model itself is not changed); default the model's.
        opset: ONNX opset (default 18).
        dense: export the backbone without pruning (for side-by-side comparison).
        class_names: stored in the metadata; default ImageNet's for a 1000-class model.
        preprocessing: how images are prepared (see `preprocessing_config`); default the model's own.
        overwrite: replace an existing file.
        verify: run the file in ONNX Runtime and compare with PyTorch before writing it.
        verify_batch_sizes: two (or more) batch sizes to verify at, proving the batch axis is dynamic.
        atol: largest allowed absolute logit difference (1e-4 suits fp32).
        exporter: "dynamo" (torch.export + onnxscript) or "torchscript" (the tracing exporter).
        extra_metadata: more JSON-serializable settings to store.

    Raises:
        ConfigError: the model is in training mode, a setting is unsupported, or the file exists.
        ExportError: the export failed or ONNX Runtime disagrees with PyTorch (nothing is written).
    """
    path = Path(path)
    for module in ("onnx", "onnxscript", "onnxruntime") if exporter == "dynamo" else ("onnx", "onnxruntime"):
        require(module, "ONNX export")
    graph_model = _model_to_export(model, keep_ratio, dense)
    opset = _check_opset(opset, exporter)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; choose another output path or pass overwrite=True (--overwrite)")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a file name such as {path / 'model.onnx'}")
    if len(set(verify_batch_sizes)) < 2 and verify:
        raise ConfigError(f"verify_batch_sizes needs two different batch sizes to check the batch axis, got {verify_batch_sizes}")
    names = default_class_names(graph_model) if class_names is None else list(class_names)
    num_classes = num_classes_of(graph_model)
    if names is not None and len(names) != num_classes:
        raise ConfigError(f"{len(names)} class names given for a model with {num_classes} classes")
    metadata = graph_metadata(
        graph_model, class_names=names, preprocessing=preprocessing,
        extra={"exporter": exporter, "opset": opset, **(extra_metadata or {})},
    )
    outputs = [LOGITS_NAME]
    if isinstance(graph_model, SparseModel):
        outputs += [KEPT_NAME.format(s + 1) for s in range(len(graph_model.prune_locs))]

    verification = None

    def write(tmp: str) -> None:
        nonlocal verification
        with _companions_removed(tmp):
            _export(graph_model, tmp, opset, exporter, outputs)
            _write_metadata(tmp, metadata)  # one self-contained file: the weights are stored inside
        if verify:
            verification = verify_onnx(graph_model, tmp, verify_batch_sizes, atol)
            if not verification.passed:
                raise ExportError(
                    f"the exported graph disagrees with PyTorch, so {path} was not written: {verification.summary()}. "
                    "Try the other exporter (exporter='torchscript' / --exporter torchscript) or another opset, "
                    "and report the model settings if it persists"
                )

    atomic_write(path, write)  # verified before it is moved into place: a failed check leaves nothing
    return ExportResult(path, json.loads(metadata[METADATA_KEY]), verification, opset, exporter, outputs)


def _model_to_export(model: nn.Module, keep_ratio: Optional[float], dense: bool) -> nn.Module:
    """Check the model and return what to export (the backbone for `dense`, a twin at `keep_ratio`)."""
    check_inference_ready(model, "export")
    if keep_ratio is not None and not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f"keep_ratio must be in (0, 1] (the fraction of tokens each stage keeps), got {keep_ratio}")
    if dense and keep_ratio is not None and keep_ratio < 1.0:
        raise ConfigError(f"dense=True exports every token; it cannot be combined with keep_ratio={keep_ratio}")
    if dense or (keep_ratio is not None and keep_ratio >= 1.0):
        return backbone_of(model)
    if not isinstance(model, SparseModel):
        if keep_ratio is not None:
            raise ConfigError(
                f"{type(model).__name__} is a dense model without trained prediction modules, so it cannot be "
                f"exported at keep_ratio={keep_ratio}; export a DynamicViT, or export it dense (dense=True / --dense)"
            )
        _check_backbone_export(model)
        return model
    _check_backbone_export(model.backbone)
    if model.budget != "fixed":
        raise ConfigError(
            "ONNX export of the per-image budget is not supported: each image keeps its own number of tokens, so the "
            "packed batch's shapes depend on the data and one ONNX graph cannot hold them; export the fixed budget "
            "(model.at_keep_ratio(rho, budget='fixed'), `dynamicvit export --budget fixed`), whose MACs the calibration "
            "matches on average, or serve the per-image model with PyTorch (dynamicvit.compile)"
        )
    return model if keep_ratio is None or keep_ratio == model.keep_ratio else model.at_keep_ratio(keep_ratio).eval()


def check_inference_ready(model: nn.Module, what: str) -> None:
    """Refuse a model in training mode: its forward is the masked training path, not the inference path."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module to {what}, got {type(model).__name__}")
    if model.training:
        raise ConfigError(
            f"the model is in training mode, where a DynamicViT computes every token and masks them (the training "
            f"path); call model.eval() before you {what} it, to get the inference path with tokens removed"
        )


def _check_backbone_export(backbone: nn.Module) -> None:
    params = list(backbone.parameters())
    if any(p.dtype != torch.float32 for p in params):
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
        raise ConfigError(
            f"the model's weights are {', '.join(dtypes)}; export works from fp32 weights (call model.float()); "
            "use quantize_int8 on the exported file for a smaller, faster model"
        )
    if any(p.device.type != "cpu" for p in params):
        raise ConfigError("the model is on a GPU; move it to the CPU (model.cpu()) before exporting")


def _check_opset(opset: Optional[int], exporter: str) -> int:
    if exporter not in MIN_OPSET:
        raise ConfigError(f"unknown exporter {exporter!r}; choose 'dynamo' or 'torchscript'")
    opset = DEFAULT_OPSET if opset is None else opset
    lo, hi = MIN_OPSET[exporter], MAX_OPSET[exporter]
    if not isinstance(opset, int) or not lo <= opset <= hi:
        raise ConfigError(f"opset {opset} is not supported by the {exporter} exporter; use an opset in {lo}..{hi} (default {DEFAULT_OPSET})")
    return opset


def _export(model: nn.Module, path: str, opset: int, exporter: str, outputs: list[str]) -> None:
    graph = _InferenceGraph(model).eval()
    C, H, W = default_input_size(model)
    example = torch.randn(2, C, H, W)  # batch 2: an example of 1 would let the exporter fix the batch at 1
    kwargs = dict(input_names=[INPUT_NAME], output_names=outputs, opset_version=opset, dynamo=exporter == "dynamo")
    if exporter == "dynamo":
        kwargs.update(dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=65536)}}, verbose=False)
        if "external_data" in inspect.signature(torch.onnx.export).parameters:
            kwargs["external_data"] = False  # the weights inside the graph file, not in a `<file>.data` beside it
    else:
        kwargs.update(dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]})
    try:
        # The exporters print progress and warn about tracing; the command line reports the outcome.
        with _quiet(), torch.no_grad(), _explicit_attention(graph, opset):
            torch.onnx.export(graph, (example,), path, **kwargs)
    except Exception as e:  # noqa: BLE001 - exporters raise many types; the message says which step failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(
            f"torch.onnx.export ({exporter} exporter, opset {opset}) failed: {type(e).__name__}: {first}; "
            f"try exporter={'torchscript' if exporter == 'dynamo' else 'dynamo'!r} (--exporter)"
        ) from e


@contextlib.contextmanager
def _explicit_attention(model: nn.Module, opset: int):
    """Below opset 23, export attention as its products (scale, Q K^T, softmax, @ V), not as
    F.scaled_dot_product_attention.

    The exporters write that function, at these opsets, with shape arithmetic that runs at every call
    (Shape, three Slices, two Concats and two Reshapes per block, to transpose the keys); its products
    need one Transpose, and ONNX Runtime folds the scale into the first product. timm's attention
    modules compute either form (their `fused_attn` switch, restored afterwards); the verification
    compares the graph with the model as it runs in PyTorch. From opset 23 the function is one
    Attention node, so it is left alone.
    """
    modules = []
    if opset < ONNX_ATTENTION_OPSET:
        modules = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
    for m in modules:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in modules:
            m.fused_attn = True


def _write_metadata(path: str, metadata: dict[str, str]) -> None:
    onnx = require("onnx", "ONNX export")

    proto = onnx.load(path)
    for key, value in metadata.items():
        entry = next((p for p in proto.metadata_props if p.key == key), None) or proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "dynamicvit"
    onnx.save(proto, path)


def verify_onnx(
    model: nn.Module, path: PathLike, batch_sizes: Sequence[int] = VERIFY_BATCH_SIZES, atol: float = FP32_ATOL,
    seed: int = 0,
) -> Verification:
    """Run `path` in ONNX Runtime (CPU) and `model` in PyTorch on the same random images and compare.

    Kept tokens are compared too: an image on which the runtimes keep different tokens must have a tie
    (two scores within `SCORE_TIE`) at that stage, otherwise the export is wrong and it counts as a
    mismatch (its logits are compared and will differ).
    """
    session = OnnxModel(path, threads=None)
    gen = torch.Generator().manual_seed(seed)
    shape = default_input_size(model)
    diffs, agree, same_kept, tied, total = [], 0, 0, 0, 0
    for bs in batch_sizes:
        x = torch.randn(bs, *shape, generator=gen)
        got = session.run(x)
        with torch.no_grad():
            if isinstance(model, SparseModel):
                out = model.forward_pruned(x)
                ref_logits, ref_kept = out.logits, out.kept_indices
                margins = stage_margins(model, x)  # (B, S)
            else:
                ref_logits, ref_kept, margins = logits_of(model(x)), [], None
        logits = got[LOGITS_NAME]
        same = torch.ones(bs, dtype=torch.bool)
        tie = torch.zeros(bs, dtype=torch.bool)
        for s, ref in enumerate(ref_kept):
            this = (got[KEPT_NAME.format(s + 1)].sort(1).values == ref.sort(1).values).all(1)
            tie |= ~this & same & (margins[:, s] < SCORE_TIE)  # the first stage where they part is a tie
            same &= this
        total += bs
        agree += int((logits.argmax(1) == ref_logits.argmax(1)).sum())
        same_kept += int(same.sum())
        tied += int(tie.sum())
        if (~tie).any():
            diffs.append(float((logits[~tie] - ref_logits[~tie]).abs().max()))
    return Verification(
        batch_sizes=list(batch_sizes),
        max_abs_diff=max(diffs) if diffs else math.nan,
        top1_agreement=agree / total,
        images=total,
        compared=total - tied,
        tied=tied,
        kept_agreement=same_kept / total,
        atol=atol,
    )


@torch.no_grad()
def stage_margins(model: SparseModel, x: torch.Tensor) -> torch.Tensor:
    """Per image and stage, the gap between the last kept and the first dropped patch score, (B, S).

    A small gap means the kept set is decided by rounding. Scores are the keep log-probabilities of the
    patches still present at that stage.
    """
    scores = model.forward_pruned(x, return_scores=True).keep_scores
    gaps = []
    for s, k in enumerate(model.keep_counts()):
        present = torch.nan_to_num(scores[s].float(), nan=-math.inf)
        top = present.topk(min(k + 1, present.shape[1]), dim=1).values
        gap = top[:, k - 1] - top[:, k] if top.shape[1] > k else torch.full_like(top[:, 0], math.inf)
        gaps.append(torch.nan_to_num(gap, nan=math.inf))  # -inf - -inf: nothing left to drop
    return torch.stack(gaps, dim=1)


# -- ONNX Runtime -------------------------------------------------------------------------------


def session_options(threads: Optional[int] = None, spinning: bool = True):
    """The ONNX Runtime session options `OnnxModel` runs with (benchmarks profile with the same ones).

    Args:
        threads: intra-op threads; None: torch's current setting.
        spinning: let ONNX Runtime's worker threads spin, waiting for work, after each run (its default:
            the next run starts sooner). Benchmarks that time other models in between turn it off: the
            spinning threads of one session take the cores from whatever runs next.
    """
    ort = require("onnxruntime", "running an ONNX file")

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OnnxModel(nn.Module):
    """An ONNX Runtime session as a callable model: images (torch, (B, C, H, W)) -> logits (torch).

    An `nn.Module` without parameters, so that code written for models (timing, evaluation) takes it.

    Args:
        path: an .onnx file (from `export_onnx`, or any graph with one image input).
        threads: ONNX Runtime intra-op threads; None: torch's current setting.
        providers: ONNX Runtime execution providers; default the CPU.
        spinning: see `session_options`.
    """

    def __init__(self, path: PathLike, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                 spinning: bool = True):
        super().__init__()
        ort = require("onnxruntime", "running an ONNX file")

        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads, spinning),
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ConfigError(f"ONNX Runtime cannot load {self.path}: {str(e).strip().splitlines()[0]}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def class_names(self) -> Optional[list[str]]:
        return self.metadata.get("class_names")

    @property
    def input_size(self) -> Optional[tuple[int, ...]]:
        size = self.metadata.get("input_size")
        if size is None:
            shape = self.session.get_inputs()[0].shape[1:]
            size = shape if all(isinstance(d, int) for d in shape) else None
        return tuple(size) if size else None

    def run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output of the graph by name, as CPU torch tensors."""
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        outs = self.session.run(None, {self.input_name: x})
        return {name: torch.from_numpy(np.asarray(o)) for name, o in zip(self.output_names, outs)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([self.output_names[0]], {self.input_name: x})
        return torch.from_numpy(logits).to(images.device)

    def extra_repr(self) -> str:
        return str(self.path)


def quantize_int8(path: PathLike, output: PathLike, *, overwrite: bool = False) -> Path:
    """ONNX Runtime dynamic int8 quantization of the linear layers (weights int8, activations per batch).

    Only matrix products with a weight (a graph initializer) are quantized: the attention products of
    two activations stay fp32. Metadata is carried over with `"quantization": "int8-dynamic"` added.
    """
    onnx = require("onnx", "int8 quantization")
    quantization = require("onnxruntime.quantization", "int8 quantization")
    QuantType, quantize_dynamic = quantization.QuantType, quantization.quantize_dynamic

    path, output = Path(path), Path(output)
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} already exists; choose another path or pass overwrite=True (--overwrite)")
    if output.resolve() == path.resolve():
        raise ConfigError(f"the int8 model would replace its source {path}; give another output path")
    read_metadata(path)  # refuse damaged metadata before carrying it over
    proto = onnx.load(str(path))
    weights = {t.name for t in proto.graph.initializer}
    linear = [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    if not linear:
        raise ConfigError(f"{path} has no linear layers with constant weights to quantize")

    meta = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY in meta:
        settings = json.loads(meta[METADATA_KEY])
        settings["quantization"] = "int8-dynamic"
        meta[METADATA_KEY] = json.dumps(settings)

    def write(tmp: str) -> None:
        with _companions_removed(tmp):
            with _quiet():
                quantize_dynamic(str(path), tmp, weight_type=QuantType.QInt8, nodes_to_quantize=linear,
                                 op_types_to_quantize=["MatMul", "Gemm"])
            _write_metadata(tmp, meta)

    atomic_write(output, write)
    return output


# -- torch.compile ------------------------------------------------------------------------------


def compile(
    model: nn.Module,
    mode: str = "default",
    dynamic: bool = True,
    *,
    backend: str = "inductor",
    fullgraph: bool = False,
) -> nn.Module:
    """`torch.compile` the inference path, with a dynamic batch dimension.

    The inference path compiles to one graph (no graph breaks: `torch._dynamo.explain` finds none, a
    test checks it). Because every stage keeps a fixed number of tokens, every shape except the batch
    is static, so `mode="reduce-overhead"` captures the whole pruned model, top-k and gather included,
    as one CUDA graph on a GPU: batch-1 latency is then one graph launch instead of hundreds of kernel
    launches. On the CPU that mode behaves like "default". Under the per-image budget the token counts
    depend on the images: the bookkeeping between stages runs eagerly and each stage's blocks compile
    once with dynamic shapes (several graphs, so `fullgraph=True` is refused by torch there).

    Args:
        model: a sparse model or a dense timm model, in eval mode.
        mode: torch.compile mode: "default", "reduce-overhead" (CUDA graphs), "max-autotune", ...
        dynamic: compile with a symbolic batch size, so other batch sizes reuse the code (PyTorch
            still compiles batch size 1 separately: it specializes sizes 0 and 1).
        backend: torch.compile backend.
        fullgraph: raise instead of breaking the graph (our code needs no breaks).

    Returns:
        The compiled module; it shares the weights and settings of `model` (call `set_keep_ratio` on
        `model` and the next call recompiles for the new token counts).
    """
    check_inference_ready(model, "compile")
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=dynamic,
                         backend=backend, fullgraph=fullgraph)


# -- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _companions_removed(tmp: str):
    """Remove the files a writer puts beside the temporary file `tmp` (an exporter's or the quantizer's
    `<tmp>.data` external weights, ...) once the block ends, whether it succeeded or failed. Only names
    that start with `tmp`'s own (unique) name: another process's temporaries in the folder stay."""
    tmp_path = Path(tmp)
    try:
        yield
    finally:
        for other in tmp_path.parent.glob(glob_escape(tmp_path.name) + "?*"):
            with contextlib.suppress(OSError):
                other.unlink()


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' and the quantizer's progress prints, warnings and root-logger advice;
    the caller reports the outcome."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


__all__ = [
    "ExportError",
    "ExportResult",
    "OnnxModel",
    "Verification",
    "check_inference_ready",
    "compile",
    "export_onnx",
    "quantize_int8",
    "read_metadata",
    "verify_onnx",
]
