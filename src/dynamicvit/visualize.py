"""Pictures of the tokens a DynamicViT keeps, and the arrays behind them.

Four steps, each usable on its own:
- compute: `kept_token_masks` runs the inference path and returns, per image and stage, the kept
  patches as boolean masks on the patch grid, the kept indices, and the predictors' keep
  probabilities; `average_keep_maps` averages the masks over a dataset.
- convert: `to_uint8` undoes the model's normalization; `fade_dropped` and `heatmap` draw one panel.
- draw: `render_tokens`, `render_contact_sheet` and `render_average` lay panels out in a PIL image
  and say where each panel is (`PanelGrid.boxes`).
- save: `save_token_figure`, `save_contact_sheet`, `save_average` write PNGs; `write_html` one page.

Dropped patches are blended towards white as in the paper's figures (towards light blue in grayscale
images, where white would hide them). For a model that merges its dropped tokens into kept ones, each
stage's panel also outlines the groups: a kept patch and the faded patches merged into it. Small inputs (Fashion-MNIST's 28 px) are enlarged by an integer
factor with nearest-neighbour so every patch stays a sharp block and pixel positions stay exact.
"""
from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont

from .core.base import SparseModel
from .data import per_channel
from .errors import ConfigError, DataError
from .extras import require
from .files import GENERATOR, PathLike, atomic_write, describe_os_error
from .progress import progress_bar

FADE_COLOR = (255, 255, 255)
FADE_STRENGTH = 0.75  # dropped patches keep a quarter of their contrast, as in the paper's figures
# Grayscale images (Fashion-MNIST: light objects on black) fade towards a light blue instead: towards
# white, a dropped light patch would look like a kept one.
FADE_COLOR_GRAY = (150, 185, 255)
MIN_PANEL_SIZE = 112  # smaller inputs are enlarged by an integer nearest-neighbour factor
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
MISSING_COLOR = (190, 190, 190)  # heat-map cells without a value (token dropped at an earlier stage)
OUTLINE_COLOR = (230, 60, 20)  # borders between groups of merged patches
CMAP = "viridis"


# -- compute ------------------------------------------------------------------------------------


@dataclass
class TokenMasks:
    """Which patches a DynamicViT kept, per image and stage.

    Attributes:
        masks: (B, S, gh, gw) bool, True where the patch is still present after stage s.
        keep_prob: (B, gh, gw), the first stage's predicted probability of keeping each patch.
        stage_keep_prob: (B, S, gh, gw), each stage's keep probability, NaN where the patch had
            been dropped at an earlier stage.
        kept_indices: per stage, (B, k_s) int64 indices into the row-major patch grid, in the order
            the tokens sit in the model's sequence (chained across stages); under the per-image budget
            k_s is the largest count and a row ends in -1 after the image's own count.
        logits: (B, num_classes) classifier output of the inference path.
        keep_counts: patch tokens kept after each stage.
        patch_size: (ph, pw) pixels per patch.
        fused: the model folds the dropped patches into one extra token (`fuse_dropped`): they are
            not lost, only averaged (the titles say "+ fused").
        merged_into: (B, S, gh, gw) int64 for a model that merges its dropped tokens
            (`merge_dropped`): the row-major grid index of the kept patch holding each patch after
            stage s (a kept patch holds itself); None otherwise.
        image_counts: per-image budget: the patch tokens each image kept after each stage, (B, S);
            None under the fixed budget (every image keeps `keep_counts`).
    """

    masks: np.ndarray
    keep_prob: np.ndarray
    stage_keep_prob: np.ndarray
    kept_indices: list[np.ndarray]
    logits: np.ndarray
    keep_counts: tuple[int, ...]
    patch_size: tuple[int, int]
    fused: bool = False
    merged_into: Optional[np.ndarray] = None
    image_counts: Optional[np.ndarray] = None

    @property
    def merged(self) -> bool:
        return self.merged_into is not None

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.masks.shape[2:])

    @property
    def num_stages(self) -> int:
        return self.masks.shape[1]

    def __len__(self) -> int:
        return self.masks.shape[0]

    def __getitem__(self, index: Union[int, slice]) -> "TokenMasks":
        """The masks of some of the images (an int keeps the batch dimension)."""
        sel = slice(index, index + 1) if isinstance(index, int) else index
        return TokenMasks(
            masks=self.masks[sel],
            keep_prob=self.keep_prob[sel],
            stage_keep_prob=self.stage_keep_prob[sel],
            kept_indices=[k[sel] for k in self.kept_indices],
            logits=self.logits[sel],
            keep_counts=self.keep_counts,
            patch_size=self.patch_size,
            fused=self.fused,
            merged_into=None if self.merged_into is None else self.merged_into[sel],
            image_counts=None if self.image_counts is None else self.image_counts[sel],
        )

    @staticmethod
    def concat(parts: Sequence["TokenMasks"]) -> "TokenMasks":
        """Join the masks of several batches of the same model."""
        if not parts:
            raise ConfigError("no masks to join")
        first = parts[0]
        per_image = any(p.image_counts is not None for p in parts)
        return TokenMasks(
            masks=np.concatenate([p.masks for p in parts]),
            keep_prob=np.concatenate([p.keep_prob for p in parts]),
            stage_keep_prob=np.concatenate([p.stage_keep_prob for p in parts]),
            kept_indices=[_join_rows([p.kept_indices[s] for p in parts]) for s in range(first.num_stages)],
            logits=np.concatenate([p.logits for p in parts]),
            keep_counts=first.keep_counts,
            patch_size=first.patch_size,
            fused=first.fused,
            merged_into=None if first.merged_into is None else np.concatenate([p.merged_into for p in parts]),
            image_counts=np.concatenate([p.counts() for p in parts]) if per_image else None,
        )

    def counts(self, index: Optional[int] = None) -> np.ndarray:
        """Patch tokens kept after each stage, (B, S), or (S,) of image `index`."""
        counts = self.image_counts if self.image_counts is not None else np.tile(self.keep_counts, (len(self), 1))
        return counts if index is None else counts[index]


def _join_rows(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Stack (B_i, k_i) index arrays whose widths may differ (per-image budget), padding with -1."""
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-1) for p in parts])


def as_dynamicvit(model: nn.Module):
    """Return `model` if it is a DynamicViT (or a DynamicSpatial), else raise a `ConfigError` that says how to get one."""
    if not isinstance(model, SparseModel):
        raise ConfigError(
            f"{type(model).__name__} has no prediction modules, so there are no kept tokens to draw; "
            "wrap it with dynamicvit.sparsify(model) or build it with dynamicvit.create_model(name)"
        )
    return model


@torch.no_grad()
def kept_token_masks(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> TokenMasks:
    """Run the inference path and collect which patches survive each stage.

    Args:
        model: a DynamicViT; it runs in eval mode (its mode is restored afterwards).
        images: (B, C, H, W), normalized for the model.
        batch_size: images per forward pass.
    """
    model = as_dynamicvit(model)
    if images.ndim != 4:
        raise ConfigError(f"expected images of shape (B, C, H, W), got a tensor of shape {tuple(images.shape)}")
    param = next(model.parameters())
    B, N = images.shape[0], model.num_patches
    gh, gw = model.grid_size
    was_training = model.training
    model.eval()
    try:
        outs = [
            model.forward_pruned(chunk.to(device=param.device, dtype=param.dtype), return_scores=True)
            for chunk in images.split(batch_size)
        ]
    finally:
        model.train(was_training)
    S = len(model.prune_locs)
    kept = [torch.from_numpy(_join_rows([o.kept_indices[s].cpu().numpy() for o in outs])) for s in range(S)]  # (B, k_s)
    masks = torch.zeros(B, S, N + 1, dtype=torch.bool)  # column N takes the -1 padding of a per-image budget
    for s, idx in enumerate(kept):
        masks[:, s].scatter_(1, idx.masked_fill(idx < 0, N), True)
    masks = masks[..., :N]
    per_image = outs[0].kept_counts is not None
    log_p = torch.stack([torch.cat([o.keep_scores[s] for o in outs]) for s in range(S)], dim=1)  # (B, S, N)
    prob = log_p.float().exp().cpu().numpy().reshape(B, S, gh, gw)
    merged_into = None
    if outs[0].merged_into is not None:
        holders = torch.stack([torch.cat([o.merged_into[s] for o in outs]) for s in range(S)], dim=1)  # (B, S, N)
        merged_into = holders.cpu().numpy().reshape(B, S, gh, gw)
    return TokenMasks(
        masks=masks.numpy().reshape(B, S, gh, gw),
        keep_prob=prob[:, 0].copy(),
        stage_keep_prob=prob,
        kept_indices=[k.numpy() for k in kept],
        logits=torch.cat([o.logits for o in outs]).float().cpu().numpy(),
        keep_counts=tuple(model.keep_counts()),
        patch_size=tuple(model.patch_size),  # ConvNeXt / Swin: positions of the stage-3 map
        fused=getattr(model, "fuse_dropped", False),
        merged_into=merged_into,
        image_counts=torch.cat([o.kept_counts for o in outs]).cpu().numpy() if per_image else None,
    )


def average_keep_maps(
    model: nn.Module,
    batches: Iterable,
    *,
    kind: Literal["kept", "prob"] = "kept",
    progress: bool = False,
) -> np.ndarray:
    """Where the model looks on average: one map per stage, (S, gh, gw).

    Args:
        model: a DynamicViT.
        batches: an iterable of image tensors (B, C, H, W), or of (images, labels, ...) tuples as a
            DataLoader yields them; images normalized for the model.
        kind: "kept": the fraction of images in which each patch is still present after stage s
            (the empirical keep probability; the maps of stage s sum to keep_counts()[s]).
            "prob": the predictor's keep probability at stage s, averaged over the images in which
            the patch reached stage s (NaN where it never did).
        progress: show a progress bar.
    """
    if kind not in ("kept", "prob"):
        raise ConfigError(f"kind must be 'kept' or 'prob', got {kind!r}")
    total = count = None
    seen = 0
    for batch in progress_bar(batches, desc="keep maps", unit="batch", enabled=progress):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        tm = kept_token_masks(model, images)
        if kind == "kept":
            values, present = tm.masks.astype(np.float64), np.ones_like(tm.masks, dtype=np.float64)
        else:
            reached = ~np.isnan(tm.stage_keep_prob)
            values, present = np.where(reached, tm.stage_keep_prob, 0.0), reached.astype(np.float64)
        total = values.sum(0) if total is None else total + values.sum(0)
        count = present.sum(0) if count is None else count + present.sum(0)
        seen += len(tm)
    if not seen:
        raise DataError("no images to average over: the batches were empty")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# -- convert ------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the normalization: (B, C, H, W) or (C, H, W) tensor -> (B, H, W, 3) uint8 RGB.

    Grayscale images (C = 1) are repeated into three channels.
    """
    x = images.detach().float().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ConfigError(f"expected images of shape (B, C, H, W) with C = 1 or 3, got {tuple(images.shape)}")
    C = x.shape[1]
    m = torch.tensor(per_channel(mean, C, "mean"), dtype=torch.float32).view(1, C, 1, 1)
    s = torch.tensor(per_channel(std, C, "std"), dtype=torch.float32).view(1, C, 1, 1)
    x = ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    return np.repeat(x, 3, axis=-1) if C == 1 else x


def pixel_mask(mask: np.ndarray, patch_size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """Patch mask (gh, gw) -> pixel mask (H, W); pixels outside the patch grid count as True."""
    ph, pw = patch_size
    gh, gw = mask.shape
    out = np.ones(image_size, dtype=bool)
    out[: gh * ph, : gw * pw] = np.repeat(np.repeat(mask, ph, axis=0), pw, axis=1)
    return out


def fade_color(image: np.ndarray) -> tuple[int, int, int]:
    """White for colour images (as the paper draws them), light blue for grayscale ones."""
    gray = bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())
    return FADE_COLOR_GRAY if gray else FADE_COLOR


def fade_dropped(
    image: np.ndarray,
    mask: np.ndarray,
    patch_size: tuple[int, int],
    strength: float = FADE_STRENGTH,
    color: Optional[tuple[int, int, int]] = None,
) -> np.ndarray:
    """Blend the dropped patches of `image` towards `color`; kept pixels are returned unchanged.

    Args:
        image: (H, W, 3) uint8.
        mask: (gh, gw) bool, True = kept.
        patch_size: (ph, pw) pixels per patch.
        strength: 0 leaves dropped patches as they are, 1 paints them `color`.
        color: RGB to fade towards; default `fade_color(image)`.
    """
    color = fade_color(image) if color is None else color
    kept = pixel_mask(mask, patch_size, image.shape[:2])
    out = image.copy()
    faded = image[~kept].astype(np.float32) * (1.0 - strength) + np.asarray(color, np.float32) * strength
    out[~kept] = np.clip(np.round(faded), 0, 255).astype(np.uint8)
    return out


def merge_outlines(holder: np.ndarray, patch_size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """Pixels on the borders between groups of merged patches, (H, W) bool.

    A border is drawn on the last pixel row (column) of a patch whose lower (right) neighbour is held
    by another kept token, when either of the two tokens holds more than its own patch: every group of
    patches merged into one token gets an outline, and kept patches that hold only themselves none.

    Args:
        holder: (gh, gw), which kept patch holds each patch (`TokenMasks.merged_into` of one stage).
        patch_size: (ph, pw).
        image_size: (H, W); pixels outside the patch grid get no border.
    """
    ph, pw = patch_size
    gh, gw = holder.shape
    out = np.zeros(image_size, dtype=bool)
    below = np.zeros((gh, gw), dtype=bool)
    right = np.zeros((gh, gw), dtype=bool)
    values, inverse, counts = np.unique(holder, return_inverse=True, return_counts=True)
    grouped = (counts > 1)[inverse.reshape(holder.shape)]  # (gh, gw): the patch's token holds others too
    below[:-1] = (holder[:-1] != holder[1:]) & (grouped[:-1] | grouped[1:])
    right[:, :-1] = (holder[:, :-1] != holder[:, 1:]) & (grouped[:, :-1] | grouped[:, 1:])
    for r, c in zip(*np.nonzero(below)):
        out[r * ph + ph - 1, c * pw : (c + 1) * pw] = True
    for r, c in zip(*np.nonzero(right)):
        out[r * ph : (r + 1) * ph, c * pw + pw - 1] = True
    return out


@lru_cache(maxsize=8)
def _colormap(name: str) -> np.ndarray:
    colormaps = require("matplotlib", "drawing keep probabilities").colormaps
    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)  # (256, 3)


def heatmap(
    values: np.ndarray,
    patch_size: tuple[int, int],
    image_size: Optional[tuple[int, int]] = None,
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = CMAP,
) -> np.ndarray:
    """Colour a per-patch map: (gh, gw) values -> (H, W, 3) uint8, one flat block per patch.

    NaN cells are drawn grey; pixels outside the patch grid (when `image_size` is larger) too.
    """
    gh, gw = values.shape
    ph, pw = patch_size
    H, W = image_size or (gh * ph, gw * pw)
    v = np.nan_to_num((np.asarray(values, np.float64) - vmin) / max(vmax - vmin, 1e-12), nan=0.0)
    rgb = _colormap(cmap)[np.clip(np.round(v * 255), 0, 255).astype(np.int64)]  # (gh, gw, 3)
    rgb[np.isnan(values)] = MISSING_COLOR
    out = np.empty((H, W, 3), dtype=np.uint8)
    out[:] = MISSING_COLOR
    out[: gh * ph, : gw * pw] = np.repeat(np.repeat(rgb, ph, axis=0), pw, axis=1)
    return out


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor (each pixel becomes a factor x factor block)."""
    return image if factor == 1 else np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def scale_factor(image_size: tuple[int, int], min_size: int = MIN_PANEL_SIZE) -> int:
    """The integer enlargement that makes the shorter side at least `min_size` pixels."""
    return max(1, math.ceil(min_size / max(1, min(image_size))))


def token_panels(
    image: np.ndarray,
    masks: np.ndarray,
    keep_prob: np.ndarray,
    patch_size: tuple[int, int],
    merged_into: Optional[np.ndarray] = None,
) -> list[np.ndarray]:
    """The panels of one image at the model's resolution: original, one per stage, keep-probability map.

    Args:
        image: (H, W, 3) uint8.
        masks: (S, gh, gw) bool.
        keep_prob: (gh, gw) first-stage keep probability.
        patch_size: (ph, pw).
        merged_into: (S, gh, gw) holders of a merging model: each stage's groups are outlined.
    """
    panels = [image]
    for s, m in enumerate(masks):
        panel = fade_dropped(image, m, patch_size)
        if merged_into is not None:
            panel[merge_outlines(merged_into[s], patch_size, image.shape[:2])] = OUTLINE_COLOR
        panels.append(panel)
    panels.append(heatmap(keep_prob, patch_size, image.shape[:2]))
    return panels


def stage_titles(keep_counts: Sequence, num_patches: int, fused: bool = False, merged: bool = False) -> list[str]:
    """Panel titles; `fused`: the faded patches live on, averaged into one fused token; `merged`: they
    live on in the kept token outlined with them. A count may be a word ("per image": the images of a
    contact sheet keep their own counts)."""
    more = " + fused" if fused else " + merged" if merged else ""
    kept = [f"{k}/{num_patches}" if not isinstance(k, str) else k for k in keep_counts]
    return ["original"] + [f"stage {s}: {k}{more}" for s, k in enumerate(kept, 1)] + ["p(keep), stage 1"]


# -- draw ---------------------------------------------------------------------------------------


@dataclass
class PanelGrid:
    """A drawn figure and where its panels are.

    Attributes:
        image: the RGB picture.
        boxes: boxes[row][col] = (left, top, right, bottom) of each panel in `image` (right and
            bottom exclusive, as PIL's crop takes them).
        scale: the nearest-neighbour enlargement applied to every panel.
    """

    image: Image.Image
    boxes: list[list[tuple[int, int, int, int]]]
    scale: int

    def panel(self, row: int, col: int) -> np.ndarray:
        """The pixels of one panel, (h, w, 3) uint8."""
        return np.asarray(self.image.crop(self.boxes[row][col]))

    def save(self, path: PathLike) -> Path:
        """Write a PNG atomically (a crash never leaves a half-written file)."""
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Software", GENERATOR)  # how `is_our_file` recognizes it later
        path = Path(path)
        atomic_write(path, lambda tmp: self.image.save(tmp, format="PNG", pnginfo=info))
        return path


def is_our_file(path: PathLike) -> bool:
    """Whether `path` is a picture, page or array this module wrote (so a later run may replace it).

    PNGs and HTML pages carry a generator mark; an `.npy` counts as ours when the PNG of the same
    name does (they are written in pairs).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".png":
            with Image.open(path) as im:
                return im.info.get("Software") == GENERATOR
        if suffix == ".html":
            with open(path, encoding="utf-8", errors="replace") as f:
                return _html_mark() in f.read(4096)
        if suffix == ".npy":
            return is_our_file(path.with_suffix(".png"))
    except (OSError, SyntaxError, ValueError):
        return False
    return False


def _html_mark() -> str:
    return f'<meta name="generator" content="{GENERATOR}">'


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


@dataclass(frozen=True)
class Layout:
    """Spacing of a panel grid, derived from the panel size so text stays readable."""

    margin: int
    font_size: int

    @classmethod
    def for_panel(cls, panel_size: tuple[int, int]) -> "Layout":
        short = min(panel_size)
        return cls(margin=max(4, short // 28), font_size=int(np.clip(short // 10, 10, 16)))

    @property
    def line(self) -> int:
        """Height of one line of text."""
        return self.font_size + 6


def compose(
    rows: Sequence[Sequence[np.ndarray]],
    col_titles: Sequence[str] = (),
    row_titles: Optional[Sequence[str]] = None,
    colorbar: Optional[tuple[int, float, float, str]] = None,
    scale: int = 1,
    heading: Optional[str] = None,
) -> PanelGrid:
    """Lay out equally sized panels in a grid with titles.

    Args:
        rows: rows of panels, each (h, w, 3) uint8 at the same size (before `scale`).
        heading: a line at the very top.
        col_titles: one title per column, drawn above the first row.
        row_titles: one line per row, drawn above that row.
        colorbar: (column, vmin, vmax, cmap): a colour scale under that column of the last row.
        scale: nearest-neighbour enlargement of every panel.
    """
    if not rows or not rows[0]:
        raise ConfigError("nothing to draw: no panels")
    h, w = rows[0][0].shape[0] * scale, rows[0][0].shape[1] * scale
    lay = Layout.for_panel((h, w))
    m, line = lay.margin, lay.line
    ncols = max(len(r) for r in rows)
    width = ncols * w + (ncols + 1) * m
    top = m + (line if heading else 0) + (line if col_titles else 0)
    row_h = (line if row_titles else 0) + h + m
    height = top + len(rows) * row_h + (line + m if colorbar else 0)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(lay.font_size)
    if heading:
        draw.text((m, m + line // 2), _fit(draw, heading, font, width - 2 * m), fill=TEXT_COLOR, font=font, anchor="lm")
    title_y = top - line // 2
    for c, title in enumerate(col_titles):
        x = m + c * (w + m)
        draw.text((x + w // 2, title_y), _fit(draw, title, font, w), fill=TEXT_COLOR, font=font, anchor="mm")
    boxes = []
    for r, panels in enumerate(rows):
        y = top + r * row_h
        if row_titles:
            text = _fit(draw, row_titles[r], font, width - 2 * m)
            draw.text((m, y + line // 2), text, fill=TEXT_COLOR, font=font, anchor="lm")
            y += line
        row_boxes = []
        for c, panel in enumerate(panels):
            if panel.shape[:2] != rows[0][0].shape[:2]:
                raise ConfigError(f"panel ({r}, {c}) has size {panel.shape[:2]}, expected {rows[0][0].shape[:2]}")
            x = m + c * (w + m)
            canvas.paste(Image.fromarray(upscale(panel, scale)), (x, y))
            row_boxes.append((x, y, x + w, y + h))
        boxes.append(row_boxes)
    if colorbar:
        col, vmin, vmax, cmap = colorbar
        _draw_colorbar(draw, canvas, (m + col * (w + m), height - m - line, w, line), vmin, vmax, cmap, font)
    return PanelGrid(image=canvas, boxes=boxes, scale=scale)


def _draw_colorbar(draw, canvas, box, vmin, vmax, cmap, font) -> None:
    x, y, w, h = box
    lo, hi = f"{vmin:g}", f"{vmax:g}"
    pad = 3
    lo_w, hi_w = int(draw.textlength(lo, font=font)), int(draw.textlength(hi, font=font))
    bar_w = max(8, w - lo_w - hi_w - 4 * pad)
    ramp = _colormap(cmap)[np.linspace(0, 255, bar_w).round().astype(np.int64)]  # (bar_w, 3)
    bar_h = max(4, h // 2)
    canvas.paste(Image.fromarray(np.repeat(ramp[None], bar_h, axis=0)), (x + lo_w + 2 * pad, y + (h - bar_h) // 2))
    draw.text((x + lo_w + pad, y + h // 2), lo, fill=TEXT_COLOR, font=font, anchor="rm")
    draw.text((x + lo_w + 3 * pad + bar_w, y + h // 2), hi, fill=TEXT_COLOR, font=font, anchor="lm")


def render_tokens(
    image: np.ndarray,
    tm: TokenMasks,
    index: int = 0,
    *,
    title: Optional[str] = None,
    min_size: int = MIN_PANEL_SIZE,
) -> PanelGrid:
    """One image in a row: the original, one panel per stage with the dropped patches faded,
    and the first stage's keep probability as a heat map.

    Args:
        image: (H, W, 3) uint8, the image as the model saw it (see `to_uint8`).
        tm: the masks of a batch that contains this image.
        index: the image's position in that batch.
        title: a line above the panels (e.g. the file name and the prediction).
        min_size: enlarge small images so each panel is at least this many pixels.
    """
    holders = None if tm.merged_into is None else tm.merged_into[index]
    panels = token_panels(image, tm.masks[index], tm.keep_prob[index], tm.patch_size, holders)
    N = int(np.prod(tm.grid_size))
    return compose(
        [panels],
        col_titles=stage_titles(tm.counts(index), N, tm.fused, tm.merged),
        heading=title,
        colorbar=(len(panels) - 1, 0.0, 1.0, CMAP),
        scale=scale_factor(image.shape[:2], min_size),
    )


def render_contact_sheet(
    images: np.ndarray,
    tm: TokenMasks,
    titles: Optional[Sequence[str]] = None,
    *,
    min_size: int = MIN_PANEL_SIZE,
) -> PanelGrid:
    """Many images, one row each (the panels of `render_tokens`), one set of column titles.

    Args:
        images: (B, H, W, 3) uint8, matching `tm` image by image.
        tm: the masks of these images.
        titles: one line per image, or None.
    """
    if len(images) != len(tm):
        raise ConfigError(f"{len(images)} images but masks for {len(tm)}")
    if titles is not None and len(titles) != len(images):
        raise ConfigError(f"{len(titles)} titles for {len(images)} images")
    rows = [
        token_panels(img, tm.masks[i], tm.keep_prob[i], tm.patch_size, None if tm.merged_into is None else tm.merged_into[i])
        for i, img in enumerate(images)
    ]
    N = int(np.prod(tm.grid_size))
    col_titles = stage_titles(tm.keep_counts, N, tm.fused, tm.merged)
    if tm.image_counts is not None:  # each image keeps its own count: in its row title
        col_titles = stage_titles(["per image"] * tm.num_stages, N, tm.fused, tm.merged)
        kept = [f"kept {'/'.join(map(str, tm.counts(i)))} of {N}" for i in range(len(images))]
        titles = [f"{t} ({k})" for t, k in zip(titles, kept)] if titles is not None else kept
    return compose(
        rows,
        col_titles=col_titles,
        row_titles=list(titles) if titles is not None else None,
        colorbar=(len(rows[0]) - 1, 0.0, 1.0, CMAP),
        scale=scale_factor(images.shape[1:3], min_size),
    )


def render_average(
    maps: np.ndarray,
    keep_counts: Optional[Sequence[int]] = None,
    *,
    title: Optional[str] = None,
    min_size: int = 2 * MIN_PANEL_SIZE,
) -> PanelGrid:
    """One heat map per stage of `average_keep_maps` on a shared 0-1 colour scale.

    Args:
        maps: (S, gh, gw) values in [0, 1].
        keep_counts: tokens kept per stage (for the titles).
        title: a line above the maps.
        min_size: pixels of the shorter side of each map.
    """
    S, gh, gw = maps.shape
    cell = max(1, math.ceil(min_size / min(gh, gw)))
    panels = [heatmap(mp, (cell, cell)) for mp in maps]
    N = gh * gw
    titles = [
        f"stage {s + 1}" + (f": {keep_counts[s]}/{N} kept" if keep_counts is not None else "") for s in range(S)
    ]
    return compose(
        [panels], col_titles=titles, heading=title, colorbar=(S - 1, 0.0, 1.0, CMAP)
    )


# -- save ---------------------------------------------------------------------------------------


def save_token_figure(
    model: nn.Module,
    image: torch.Tensor,
    path: PathLike,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    title: Optional[str] = None,
) -> Path:
    """Draw one image (C, H, W) or (1, C, H, W), normalized for the model, as `render_tokens` does; write a PNG."""
    batch = image.unsqueeze(0) if image.ndim == 3 else image
    tm = kept_token_masks(model, batch[:1])
    return render_tokens(to_uint8(batch[:1], mean, std)[0], tm, 0, title=title).save(path)


def save_contact_sheet(
    model: nn.Module,
    images: torch.Tensor,
    path: PathLike,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    titles: Optional[Sequence[str]] = None,
) -> Path:
    """Draw every image of a batch in one PNG: per image the original, one panel per stage with the
    dropped patches faded, and the first stage's keep probability.

    Args:
        model: a DynamicViT.
        images: (B, C, H, W) normalized for the model, C = 1 or 3.
        path: the PNG to write (folders are created).
        mean, std: the normalization the images went through (1 or C values).
        titles: one line per image (e.g. its label), or None.
    """
    tm = kept_token_masks(model, images)
    return render_contact_sheet(to_uint8(images, mean, std), tm, titles).save(path)


def save_average(
    maps: np.ndarray, path: PathLike, keep_counts: Optional[Sequence[int]] = None, title: Optional[str] = None
) -> Path:
    """Write the maps of `average_keep_maps` as one PNG."""
    return render_average(maps, keep_counts, title=title).save(path)


def write_html(
    path: PathLike,
    entries: Sequence[tuple[str, PathLike]],
    *,
    heading: str = "DynamicViT: kept tokens",
    notes: Sequence[str] = (),
    embed: bool = False,
) -> Path:
    """One HTML page showing PNGs with a caption each.

    Args:
        path: the page to write.
        entries: (caption, PNG path) pairs.
        heading: the page title.
        notes: paragraphs under the heading.
        embed: put the images inside the page (base64) instead of linking them relative to it.
    """
    path = Path(path)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        _html_mark(),
        f"<title>{html.escape(heading)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;background:#fafafa}"
        "figure{margin:0 0 1.5em 0}figcaption{font-size:0.9em;color:#333;margin-bottom:0.3em}"
        "img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}</style>",
        "</head><body>",
        f"<h1>{html.escape(heading)}</h1>",
    ]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    for caption, png in entries:
        png = Path(png)
        if embed:
            src = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
        else:
            src = Path(os.path.relpath(png.resolve(), path.resolve().parent)).as_posix()
        parts.append(
            f'<figure><figcaption>{html.escape(caption)}</figcaption>'
            f'<img src="{html.escape(src, quote=True)}" alt="{html.escape(caption, quote=True)}"></figure>'
        )
    parts.append("</body></html>")
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(parts) + "\n", encoding="utf-8"))
    return path


# -- image files --------------------------------------------------------------------------------


def find_images(inputs: Sequence[PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders (recursively, sorted, hidden files and folders skipped) into candidate files.

    Nothing is dropped silently: what cannot be read is returned with the reason, as a missing file is.

    Returns:
        (files, skipped): skipped holds (path, reason) for inputs that do not exist, folders without
        files, sub-folders that cannot be listed, broken symbolic links, links to folders (not
        followed: no loops) and entries that are not regular files (a pipe would block the reader).
    """
    files, skipped = [], []
    for p in map(Path, inputs):
        if p.is_dir():  # a link to a folder named on the command line is followed
            before = len(skipped)
            found = _files_under(p, skipped)
            if not found and len(skipped) == before:
                skipped.append((p, "the folder holds no files"))
            files += found
        elif p.is_file():
            files.append(p)
        else:
            skipped.append((p, _why_not_a_file(p)))
    return files, skipped


def _files_under(root: Path, skipped: list[tuple[Path, str]]) -> list[Path]:
    """Regular files under `root` (links to files included), sorted; what cannot be read goes to `skipped`."""
    found, folders, problems = [], [root], []
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = [e for e in it if not e.name.startswith(".")]
        except OSError as e:
            problems.append((folder, f"cannot list the folder ({describe_os_error(e)})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(path)
                elif entry.is_file():  # follows a link to a file
                    found.append(path)
                else:
                    problems.append((path, _why_not_a_file(path)))
            except OSError as e:
                problems.append((path, describe_os_error(e)))
    skipped += sorted(problems)
    return sorted(found)


def _why_not_a_file(path: Path) -> str:
    if path.is_symlink():
        if not path.exists():
            return "a broken symbolic link (its target is missing)"
        if path.is_dir():
            return "a link to a folder, not followed; name the folder itself to include it"
    if not path.exists():
        return "no such file or folder"
    return "not a regular file (a pipe, socket or device)"


def load_image(path: PathLike, transform, in_chans: int) -> torch.Tensor:
    """Read one image file with Pillow and apply `transform`; raise `DataError` saying why it failed."""
    from PIL import ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("L" if in_chans == 1 else "RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an image") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read (unknown format or not an image file)") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: corrupt or truncated image ({type(e).__name__}: {e})") from None
    return transform(im)
