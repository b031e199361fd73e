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
DynamicViT, `kept_tokens_<s>` (B, k_s) int64 per stage (kept patches as indices into the row-major grid).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..core.base import backbone_of
from ..core.vit import DynamicViT
from ..data import preprocessing_config, resolve_dataset
from ..errors import ConfigError, DataError, DynamicViTError
from ..extras import require
from ..files import PathLike, atomic_write
from ..version import __version__
from ..weights.formats import model_settings
from .flops import default_input_size

_logger = logging.getLogger(__name__)

Exporter = Literal["dynamo", "torchscript"]

INPUT_NAME = "images"
LOGITS_NAME = "logits"
KEPT_NAME = "kept_tokens_{}"  # one output per stage, 1-based
METADATA_KEY = "dynamicvit"
CLASS_NAMES_KEY = "class_names"
KEEP_RATIO_KEY = "keep_ratio"
DEFAULT_OPSET = 18  # the dynamo exporter's lowest; ONNX Runtime >= 1.14 runs it
MIN_OPSET = {"dynamo": 18, "torchscript": 17}  # 17: the first opset with LayerNormalization
MAX_OPSET = {"dynamo": 23, "torchscript": 20}
ONNX_ATTENTION_OPSET = 23  # the first opset with an Attention operator
VERIFY_BATCH_SIZES = (1, 4)
FP32_ATOL = 1e-4
# Two patch scores (keep log-probabilities) closer than this are a tie: which of them survives top-k is decided by rounding,
# and ONNX Runtime may break the tie the other way than PyTorch (it happens with untrained, nearly
# uniform prediction modules). Such images are reported and left out of the logits comparison.
SCORE_TIE = 1e-4


class ExportError(DynamicViTError):
    """The exported graph does not compute what the PyTorch model computes, or the export failed."""


# -- settings stored with the graph -------------------------------------------------------------


def default_class_names(model: nn.Module) -> Optional[list[str]]:
    """ImageNet class descriptions for a 1000-class model (from timm), else None."""
    if backbone_of(model).num_classes != 1000:
        return None
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def checkpoint_class_names(settings: Optional[dict], num_classes: int) -> Optional[list[str]]:
    """Class names a checkpoint knows: stored ones, or those of the dataset it was trained on."""
    extra = (settings or {}).get("extra") or {}
    names = extra.get("class_names")
    if names is None:
        dataset = (extra.get("train_config") or {}).get("dataset")
        if dataset:
            try:
                names = list(resolve_dataset(dataset).classes) or None
            except DataError:  # an ImageFolder that is not on this machine any more
                names = None
    return list(names) if names and len(names) == num_classes else None


def graph_metadata(model: nn.Module, *, class_names=None, preprocessing=None, extra=None) -> dict[str, str]:
    """The ONNX metadata_props of an exported model: JSON settings, keep ratio, class names."""
    settings = model_settings(model)
    if isinstance(model, DynamicViT):
        settings.update(keep_counts=list(model.keep_counts()), num_patches=model.num_patches,
                        grid_size=list(model.grid_size))
    settings.update(
        input_size=list(default_input_size(model)),
        num_classes=backbone_of(model).num_classes,
        preprocessing=preprocessing or preprocessing_config(model),
        versions={"dynamicvit": __version__, "torch": torch.__version__},
        **(extra or {}),
    )
    meta = {METADATA_KEY: json.dumps(settings), KEEP_RATIO_KEY: str(getattr(model, "keep_ratio", 1.0))}
    if class_names is not None:
        meta[CLASS_NAMES_KEY] = json.dumps(list(class_names))
    return meta


def read_metadata(path: PathLike) -> dict:
    """The settings stored in an ONNX file by `export_onnx` (with `class_names`, None when absent)."""
    onnx = require("onnx", "reading an ONNX file")

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no ONNX file at {path}; export one with `dynamicvit export ... --output {path}`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for a bad file
        raise ConfigError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e})") from None
    props = {p.key: p.value for p in model.metadata_props}
    settings = json.loads(props[METADATA_KEY]) if METADATA_KEY in props else {}
    settings["class_names"] = json.loads(props[CLASS_NAMES_KEY]) if CLASS_NAMES_KEY in props else None
    return settings


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
    """What is exported: images -> (logits, kept tokens of each stage) for a DynamicViT, logits otherwise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        if isinstance(self.model, DynamicViT):
            out = self.model.forward_pruned(images)
            return (out.logits, *out.kept_indices)
        return self.model(images)


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
        model: a DynamicViT (exported with tokens removed) or a dense timm ViT, in eval mode, fp32, on the CPU.
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
    num_classes = backbone_of(graph_model).num_classes
    if names is not None and len(names) != num_classes:
        raise ConfigError(f"{len(names)} class names given for a model with {num_classes} classes")
    metadata = graph_metadata(
        graph_model, class_names=names, preprocessing=preprocessing,
        extra={"exporter": exporter, "opset": opset, **(extra_metadata or {})},
    )
    outputs = [LOGITS_NAME]
    if isinstance(graph_model, DynamicViT):
        outputs += [KEPT_NAME.format(s + 1) for s in range(len(graph_model.prune_locs))]

    verification = None

    def write(tmp: str) -> None:
        nonlocal verification
        _export(graph_model, tmp, opset, exporter, outputs)
        _write_metadata(tmp, metadata)
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
    if not isinstance(model, DynamicViT):
        if keep_ratio is not None:
            raise ConfigError(
                f"{type(model).__name__} is a dense model without trained prediction modules, so it cannot be "
                f"exported at keep_ratio={keep_ratio}; export a DynamicViT, or export it dense (dense=True / --dense)"
            )
        _check_backbone_export(model)
        return model
    _check_backbone_export(model.backbone)
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
            if isinstance(model, DynamicViT):
                out = model.forward_pruned(x)
                ref_logits, ref_kept = out.logits, out.kept_indices
                margins = stage_margins(model, x)  # (B, S)
            else:
                ref_logits, ref_kept, margins = model(x), [], None
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
def stage_margins(model: DynamicViT, x: torch.Tensor) -> torch.Tensor:
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


def session_options(threads: Optional[int] = None):
    """The ONNX Runtime session options `OnnxModel` runs with (benchmarks profile with the same ones).

    Args:
        threads: intra-op threads; None: torch's current setting.
    """
    ort = require("onnxruntime", "running an ONNX file")

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    return opts


class OnnxModel(nn.Module):
    """An ONNX Runtime session as a callable model: images (torch, (B, C, H, W)) -> logits (torch).

    An `nn.Module` without parameters, so that code written for models (timing, evaluation) takes it.

    Args:
        path: an .onnx file (from `export_onnx`, or any graph with one image input).
        threads: ONNX Runtime intra-op threads; None: torch's current setting.
        providers: ONNX Runtime execution providers; default the CPU.
    """

    def __init__(self, path: PathLike, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None):
        super().__init__()
        ort = require("onnxruntime", "running an ONNX file")

        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads),
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
    proto = onnx.load(str(path))
    weights = {t.name for t in proto.graph.initializer}
    linear = [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    if not linear:
        raise ConfigError(f"{path} has no linear layers with constant weights to quantize")

    def write(tmp: str) -> None:
        with _quiet():
            quantize_dynamic(str(path), tmp, weight_type=QuantType.QInt8, nodes_to_quantize=linear,
                             op_types_to_quantize=["MatMul", "Gemm"])
        meta = {p.key: p.value for p in proto.metadata_props}
        if METADATA_KEY in meta:
            settings = json.loads(meta[METADATA_KEY])
            settings["quantization"] = "int8-dynamic"
            meta[METADATA_KEY] = json.dumps(settings)
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
    launches. On the CPU that mode behaves like "default".

    Args:
        model: a DynamicViT or a dense timm model, in eval mode.
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
