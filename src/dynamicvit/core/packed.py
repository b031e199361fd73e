"""The per-image budget at inference, run as one packed sequence.

Under the per-image budget (`SparsityConfig.budget == "per-image"`) stage s keeps, in each image, the
patch tokens whose keep probability reaches the stage's calibrated threshold t_s, at least `min_keep`
of them and never more than the image still has: the count follows the image. From the first stage
on, the batch is one packed sequence x (T, C): the rows of image b are its P prefix tokens, then its
kept patch tokens (best score first), then, with `fuse_dropped` and once it has dropped a token, its
fused token. Layer norms, linear layers and MLPs run on the packed rows without padding; attention
runs per image, by one of `ATTENTION_KERNELS` (chosen per model with `set_packed_attention`):

- "varlen": `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16);
- "flash": FlashAttention's `flash_attn_varlen_func`, when installed (CUDA, fp16/bf16);
- "loop": one scaled_dot_product_attention per image;
- "groups": one batched SDPA per group of images of equal length;
- "blockdiag": one SDPA per chunk of consecutive images (up to `BLOCKDIAG_TOKENS` rows) with a
  block-diagonal mask;
- "padded": one SDPA over the images padded to the longest, the padded keys masked out.
"auto" takes varlen (else flash) on CUDA in half precision, "padded" on CUDA otherwise, and "loop"
on the CPU, where a call costs little next to an image's linear layers.

No token ever meets another image's, so an image's output does not depend on the rest of the batch.
A batch whose images all hold the same number of tokens (thresholds that keep every token) runs the
backbone's own blocks on (B, L, C); a single image takes the fixed budget's path with each stage's
count read off its scores (`_run_single`: no packing, a few operators more than the fixed budget).

Under torch.compile the bookkeeping between stages (scores, counts, which rows to keep: it depends on
the data) runs eagerly, and each stage's blocks are compiled with dynamic shapes: one graph per stage,
not one per batch. There "auto" takes "padded" on the CPU, whose inputs are tensors only; the
kernels that loop over the images in Python ("loop", "groups", "blockdiag") would recompile for
every new set of lengths.

`forward_padded` is a plain implementation of the same budget (images padded to the longest, padded
keys masked out, the prediction modules' reference layout, a loop over images) that the tests hold
the packed one to.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .base import PrunedOutput
from .ops import fold_dropped, select_tokens

_logger = logging.getLogger(__name__)

ATTENTION_KERNELS = ("auto", "varlen", "flash", "loop", "groups", "blockdiag", "padded")
BLOCKDIAG_TOKENS = 1024  # rows per block-diagonal chunk: its mask grows with the square
_HALF = (torch.float16, torch.bfloat16)


def set_packed_attention(model: nn.Module, kind: str) -> None:
    """Choose how `model`'s per-image budget computes attention (one of `ATTENTION_KERNELS`)."""
    check_kernel(kind)
    model.packed_attention = kind


def check_kernel(kind: str) -> str:
    if kind not in ATTENTION_KERNELS:
        raise ConfigError(f"unknown packed attention {kind!r}; choose one of {', '.join(ATTENTION_KERNELS)}")
    return kind


def threshold_logits(thresholds: Sequence[float]) -> list[float]:
    """Thresholds on p(keep) as thresholds on the keep margin l_keep - l_drop (0 -> -inf: keep all)."""
    return [-math.inf if t <= 0 else math.log(t) - math.log1p(-t) for t in thresholds]


# -- the packed batch --------------------------------------------------------------------------------


class Segments:
    """Where each image's rows are in a packed sequence, and the index tensors each kernel needs
    (built once per stage; those of the Python-loop kernels on first use).

    Attributes:
        cu: cumulative offsets (B + 1,), int32, as varlen kernels take them.
        padded: (rows (B, Lmax) with padding at row 0, valid (B, Lmax), flat positions of the valid
            ones (T,)) for the padded kernel.
    """

    def __init__(self, lengths: Sequence[int], device: torch.device):
        self.lengths = list(lengths)
        self.device = device
        ends = [0]
        for n in self.lengths:
            ends.append(ends[-1] + n)
        self.starts = ends[:-1]
        self.bounds = list(zip(ends[:-1], ends[1:]))
        self.total = ends[-1]
        self.max_len = max(self.lengths)
        self.equal = len(set(self.lengths)) == 1
        self.cu = torch.tensor(ends, dtype=torch.int32, device=device)
        n = torch.tensor(self.lengths, device=device)
        col = torch.arange(self.max_len, device=device)
        valid = col < n[:, None]
        rows = (self.cu[:-1, None].long() + col).masked_fill(~valid, 0)
        self.padded = (rows, valid, valid.flatten().nonzero().squeeze(1))

    @cached_property
    def groups(self) -> list[torch.Tensor]:
        """Row indices (G, L) of each group of images holding L tokens."""
        by_length: dict[int, list[int]] = {}
        for s, n in zip(self.starts, self.lengths):
            by_length.setdefault(n, []).append(s)
        return [
            torch.tensor(starts, device=self.device)[:, None] + torch.arange(n, device=self.device)
            for n, starts in by_length.items()
        ]

    @cached_property
    def chunks(self) -> list[tuple[int, int, Optional[torch.Tensor]]]:
        """(first row, end row, block-diagonal mask (L, L) or None for one image) per chunk."""
        out, group = [], []
        for (a, b) in self.bounds + [(None, None)]:
            rows = sum(e - s for s, e in group)
            if group and (a is None or rows + (b - a) > BLOCKDIAG_TOKENS):
                first, end = group[0][0], group[-1][1]
                mask = None
                if len(group) > 1:
                    image = torch.repeat_interleave(
                        torch.arange(len(group), device=self.device),
                        torch.tensor([e - s for s, e in group], device=self.device),
                    )
                    mask = image[:, None] == image[None, :]
                out.append((first, end, mask))
                group = []
            if a is not None:
                group.append((a, b))
        return out


@dataclass
class Packed:
    """A batch as one sequence (see the module docstring).

    Attributes:
        x: the tokens, (T, C).
        counts: patch tokens of each image.
        fused: whether each image ends in a fused token.
        index: original grid index of each patch row, in row order, (sum(counts),).
        fused_weight: total weight each fused token holds, (B,) (0 where there is none).
    """

    x: torch.Tensor
    counts: list[int]
    fused: list[bool]
    index: torch.Tensor
    fused_weight: torch.Tensor

    @classmethod
    def of_dense(cls, x: torch.Tensor, num_prefix_tokens: int) -> "Packed":
        B, M, C = x.shape
        N = M - num_prefix_tokens
        index = torch.arange(N, device=x.device).repeat(B)
        return cls(x.reshape(B * M, C), [N] * B, [False] * B, index, x.new_zeros(B, dtype=torch.float32))

    def segments(self, num_prefix_tokens: int) -> Segments:
        return Segments([num_prefix_tokens + k + f for k, f in zip(self.counts, self.fused)], self.x.device)


@torch.compiler.disable
def _pack(x: torch.Tensor, num_prefix_tokens: int) -> tuple[Packed, Segments]:
    p = Packed.of_dense(x, num_prefix_tokens)
    return p, p.segments(num_prefix_tokens)


def _patch_rows(p: Packed, segs: Segments, P: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row of every patch token (Tp,), its image (Tp,), its place among the image's patches (Tp,))."""
    dev = p.x.device
    k = torch.tensor(p.counts, device=dev)
    total = sum(p.counts)
    image = torch.repeat_interleave(torch.arange(len(p.counts), device=dev), k, output_size=total)
    first = torch.tensor(segs.starts, device=dev) + P  # row of each image's first patch token
    pos = torch.arange(total, device=dev) - (k.cumsum(0) - k)[image]
    return first[image] + pos, image, pos


# -- one stage ----------------------------------------------------------------------------------


class StageScores(NamedTuple):
    """The keep margins a stage computes: margin (Tp,) of each patch row, its image (Tp,) and place
    among the image's patches (Tp,), and the patch tokens each image holds (B,)."""

    margin: torch.Tensor
    image: torch.Tensor
    pos: torch.Tensor
    counts: torch.Tensor


@torch.compiler.disable
def _score(model: nn.Module, stage: int, p: Packed, segs: Segments, P: int) -> tuple[StageScores, torch.Tensor]:
    rows, image, pos = _patch_rows(p, segs, P)
    patches = p.x[rows]  # (Tp, C)
    counts = torch.tensor(p.counts, device=p.x.device)
    margin = model.predictors[stage].keep_margin(patches, (image, counts.to(patches.dtype))).squeeze(-1)
    return StageScores(margin, image, pos, counts), patches


@torch.compiler.disable
def _prune(
    model: nn.Module, stage: int, p: Packed, segs: Segments, threshold: float, return_scores: bool,
) -> tuple[Packed, Segments, torch.Tensor, list[int], Optional[torch.Tensor]]:
    """One stage of the per-image budget.

    Returns:
        (the packed batch after the stage and its segments, kept grid indices (B, max count) padded
        with -1, each image's count, keep log-probabilities on the grid (B, N) or None).
    """
    P, B, dev = model.num_prefix_tokens, len(p.counts), p.x.device
    sc, patches = _score(model, stage, p, segs, P)
    kmax = max(p.counts)
    score = sc.margin.new_full((B, kmax), -math.inf).index_put_((sc.image, sc.pos), sc.margin)  # (B, kmax)
    order = score.argsort(dim=1, descending=True)  # best first; padding (-inf) last
    above = torch.zeros(B, dtype=torch.long, device=dev).index_add_(0, sc.image, (sc.margin >= threshold).long())
    least = sc.counts.clamp(max=model.config.min_keep)
    keep = torch.maximum(above, least)  # never above the count: `above` counts present tokens only
    *kept_counts, clamped = torch.cat([keep, (above < least).sum().view(1)]).tolist()  # one sync
    if clamped and not torch.compiler.is_compiling():
        _note_clamped(model, stage, clamped, B)
    valid = torch.arange(kmax, device=dev) < keep[:, None]  # (B, kmax), over the ordered places
    grid = p.index.new_full((B, kmax), -1).index_put_((sc.image, sc.pos), p.index).gather(1, order)
    # With fuse_dropped an image holds a fused token once it has dropped any token.
    fused = [model.fuse_dropped and (f or k < n) for f, k, n in zip(p.fused, kept_counts, p.counts)]
    src, fused_weight = p.x, p.fused_weight
    if any(fused):
        token, fused_weight = _fold(p, segs, sc, score, patches, order, valid, kept_counts, P)
        src = torch.cat([p.x, token])  # the new fused tokens are rows T..T+B-1
    starts = torch.tensor(segs.starts, device=dev)[:, None]
    rows = torch.cat([starts + torch.arange(P, device=dev), starts + P + order, segs.total + torch.arange(B, device=dev)[:, None]], 1)
    take = torch.cat([valid.new_ones(B, P), valid, torch.tensor(fused, device=dev)[:, None]], 1)
    packed = Packed(src[rows[take]], kept_counts, fused, grid[valid], fused_weight)
    width = max(kept_counts)
    kept = grid[:, :width].masked_fill(~valid[:, :width], -1)
    scores = None
    if return_scores:
        scores = sc.margin.new_full((B, model.num_patches), math.nan)
        scores[sc.image, p.index] = F.logsigmoid(sc.margin)
    return packed, packed.segments(P), kept, kept_counts, scores


def _fold(p, segs, sc, score, patches, order, valid, kept_counts, P) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's fused token after this stage (B, C) and its total weight (B,): the tokens it drops
    now folded in (`fold_dropped`, on the patches padded per image), carried unchanged where it drops none."""
    B, kmax, C = len(p.counts), score.shape[1], p.x.shape[1]
    dev = p.x.device
    has = torch.tensor(p.fused, device=dev)
    prev_rows = torch.tensor([s + P + k for s, k in zip(segs.starts, p.counts)], device=dev).clamp(max=segs.total - 1)
    previous = torch.where(has[:, None], p.x[prev_rows], 0.0).unsqueeze(1)  # (B, 1, C)
    drops = [k < n for k, n in zip(kept_counts, p.counts)]
    if not any(drops):  # only carried tokens (as the fixed budget, which folds only when a stage drops)
        return previous.view(B, C), p.fused_weight
    padded = patches.new_zeros(B, kmax, C).index_put_((sc.image, sc.pos), patches)
    kept_here = torch.zeros_like(valid).scatter_(1, order, valid)  # (B, kmax) by place
    present = torch.arange(kmax, device=dev) < sc.counts[:, None]
    weight = torch.sigmoid(score) * (present & ~kept_here)  # (B, kmax); sigmoid(-inf) = 0 on the padding
    token, total = fold_dropped(padded, weight, previous, p.fused_weight.view(B, 1, 1).to(padded.dtype))
    dropped = torch.tensor(drops, device=dev)
    token = torch.where(dropped[:, None, None], token, previous)
    total = torch.where(dropped, total.view(B).float(), p.fused_weight)
    return token.view(B, C), total


def _note_clamped(model: nn.Module, stage: int, clamped: int, batch: int) -> None:
    """Say (once per model, then at debug level) that images were raised to the minimum count."""
    level = logging.DEBUG if model.__dict__.get("_clamp_noted") else logging.WARNING
    model.__dict__["_clamp_noted"] = True
    _logger.log(
        level,
        "per-image budget, stage %d: %d of %d images scored fewer than min_keep=%d tokens above the threshold; "
        "they keep %d (the minimum)", stage + 1, clamped, batch, model.config.min_keep, model.config.min_keep,
    )


# -- blocks and head ----------------------------------------------------------------------------


def _blocks(model: nn.Module, first: int, last: int, x: torch.Tensor, segs: Optional[Segments]) -> torch.Tensor:
    """Blocks first..last-1 on the dense batch (segs None) or on a packed one."""
    for i in range(first, last):
        x = model.host.block(i, x) if segs is None else packed_block(model, i, x, segs)
    return x


def packed_block(model: nn.Module, i: int, x: torch.Tensor, segs: Segments) -> torch.Tensor:
    """Block i on a packed sequence (T, C): per-token layers on all rows, attention per image."""
    host = model.host
    if segs.equal:  # one length: the backbone's own block
        B = len(segs.lengths)
        return host.block(i, x.view(B, segs.max_len, -1)).reshape(x.shape)
    attn = host.blocks[i].attn
    kind = getattr(model, "packed_attention", "auto")
    return host.block_with(i, x, lambda t: packed_attention(attn, t, segs, kind))


def packed_attention(attn: nn.Module, x: torch.Tensor, segs: Segments, kind: str = "auto") -> torch.Tensor:
    """A timm `Attention` module's forward on packed tokens (T, C), each image attending to itself only."""
    T, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).view(T, 3, H, D).unbind(1)  # (T, H, D) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = KERNELS[resolve_kernel(kind, q)](q, k, v, segs, attn.scale)  # (T, H, D)
    return attn.proj_drop(attn.proj(attn.norm(o.reshape(T, H * D))))


def resolve_kernel(kind: str, q: torch.Tensor) -> str:
    """The attention kernel "auto" stands for on this device and dtype (others are returned as they are)."""
    if check_kernel(kind) != "auto":
        return kind
    if q.is_cuda and q.dtype in _HALF:
        if _has_module("torch.nn.attention.varlen"):
            return "varlen"
        if _has_module("flash_attn"):
            return "flash"
    return "padded" if q.is_cuda or torch.compiler.is_compiling() else "loop"


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _need_cuda_half(kind: str, q: torch.Tensor) -> None:
    if not q.is_cuda or q.dtype not in _HALF:
        raise ConfigError(
            f"packed attention {kind!r} runs on a CUDA GPU in fp16/bf16 only (here: {q.device.type}, "
            f"{str(q.dtype).replace('torch.', '')}); use 'auto' (or 'loop' / 'padded')"
        )


def _varlen_attn(q: torch.Tensor):
    """torch's variable-length attention, after checking it can run here."""
    _need_cuda_half("varlen", q)
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _varlen(q, k, v, segs: Segments, scale: float) -> torch.Tensor:
    q, k, v = (t.contiguous() for t in (q, k, v))  # views of the qkv rows; a copy costs little next to a block
    return _varlen_attn(q)(q, k, v, segs.cu, segs.cu, segs.max_len, segs.max_len, scale=scale)


def _flash(q, k, v, segs: Segments, scale: float) -> torch.Tensor:
    _need_cuda_half("flash", q)
    from ..extras import require

    flash = require("flash_attn", "packed attention 'flash'")
    q, k, v = (t.contiguous() for t in (q, k, v))
    return flash.flash_attn_varlen_func(q, k, v, segs.cu, segs.cu, segs.max_len, segs.max_len, softmax_scale=scale)


def _loop(q, k, v, segs: Segments, scale: float) -> torch.Tensor:
    out = [
        F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=scale).transpose(0, 1)
        for a, b in segs.bounds
    ]
    return torch.cat(out)


def _groups(q, k, v, segs: Segments, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    for rows in segs.groups:  # (G, L)
        o = F.scaled_dot_product_attention(*(t[rows].transpose(1, 2) for t in (q, k, v)), scale=scale)  # (G, H, L, D)
        out[rows] = o.transpose(1, 2)
    return out


def _blockdiag(q, k, v, segs: Segments, scale: float) -> torch.Tensor:
    out = []
    for a, b, mask in segs.chunks:
        o = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), attn_mask=mask, scale=scale)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def _padded(q, k, v, segs: Segments, scale: float) -> torch.Tensor:
    rows, valid, flat = segs.padded
    B, L = rows.shape
    o = F.scaled_dot_product_attention(
        *(t[rows].transpose(1, 2) for t in (q, k, v)), attn_mask=valid[:, None, None, :], scale=scale
    )  # (B, H, L, D)
    return o.transpose(1, 2).reshape(B * L, *q.shape[1:])[flat]


KERNELS = {"varlen": _varlen, "flash": _flash, "loop": _loop, "groups": _groups, "blockdiag": _blockdiag, "padded": _padded}


@torch.compiler.disable
def _logits(model: nn.Module, p: Packed, segs: Segments) -> torch.Tensor:
    """Class logits (B, K) from the final packed tokens; the fused tokens are left out, pooling runs per image."""
    host, P, B = model.host, model.num_prefix_tokens, len(p.counts)
    x = host.norm(p.x)  # per token: the fused rows cost C each and are never read
    if segs.equal and len(set(p.counts)) == 1:
        k = p.counts[0]
        return host.logits(x.view(B, segs.max_len, -1)[:, : P + k])
    dev = x.device
    kmax = max(p.counts)
    valid = torch.arange(kmax, device=dev) < torch.tensor(p.counts, device=dev)[:, None]
    starts = torch.tensor(segs.starts, device=dev)[:, None]
    rows = torch.cat([starts + torch.arange(P, device=dev), (starts + P + torch.arange(kmax, device=dev)).masked_fill(~valid, 0)], 1)
    keep = torch.cat([valid.new_ones(B, P), valid], 1)
    return host.logits(x[rows] * keep[..., None].to(x.dtype), valid.to(x.dtype))


# -- the whole path -----------------------------------------------------------------------------


def forward_packed(model: nn.Module, images: torch.Tensor, return_scores: bool = False) -> PrunedOutput:
    """The per-image budget's inference path of a DynamicViT (see the module docstring).

    Args:
        model: a DynamicViT whose config holds calibrated thresholds for its keep ratio.
        images: (B, C, H, W).
        return_scores: also return each stage's keep log-probabilities on the original grid.

    Returns:
        A `PrunedOutput` with `kept_counts` (B, S); `kept_indices[s]` is (B, max count) padded with -1.
    """
    out = _run(model, images, threshold_logits(model.config.stage_thresholds()), return_scores)
    assert isinstance(out, PrunedOutput)
    return out


def stage_scores(model: nn.Module, images: torch.Tensor, thresholds: Sequence[float], stage: int) -> StageScores:
    """The keep margins of `stage` (0-based) when the stages before it keep what `thresholds` (on
    p(keep), one per earlier stage) let through: what calibration chooses the next threshold from."""
    out = _run(model, images, threshold_logits(thresholds), stop_at=stage)
    assert isinstance(out, StageScores)
    return out


@torch.compiler.disable(recursive=False)  # under torch.compile: the functions it calls are compiled, each on its own
def _run(model, images, thresholds, return_scores: bool = False, stop_at: Optional[int] = None):
    if images.shape[0] == 1 and stop_at is None:
        return _run_single(model, images, thresholds, return_scores)
    P, locs = model.num_prefix_tokens, model.prune_locs
    x = _blocks(model, 0, locs[0], model.host.embed(images), None)
    p, segs = _pack(x, P)
    kept, counts, scores = [], [], []
    for stage, (first, last) in enumerate(zip(locs, [*locs[1:], model.host.depth])):
        if stage == stop_at:
            return _score(model, stage, p, segs, P)[0]
        p, segs, idx, n, sc = _prune(model, stage, p, segs, thresholds[stage], return_scores)
        p.x = _blocks(model, first, last, p.x, segs)
        kept.append(idx)
        counts.append(n)
        scores.append(sc)
    logits = _logits(model, p, segs)
    kept_counts = torch.tensor(counts, device=logits.device).T.contiguous()  # (B, S)
    return PrunedOutput(logits, kept, scores if return_scores else None, kept_counts=kept_counts)


# -- one image --------------------------------------------------------------------------------------


@dataclass
class _Single:
    """The state of one image between stages: patch tokens held (n), their grid index (1, n), the fused
    token's weight (1, 1, 1) once there is one."""

    n: int
    index: Optional[torch.Tensor] = None
    fused_weight: Optional[torch.Tensor] = None


@torch.compiler.disable(recursive=False)
def _run_single(model, images, thresholds, return_scores: bool) -> PrunedOutput:
    """The per-image budget of a single image: the sequence stays (1, L, C), each stage keeps the top k
    patch tokens where k is the count its scores earn."""
    host, locs = model.host, model.prune_locs
    x = _blocks(model, 0, locs[0], host.embed(images), None)
    state = _Single(model.num_patches)
    kept, counts, scores = [], [], []
    for stage, (first, last) in enumerate(zip(locs, [*locs[1:], host.depth])):
        x, score = _prune_single(model, stage, x, state, thresholds[stage], return_scores)
        x = _blocks(model, first, last, x, None)
        kept.append(state.index)
        counts.append(state.n)
        scores.append(score)
    logits = _single_logits(model, x, state.n)
    return PrunedOutput(logits, kept, scores if return_scores else None, kept_counts=torch.tensor([counts], device=x.device))


@torch.compiler.disable
def _prune_single(model, stage: int, x: torch.Tensor, state: _Single, threshold: float, return_scores: bool):
    """One stage on one image (1, P + n [+ 1], C): (the tokens after it, its keep log-probabilities on the grid or None)."""
    P, n = model.num_prefix_tokens, state.n
    margin = model.predictors[stage].keep_margin(x[:, P : P + n])  # (1, n, 1)
    above, least = int((margin >= threshold).sum()), min(model.config.min_keep, n)
    if above < least and not torch.compiler.is_compiling():
        _note_clamped(model, stage, 1, 1)
    k = max(above, least)
    tokens, keep = select_tokens(x[:, : P + n], margin, k, P)  # (1, P + k, C), (1, k)
    fused = x[:, P + n :] if state.fused_weight is not None else None
    if model.fuse_dropped and k < n:
        weight = torch.sigmoid(margin.view(1, n)).scatter(1, keep, 0.0)  # the tokens dropped now
        token, state.fused_weight = fold_dropped(x[:, P : P + n], weight, fused, state.fused_weight)
        tokens = torch.cat([tokens, token], dim=1)
    elif fused is not None:
        tokens = torch.cat([tokens, fused], dim=1)
    grid = state.index if state.index is not None else torch.arange(n, device=x.device).view(1, n)
    score = None
    if return_scores:
        score = margin.new_full((1, model.num_patches), math.nan).scatter(1, grid, F.logsigmoid(margin.view(1, n)))
    state.index, state.n = grid.gather(1, keep), k
    return tokens, score


@torch.compiler.disable
def _single_logits(model, x: torch.Tensor, n: int) -> torch.Tensor:
    return model.host.logits(model.host.norm(x[:, : model.num_prefix_tokens + n]))


# -- the padded reference -----------------------------------------------------------------------


def forward_padded(model: nn.Module, images: torch.Tensor, thresholds: Optional[Sequence[float]] = None) -> PrunedOutput:
    """The per-image budget computed plainly: every stage pads the images to the longest and masks the
    padded keys out of attention; the prediction modules run in their reference layout (`logits` with
    a policy); each image's selection is a loop. Slow; the tests hold `forward_packed` to it.

    Args:
        thresholds: on p(keep), one per stage; default the model's calibrated ones.
    """
    host, cfg = model.host, model.config
    logit_t = threshold_logits(cfg.stage_thresholds() if thresholds is None else thresholds)
    x = host.embed(images)
    B, P, N = x.shape[0], model.num_prefix_tokens, model.num_patches
    seqs = grids = None
    fused: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * B  # (token (1, 1, C), weight (1, 1, 1))
    kept, counts = [], []
    stage_at = model._stage_at()
    for i in range(host.depth):
        stage = stage_at.get(i)
        if stage is not None:
            if seqs is None:
                seqs, grids = list(x), [torch.arange(N, device=x.device)] * B
            seqs, grids, fused = _padded_stage(model, stage, seqs, grids, fused, logit_t[stage])
            kept.append(_pad_rows(grids, -1))
            counts.append([len(g) for g in grids])
        if seqs is None:
            x = host.block(i, x)
            continue
        full = [torch.cat([s, f[0][0]]) if f is not None else s for s, f in zip(seqs, fused)]
        x, valid = _pad_tokens(full)
        attn = host.blocks[i].attn
        x = host.block_with(i, x, lambda t: _key_masked_attention(attn, t, valid))
        seqs = [x[b, : len(s)] for b, s in enumerate(seqs)]
        fused = [None if f is None else (x[b, len(seqs[b])].view(1, 1, -1), f[1]) for b, f in enumerate(fused)]
    patches, valid = _pad_tokens([s[P:] for s in seqs])
    final = host.norm(torch.cat([torch.stack([s[:P] for s in seqs]), patches], 1))
    logits = host.logits(final, valid.to(final.dtype))
    return PrunedOutput(logits, kept, None, kept_counts=torch.tensor(counts, device=logits.device).T)


def _padded_stage(model, stage, seqs, grids, fused, threshold):
    """Score every image's patches on the padded batch, then select per image (a loop)."""
    P = model.num_prefix_tokens
    patches, valid = _pad_tokens([s[P:] for s in seqs])
    tokens = torch.cat([torch.stack([s[:P] for s in seqs]), patches], 1)
    log_p = model.predictors[stage](tokens, valid[..., None].to(tokens.dtype), P)  # (B, kmax, 2)
    margin = log_p[..., 0] - log_p[..., 1]
    out_seqs, out_grids, out_fused = [], [], []
    for b, (s, g) in enumerate(zip(seqs, grids)):
        n = len(g)
        m = margin[b, :n]
        keep = min(max(int((m >= threshold).sum()), min(model.config.min_keep, n)), n)
        order = m.argsort(descending=True)
        chosen = order[:keep]
        f = fused[b]
        if model.fuse_dropped and keep < n:
            weight = torch.zeros_like(m).index_fill_(0, order[keep:], 1.0) * torch.sigmoid(m)
            token, total = fold_dropped(s[P:][None], weight[None], *(f if f is not None else (None, None)))
            f = (token, total)
        out_seqs.append(torch.cat([s[:P], s[P:][chosen]]))
        out_grids.append(g[chosen])
        out_fused.append(f)
    return out_seqs, out_grids, out_fused


def _pad_tokens(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences (L_b, C) -> zero-padded (B, Lmax, C) and which places are real (B, Lmax)."""
    L = max(len(s) for s in seqs)
    x = seqs[0].new_zeros(len(seqs), L, seqs[0].shape[-1])
    valid = torch.zeros(len(seqs), L, dtype=torch.bool, device=x.device)
    for b, s in enumerate(seqs):
        x[b, : len(s)] = s
        valid[b, : len(s)] = True
    return x, valid


def _pad_rows(rows: list[torch.Tensor], fill: int) -> torch.Tensor:
    out = rows[0].new_full((len(rows), max(len(r) for r in rows)), fill)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


def _key_masked_attention(attn: nn.Module, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A timm `Attention` on padded tokens (B, L, C) whose padded keys (valid False) get no weight."""
    B, L, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(B, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, D)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=attn.scale)
    return attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, L, C))))
