"""Multiply-accumulates (MACs) and parameters of one image, per stage and in total.

The DynamicViT paper reports "GFLOPs" that are MACs of one image: every matrix product, including
both attention products (Q K^T and attn V), the patch embedding, the classifier head and the
prediction modules. `count_macs` runs the model once on a dummy image under a dispatch mode that
sees every aten operator, so it counts

- linear layers and plain matrix products (`linear`, `mm`, `addmm`, `bmm`, `matmul`, ...): out * K;
- convolutions: out * (C_in / groups) * kernel (transposed: in * (C_out / groups) * kernel);
- fused attention (`scaled_dot_product_attention` and every backend kernel it can dispatch to,
  the CPU one included): B * H * L * S * (E + E_v), i.e. both attention products;
- scatter-adds (`scatter_add`, `scatter_reduce` with "sum"): one per source element. A scatter-add
  is a sparse matrix product, one nonzero per source row: the size-weighted sums with which merging
  adds dropped tokens into kept ones (`ops.scatter_merge`). `index_add` is not counted: the
  library uses it for residual additions (`DynamicSpatial`), which are no product.

Element-wise work (LayerNorm, GELU, softmax, additions) is not part of the MACs. Because the model
really runs, a DynamicViT is counted on its inference path with its shrinking sequence, so the
prediction modules and the removed tokens are accounted for without a separate formula.

Normalization layers are also tallied apart (`MacsReport.norm_ops`) with fvcore's convention,
5 operations per element of a normalized tensor (4 without affine weights). The paper's table
(DeiT-S: 4.6 / 4.0 / 3.4 / 2.9 G at rho = 1 / 0.9 / 0.8 / 0.7) is reproduced by truncating
MACs + norm_ops to one decimal; MACs alone give 4.599 G for the dense DeiT-S (truncated: 4.5).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..core.base import SparseModel, backbone_of
from ..core.hosts import Host, any_host, host_for, is_spatial, spatial_host_for
from ..core.spatial import DynamicSpatial
from ..core.vit import DynamicViT
from ..errors import ConfigError, DynamicViTError, UnsupportedModelError

_logger = logging.getLogger(__name__)

aten = torch.ops.aten

# -- MAC formulas per aten operator -----------------------------------------------------------------

MacFormula = Callable[[tuple, dict, Any], int]


def _contract(k_arg: int) -> MacFormula:
    """A product whose output elements each sum over the last dim of argument `k_arg`."""

    def macs(args: tuple, kwargs: dict, out: Any) -> int:
        return out.numel() * args[k_arg].shape[-1]

    return macs


def _dot(args: tuple, kwargs: dict, out: Any) -> int:
    return args[0].numel()


def _addbmm(args: tuple, kwargs: dict, out: Any) -> int:
    b1, b2 = args[1], args[2]  # (b, n, k) @ (b, k, m), summed over b
    return b1.numel() * b2.shape[-1]


def _conv(transposed_arg: Optional[int]) -> MacFormula:
    """Convolution; `transposed_arg` is the position of the `transposed` flag (None: never)."""

    def macs(args: tuple, kwargs: dict, out: Any) -> int:
        x, weight = args[0], args[1]
        transposed = bool(args[transposed_arg]) if transposed_arg is not None and len(args) > transposed_arg else False
        per_element = math.prod(weight.shape[1:])  # (C_in / groups) * kernel, or (C_out / groups) * kernel
        return (x.numel() if transposed else out.numel()) * per_element

    return macs


def _conv_transpose(args: tuple, kwargs: dict, out: Any) -> int:
    return args[0].numel() * math.prod(args[1].shape[1:])


def _attention(args: tuple, kwargs: dict, out: Any) -> int:
    q, k, v = args[0], args[1], args[2]  # (..., L, E), (..., S, E), (..., S, Ev)
    return math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _scatter_add(args: tuple, kwargs: dict, out: Any) -> int:
    return args[3].numel()  # scatter_add(self, dim, index, src): one multiply-accumulate per source element


def _scatter_reduce(args: tuple, kwargs: dict, out: Any) -> int:
    reduce = args[4] if len(args) > 4 else kwargs.get("reduce")
    return args[3].numel() if reduce == "sum" else 0


def _norm(weight_arg: int) -> MacFormula:
    """fvcore's count for a normalization layer: 5 per element with affine weights, else 4."""

    def ops(args: tuple, kwargs: dict, out: Any) -> int:
        weight = args[weight_arg] if len(args) > weight_arg else kwargs.get("weight")
        return args[0].numel() * (5 if weight is not None else 4)

    return ops


def _packets(*names: str) -> list:
    """The aten operator packets that exist in this torch version."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


# kind -> {operator packet: formula}. Composite operators (linear, conv2d, sdpa) are listed next to
# the kernels they dispatch to: whichever the dispatcher shows us first is counted, and the mode is
# off while it runs, so nothing is counted twice.
_MATRIX_RULES: dict[str, dict[Any, MacFormula]] = {
    "linear": {p: _contract(0) for p in _packets("linear")},
    "matmul": {
        **{p: _contract(0) for p in _packets("mm", "bmm", "matmul", "mv")},
        **{p: _contract(1) for p in _packets("addmm", "_addmm_activation", "baddbmm", "addmv")},
        **{p: _dot for p in _packets("dot", "vdot")},
        **{p: _addbmm for p in _packets("addbmm")},
    },
    "conv": {
        **{p: _conv(6) for p in _packets("convolution", "_convolution")},
        **{p: _conv(None) for p in _packets("conv1d", "conv2d", "conv3d", "cudnn_convolution", "mkldnn_convolution")},
        **{p: _conv_transpose for p in _packets("conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "cudnn_convolution_transpose")},
    },
    "attention": {
        p: _attention
        for p in _packets(
            "scaled_dot_product_attention",
            "_scaled_dot_product_attention_math",
            "_scaled_dot_product_attention_math_for_mps",
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_fused_attention_overrideable",
        )
    },
    "scatter": {
        **{p: _scatter_add for p in _packets("scatter_add", "scatter_add_")},
        **{p: _scatter_reduce for p in _packets("scatter_reduce", "scatter_reduce_")},
    },
}
_RULES = {packet: (kind, f) for kind, rules in _MATRIX_RULES.items() for packet, f in rules.items()}
_NORM_RULES: dict[Any, MacFormula] = {
    **{p: _norm(2) for p in _packets("layer_norm", "native_layer_norm", "group_norm")},
    **{p: _norm(1) for p in _packets("native_group_norm", "batch_norm", "instance_norm", "native_batch_norm",
                                     "_native_batch_norm_legit_no_training")},
}
# Operators with these words in their name that we do not know how to count are reported.
_MATRIX_WORDS = ("mm", "matmul", "conv", "attention", "linear", "einsum", "dot")


class _MacCounter(TorchDispatchMode):
    """Adds the MACs of every matrix product it sees to `macs[label(args)]` and `by_kind[kind]`,
    and counts the operators called (`operators`, by name; those inside a decomposition it runs
    itself are not counted again)."""

    def __init__(self, label: Callable[[tuple], Any]):
        super().__init__()
        self.label = label
        self.macs: dict[Any, int] = {}
        self.norm_ops: dict[Any, int] = {}
        self.by_kind: dict[str, int] = {kind: 0 for kind in _MATRIX_RULES}
        self.uncounted: set[str] = set()
        self.operators: Counter[str] = Counter()
        self._decomposing = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._decomposing:
            self.operators[str(func)] += 1
        packet = func.overloadpacket
        rule = _RULES.get(packet)
        norm = _NORM_RULES.get(packet)
        if rule is None and norm is None:
            # A composite operator we have no formula for (einsum, tensordot, ...) may break down into
            # ones we have; run its decomposition with the mode on so they are seen.
            self._decomposing += 1
            try:
                with self:
                    out = func.decompose(*args, **kwargs)
            finally:
                self._decomposing -= 1
            if out is not NotImplemented:
                return out
            if any(word in packet.__name__ for word in _MATRIX_WORDS):
                self.uncounted.add(str(packet))
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        label = self.label(args)
        if rule is not None:
            kind, formula = rule
            n = int(formula(args, kwargs, out))
            self.macs[label] = self.macs.get(label, 0) + n
            self.by_kind[kind] += n
        else:
            self.norm_ops[label] = self.norm_ops.get(label, 0) + int(norm(args, kwargs, out))
        return out


# -- the report ----------------------------------------------------------------------------------


def truncate(value: float, decimals: int = 1) -> float:
    """Cut (not round) to `decimals` places, as the paper reports GFLOPs: 2.98 -> 2.9."""
    return float(Decimal(repr(value)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_DOWN))


@dataclass
class MacsReport:
    """MACs and parameters of one image.

    Attributes:
        total: multiply-accumulates of all matrix products for one image.
        params: parameters of the model (prediction modules included).
        predictor_macs: the part of `total` spent in the prediction modules.
        stages: per stage, dicts with `name`, `blocks` (block indices), `tokens` (sequence length the
            blocks see, prefix tokens included; patch tokens for `embed`), `macs`, `predictor_macs`,
            `norm_ops` and `params`. Stages are `embed`, `stage0` (blocks before the first
            prediction module), `stage1`... (a prediction module and the blocks after it), `head`.
            Their `macs` and `params` add up to `total` and `params`.
        input_size: (C, H, W) of the image counted.
        by_kind: `total` split by operator kind: linear, matmul, conv, attention (fused attention),
            scatter (the size-weighted sums of merged tokens).
        norm_ops: normalization-layer operations in fvcore's convention (not part of `total`).
        uncounted: matrix-like operators the counter met but has no formula for (should be empty).
        keep_ratio: the DynamicViT's keep ratio, None for a dense model.
        keep_counts: patch tokens kept after each stage, empty for a dense model.
    """

    total: int
    params: int
    predictor_macs: int
    stages: list[dict]
    input_size: tuple[int, int, int]
    by_kind: dict[str, int] = field(default_factory=dict)
    norm_ops: int = 0
    uncounted: list[str] = field(default_factory=list)
    keep_ratio: Optional[float] = None
    keep_counts: tuple[int, ...] = ()

    @property
    def gmacs(self) -> float:
        """`total` in units of 1e9."""
        return self.total / 1e9

    @property
    def gmacs_with_norms(self) -> float:
        """MACs plus normalization operations (fvcore's convention), in units of 1e9."""
        return (self.total + self.norm_ops) / 1e9

    def to_dict(self) -> dict:
        """A JSON-ready summary."""
        return {
            "gmacs": self.gmacs,
            "macs": self.total,
            "params": self.params,
            "mparams": self.params / 1e6,
            "predictor_gmacs": self.predictor_macs / 1e9,
            "gmacs_truncated": truncate(self.gmacs, 1),
            "gmacs_with_norms": self.gmacs_with_norms,
            "gmacs_paper_style": truncate(self.gmacs_with_norms, 1),
            "input_size": list(self.input_size),
            "keep_ratio": self.keep_ratio,
            "keep_counts": list(self.keep_counts),
            "by_kind_gmacs": {k: v / 1e9 for k, v in self.by_kind.items()},
            "stages": [dict(s) for s in self.stages],
            "uncounted": list(self.uncounted),
        }

    def format_table(self) -> str:
        """The per-stage breakdown as aligned text."""
        head = f"{'stage':<8} {'blocks':>7} {'tokens':>7} {'GMACs':>9} {'of which predictor':>19} {'params (M)':>11}"
        lines = [head, "-" * len(head)]
        for s in self.stages:
            blocks = s["blocks"]
            span = "-" if not blocks else (f"{blocks[0]}" if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}")
            tokens = "-" if s["tokens"] is None else str(s["tokens"])
            pred = f"{s['predictor_macs'] / 1e9:.4f}" if s["predictor_macs"] else "-"
            lines.append(
                f"{s['name']:<8} {span:>7} {tokens:>7} {s['macs'] / 1e9:>9.4f} {pred:>19} {s['params'] / 1e6:>11.3f}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<8} {'':>7} {'':>7} {self.gmacs:>9.4f} {self.predictor_macs / 1e9 or 0:>19.4f} "
            f"{self.params / 1e6:>11.3f}"
        )
        kinds = ", ".join(f"{k} {v / 1e9:.4f}" for k, v in self.by_kind.items() if v)
        lines.append(f"GMACs by kind: {kinds}")
        lines.append(
            f"paper style (MACs + LayerNorm ops as fvcore counts them, cut to one decimal): "
            f"{truncate(self.gmacs_with_norms, 1):.1f} G (MACs alone cut: {truncate(self.gmacs, 1):.1f} G)"
        )
        if self.uncounted:
            lines.append(f"WARNING: not counted (no formula): {', '.join(self.uncounted)}")
        return "\n".join(lines)


# -- counting ------------------------------------------------------------------------------------


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for, from its patch embedding or its pretrained config."""
    model = _unwrap(model)
    backbone = backbone_of(model)
    try:
        host = any_host(backbone)
        return (int(host.in_chans), int(host.img_size[0]), int(host.img_size[1]))
    except UnsupportedModelError:
        pass  # not a DynamicViT host family (any timm model can be counted dense)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(int(v) for v in cfg["input_size"])
    raise ConfigError(
        f"cannot tell the input size of {type(backbone).__name__}; pass input_size=(C, H, W) to count_macs"
    )


def count_macs(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> MacsReport:
    """Count the MACs of one image through `model`, per stage and in total.

    A DynamicViT is counted on its inference path at its current keep ratio (the tokens really are
    removed, and the prediction modules run); a timm ViT as it is. The model runs once in eval mode
    under `torch.inference_mode` on a batch of one image, with its weights swapped for meta tensors
    (shapes only, no arithmetic; the model itself is not changed). Should an operator lack a meta
    kernel, the image runs for real on the model's device instead. The training flag is restored.

    Args:
        model: a DynamicViT, a timm VisionTransformer, or any module taking (B, C, H, W) images.
        input_size: (C, H, W); default: the size the model was built for.

    Returns:
        A `MacsReport`.
    """
    model = _unwrap(model)
    if getattr(model, "budget", "fixed") != "fixed":
        raise ConfigError(
            "under the per-image budget the MACs depend on each image's kept counts: count them over images with "
            "dynamicvit.runtime.image_macs.PerImageMacs (`dynamicvit flops --budget per-image --dataset DATA`), "
            "or count the fixed budget (model.at_keep_ratio(rho, budget='fixed')), whose MACs calibration matches on average"
        )
    size = tuple(int(v) for v in (input_size or default_input_size(model)))
    if len(size) != 3:
        raise ConfigError(f"input_size must be (C, H, W), got {tuple(input_size)}")
    _check_image_size(model, size)
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    layout = _Layout.of(model)
    was_training = model.training
    model.eval()
    try:
        try:
            # Shapes are all the count needs: run on meta tensors (no arithmetic, no copy of the weights).
            counter, tracker = _run(model, layout, size, dtype, meta=True)
        except DynamicViTError:
            raise
        except Exception as e:  # noqa: BLE001 - an operator without a meta kernel: run it for real
            _logger.debug("count_macs: meta run failed (%s: %s); running on the model's device", type(e).__name__, e)
            counter, tracker = _run(model, layout, size, dtype, meta=False)
    finally:
        model.train(was_training)
    report = layout.report(counter, tracker, size)
    if report.uncounted:
        _logger.warning("count_macs: no formula for %s; those products are missing from the count", report.uncounted)
    return report


def count_operators(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Counter[str]:
    """The aten operators one forward of one image calls, by name (a CPU-side proxy for GPU kernel
    launches, which is what batch-1 latency pays for).

    The model runs for real, in eval mode under `torch.inference_mode`, on a random image on its
    device: once untimed (so caches such as the prediction modules' derived weights are built, as in
    any served model), then once under the counter. The counts are structural: they depend on the
    architecture, the keep ratio and the image size, not on the weights or the width. The training
    flag is restored.

    Args:
        model: a DynamicViT, a timm VisionTransformer, or any module taking (B, C, H, W) images.
        input_size: (C, H, W); default: the size the model was built for.
    """
    model = _unwrap(model)
    size = tuple(int(v) for v in (input_size or default_input_size(model)))
    _check_image_size(model, size)
    param = next(iter(model.parameters()), None)
    x = torch.randn(1, *size, device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
    counter = _MacCounter(lambda args: None)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(x)
            with counter:
                model(x)
    finally:
        model.train(was_training)
    return counter.operators


def _check_image_size(model: nn.Module, size: tuple) -> None:
    backbone = backbone_of(model)
    embed = getattr(backbone, "patch_embed", None)
    built = getattr(embed, "img_size", None)
    fixed = getattr(embed, "strict_img_size", False) and not getattr(embed, "dynamic_img_size", False)
    if built is not None and fixed and tuple(size[1:]) != tuple(built):
        raise ConfigError(
            f"the model was built for {built[0]}x{built[1]} images, not {size[1]}x{size[2]}; build it with "
            f"img_size={size[1] if size[1] == size[2] else tuple(size[1:])} (--img-size) to count that size"
        )


def _run(model: nn.Module, layout: "_Layout", size: tuple, dtype: torch.dtype, meta: bool):
    """One forward of a batch of one image under the counter; returns (counter, tracker)."""
    owners = layout.owners()
    if meta:
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        state = {name: torch.empty_like(t, device="meta") for name, t in named}
        owners = {id(state[name]): owners[id(t)] for name, t in named if id(t) in owners}
        x = torch.empty(1, *size, device="meta", dtype=dtype)
    tracker = _StageTracker(layout, owners)
    counter = _MacCounter(tracker.label)
    if meta:
        with tracker, torch.inference_mode(), counter:
            torch.func.functional_call(model, state, (x,))
    else:
        param = next(iter(model.parameters()), None)
        x = torch.randn(1, *size, device=param.device if param is not None else "cpu", dtype=dtype)
        with tracker, torch.inference_mode(), counter:
            model(x)
    return counter, tracker


def _unwrap(model: nn.Module) -> nn.Module:
    """The original module of a `torch.compile`d one."""
    return getattr(model, "_orig_mod", model)


@dataclass
class _Layout:
    """Where the stages of a ViT-like model are.

    Hierarchical models (ConvNeXt, Swin; dense or DynamicSpatial) are counted per stage of the
    backbone instead: `blocks` then holds the four stage modules, and the predictors and fast paths
    belong to the sparsified stage `sparse_stage`.
    """

    model: nn.Module
    backbone: nn.Module
    blocks: list
    predictors: list
    prune_locs: tuple
    sparse_stage: Optional[int] = None
    new_modules: tuple = ()  # DynamicSpatial's fast paths (their MACs run inside the sparsified stage)
    host: Optional[Host] = None  # token families: where the patch embedding and the heads are

    @classmethod
    def of(cls, model: nn.Module) -> "_Layout":
        if isinstance(model, DynamicViT):
            host = model.host
            return cls(model, model.backbone, list(host.blocks), list(model.predictors), tuple(model.prune_locs), host=host)
        if is_spatial(model):
            host = spatial_host_for(model)
            sparse = isinstance(model, DynamicSpatial)
            return cls(
                model, host.model, list(host.stages), list(model.predictors) if sparse else [], (),
                host.sparse_stage, (model.fast_paths,) if sparse else (),
            )
        try:
            host = host_for(model)
        except UnsupportedModelError:  # any other model is counted whole (blocks only where it names them)
            blocks = getattr(model, "blocks", None)
            blocks = list(blocks) if isinstance(blocks, (nn.Sequential, nn.ModuleList)) else []
            return cls(model, model, blocks, [], ())
        return cls(model, model, list(host.blocks), [], (), host=host)

    @property
    def patch_embed(self) -> Optional[nn.Module]:
        embed = self.host.patch_embed if self.host is not None else getattr(self.backbone, "patch_embed", None)
        return embed if isinstance(embed, nn.Module) else None

    def owners(self) -> dict[int, Any]:
        """id(parameter) -> stage label, for the blocks, prediction modules, patch embedding and head."""
        groups = [(("block", i), [b]) for i, b in enumerate(self.blocks)]
        groups += [(("predictor", s), [p]) for s, p in enumerate(self.predictors)]
        embed = self.patch_embed
        groups += [("embed", [embed] if embed is not None else []), ("head", self.head_modules())]
        return {id(t): label for label, mods in groups for m in mods for t in [*m.parameters(), *m.buffers()]}

    def head_modules(self) -> list[nn.Module]:
        if self.host is not None:
            return self.host.head_modules()
        names = ("norm", "fc_norm", "attn_pool", "head", "head_dist", "aux_head")
        return [m for n in names if isinstance(m := getattr(self.backbone, n, None), nn.Module)]

    def report(self, counter: _MacCounter, tracker: "_StageTracker", size: tuple) -> MacsReport:
        macs, norms = counter.macs, counter.norm_ops
        total = sum(macs.values())
        params_total = sum(p.numel() for p in self.model.parameters())
        is_dvit = isinstance(self.model, SparseModel)  # DynamicSpatial: keep ratio and positions on the FFN
        common = dict(
            input_size=size,
            by_kind=dict(counter.by_kind),
            norm_ops=sum(norms.values()),
            uncounted=sorted(counter.uncounted),
            keep_ratio=self.model.keep_ratio if is_dvit else None,
            keep_counts=tuple(self.model.keep_counts()) if is_dvit else (),
        )
        if not self.blocks:
            stage = dict(name="model", blocks=[], tokens=None, macs=total, predictor_macs=0,
                         norm_ops=common["norm_ops"], params=params_total)
            return MacsReport(total=total, params=params_total, predictor_macs=0, stages=[stage], **common)

        def nparams(modules) -> int:
            return sum(p.numel() for m in modules for p in m.parameters())

        # (name, units of `blocks`, block indices shown, predictors, other modules) per stage.
        if self.sparse_stage is None:
            starts = [0, *self.prune_locs]
            ends = [*self.prune_locs, len(self.blocks)]
            plan = [
                (f"stage{s}", range(start, end), list(range(start, end)), [s - 1] if s > 0 else [], [])
                for s, (start, end) in enumerate(zip(starts, ends))
            ]
        else:  # hierarchical: stage i (1-based names) with its own block indices
            plan = [
                (f"stage{i + 1}", [i], list(range(len(stage.blocks))),
                 list(range(len(self.predictors))) if i == self.sparse_stage else [],
                 list(self.new_modules) if i == self.sparse_stage else [])
                for i, stage in enumerate(self.blocks)
            ]
        stages = []
        for name, units, shown, preds, extra in plan:
            keys = [("block", i) for i in units]
            pred = [("predictor", p) for p in preds]
            pred_macs = sum(macs.get(k, 0) for k in pred)
            stages.append(dict(
                name=name,
                blocks=shown,
                # Hierarchical maps have no token sequence (window attention's would mislead).
                tokens=tracker.tokens.get(units[0]) if self.sparse_stage is None else None,
                macs=sum(macs.get(k, 0) for k in keys) + pred_macs,
                predictor_macs=pred_macs,
                norm_ops=sum(norms.get(k, 0) for k in keys + pred),
                params=nparams([self.blocks[i] for i in units] + [self.predictors[p] for p in preds] + extra),
            ))
        head_params = nparams(self.head_modules())
        embed_params = params_total - head_params - sum(s["params"] for s in stages)
        embed = dict(name="embed", blocks=[], tokens=tracker.embed_tokens, macs=macs.get("embed", 0),
                     predictor_macs=0, norm_ops=norms.get("embed", 0), params=embed_params)
        head = dict(name="head", blocks=[], tokens=None, macs=macs.get("head", 0), predictor_macs=0,
                    norm_ops=norms.get("head", 0), params=head_params)
        stages = [embed, *stages, head]
        predictor_macs = sum(s["predictor_macs"] for s in stages)
        return MacsReport(total=total, params=params_total, predictor_macs=predictor_macs, stages=stages, **common)


class _StageTracker:
    """Tells the counter which stage an operator belongs to, and records the tokens each block sees.

    An operator that uses a parameter (or a view of one, e.g. half of a weight matrix) belongs to
    the stage that owns the parameter, wherever it is called from. Others (attention) get the
    label of the running module, from forward hooks: "embed" until the first block, ("block", i)
    inside block i (and between blocks, after it), ("predictor", s) inside prediction module s and
    after it until the next block, "head" after the last block.
    """

    def __init__(self, layout: _Layout, owners: dict[int, Any]):
        self.layout = layout
        self.owners = owners
        self.stack: list = []
        self.default: Any = "embed"
        self.tokens: dict[int, int] = {}
        self.embed_tokens: Optional[int] = None
        self._handles: list = []

    def label(self, args: tuple = ()) -> Any:
        for a in args:
            if isinstance(a, torch.Tensor):
                owner = self.owners.get(id(a if a._base is None else a._base))
                if owner is not None:
                    return owner
        return self.stack[-1] if self.stack else self.default

    def __enter__(self) -> "_StageTracker":
        # Every submodule is hooked, not only the block or predictor itself: the inference path may
        # call parts of them directly (e.g. `PredictionModule.keep_score` instead of its forward).
        last = len(self.layout.blocks) - 1
        for i, blk in enumerate(self.layout.blocks):
            for mod in blk.modules():
                self._hook(mod, ("block", i), after=("head" if i == last else ("block", i)), block=i)
        for s, pred in enumerate(self.layout.predictors):
            for mod in pred.modules():
                # `after`: the inference path's fast scoring (`keep_margin`) calls the module's norm and
                # then works with derived weights outside any module call; it lasts until the next block.
                self._hook(mod, ("predictor", s), after=("predictor", s))
        embed = self.layout.patch_embed
        if embed is not None:
            self._handles.append(embed.register_forward_hook(self._record_embed))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, label: Any, after: Any = None, block: Optional[int] = None) -> None:
        def pre(mod, args):
            self.stack.append(label)
            if block is not None and args and isinstance(args[0], torch.Tensor) and args[0].ndim == 3:
                self.tokens.setdefault(block, int(args[0].shape[1]))

        def post(mod, args, out):
            self.stack.pop()
            if after is not None and not self.stack:
                self.default = after

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def _record_embed(self, mod, args, out) -> None:
        if isinstance(out, torch.Tensor) and out.ndim == 3:
            self.embed_tokens = int(out.shape[1])
        elif isinstance(out, torch.Tensor) and out.ndim == 4 and isinstance(mod, nn.Conv2d):  # a bare convolution: (B, C, H, W)
            self.embed_tokens = int(out.shape[2] * out.shape[3])
        elif isinstance(out, torch.Tensor) and out.ndim == 4:  # (B, H, W, C) when flatten=False
            self.embed_tokens = int(out.shape[1] * out.shape[2])
