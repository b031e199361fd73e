"""DynamicSpatial: dynamic spatial sparsification of hierarchical backbones (ConvNeXt, Swin).

The journal version of DynamicViT (Rao et al., T-PAMI 2023), written up in docs/spatial.md. The maps
keep every position, so the model stays a backbone for dense prediction; what changes is how much each
position costs in the third stage:
- before the blocks in `prune_locs` a `PredictionModule` scores every position of the map;
  decisions are not hierarchical: stage s keeps int(N * r_s) positions, r = (rho, rho - 0.2, ...);
- from the first predictor on every block is *adaptive*: its spatial mixer runs on the whole map,
  its feed-forward part (FFN) on the kept positions, a cheap `FastPath` (LN -> Linear) on the rest.

Training path (`forward_masked`): two full-size streams x1 (FFN) and x2 (fast path) and hard
straight-through Gumbel decisions m, with the authors' equations per block (see `_adaptive_masked`).
Inference path (`forward_pruned`): per predictor, the top-k positions go through the FFN, gathered,
the rest through the fast path; both are scattered back into the full map.

A `SpatialHost` (`dynamicvit.core.hosts`) says how one backbone family differs; this file holds the method.
Shapes: B batch, C width of stage 3, H x W its map, N = H * W positions.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..errors import ConfigError
from .base import DynamicViTOutput, PrunedOutput, SparseModel
from .hosts import SpatialHost, spatial_host_for
from .ops import PredictionModule, sample_keep, split_positions
from .settings import SpatialConfig

_logger = logging.getLogger(__name__)

class FastPath(nn.Module):
    """The cheap path of an adaptive block for positions the predictor did not keep:
    LayerNorm -> Linear(C, C) (-> times a layer-scale vector `gamma`, ConvNeXt), on channels-last (..., C)."""

    def __init__(self, dim: int, eps: float = 1e-6, layer_scale: Optional[float] = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale is not None else None
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(self.norm(x))
        return x if self.gamma is None else x * self.gamma


def _flat_rows(index: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Per-image positions (B, k) -> rows of the (B * N, C) view of a map, (B * k,).

    Whole rows are copied (index_select / index_copy_): on CPUs several times faster than
    `gather` / `scatter` with an index expanded over the channels.
    """
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * num_positions
    return (index + offsets).reshape(-1)


def dense_targets(teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense ConvNeXt/Swin teacher's (logits (B, K), final normalized map as tokens (B, N4, C4)),
    what `DynamicSpatialLoss` compares the student's with."""
    host = spatial_host_for(teacher)
    features = teacher.forward_features(images)
    return host.logits(features), host.distill_targets(features)


class DynamicSpatial(SparseModel):
    """A hierarchical backbone (ConvNeXt or Swin from timm) with dynamic spatial sparsification.

    In training mode `forward` runs the training path and returns a `DynamicViTOutput`; in eval mode
    it runs the inference path and returns the logits. `forward_features` and `forward_intermediates`
    return maps of the dense backbone's shapes (for detection / segmentation heads).
    """

    new_parameter_prefixes = ("predictors.", "fast_paths.")

    def __init__(
        self,
        backbone: nn.Module,
        keep_ratio: float = 0.7,
        prune_locs: Optional[Sequence[int]] = None,
        stage_ratios: Optional[Sequence[float]] = None,
        restart_streams: bool = True,
        model_name: Optional[str] = None,
        timm_kwargs: Optional[dict] = None,
    ):
        super().__init__()
        self.host: SpatialHost = spatial_host_for(backbone)
        self.backbone = backbone
        host = self.host
        locs = host.prune_locs() if prune_locs is None else prune_locs
        self.config = SpatialConfig.create(
            keep_ratio, locs, host.depth, self.num_patches, stage_ratios, restart_streams
        )
        C = host.embed_dim
        self.predictors = nn.ModuleList()
        for r in self.config.stage_ratios:
            # Start each predictor at its target ratio (see `PredictionModule.reset_parameters`).
            predictor = PredictionModule(C, min(max(r, 0.05), 0.95))
            predictor.in_conv[0].eps = host.predictor_norm_eps
            self.predictors.append(predictor)
        # One fast path per adaptive block, keyed by its block index in stage 3 (as the authors' keys are).
        self.fast_paths = nn.ModuleDict(
            {
                str(j): FastPath(C, host.ffn_norm_eps(j), host.fast_path_layer_scale)
                for j in range(self.prune_locs[0], host.depth)
            }
        )
        self._set_source(model_name, timm_kwargs)

    # -- properties ----------------------------------------------------------------------------

    @property
    def stage_ratios(self) -> tuple[float, ...]:
        return self.config.stage_ratios

    @property
    def grid_size(self) -> tuple[int, int]:
        """(H, W) of the stage-3 map at the model's image size."""
        return self.host.stage_grid()

    @property
    def num_patches(self) -> int:
        """N, positions of the stage-3 map at the model's image size."""
        H, W = self.grid_size
        return H * W

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    @property
    def patch_size(self) -> tuple[int, int]:
        """Image pixels per position of the stage-3 map (its stride), for drawing decisions."""
        r = int(self.backbone.feature_info[self.host.sparse_stage]["reduction"])
        return r, r

    def keep_counts(self, num_positions: Optional[int] = None) -> tuple[int, ...]:
        """Positions on the full path after each predictor, int(N * r_s)."""
        return self.config.keep_counts(self.num_patches if num_positions is None else num_positions)

    def set_keep_ratio(self, keep_ratio: float, stage_ratios: Optional[Sequence[float]] = None) -> None:
        """Change how many positions take the full path; no retraining needed."""
        self.config = SpatialConfig.create(
            keep_ratio, self.prune_locs, self.host.depth, self.num_patches, stage_ratios, self.config.restart_streams
        )

    def at_keep_ratio(self, keep_ratio: float, stage_ratios: Optional[Sequence[float]] = None) -> "DynamicSpatial":
        """Another DynamicSpatial at `keep_ratio` sharing this one's backbone, predictors and fast paths."""
        twin = DynamicSpatial(
            self.backbone, keep_ratio, self.prune_locs, stage_ratios, self.config.restart_streams,
            self.model_name, self.timm_kwargs,
        )
        twin.predictors, twin.fast_paths = self.predictors, self.fast_paths
        return twin

    def settings(self) -> dict:
        """What is needed to rebuild this model before loading weights (stored in checkpoints)."""
        return {
            "kind": "dynamicvit",
            "family": self.host.family,
            "model_name": self.model_name,
            "timm_kwargs": self.timm_kwargs,
            "keep_ratio": self.keep_ratio,
            "prune_locs": list(self.prune_locs),
            "stage_ratios": list(self.stage_ratios),
            "restart_streams": self.config.restart_streams,
        }

    def extra_repr(self) -> str:
        return (
            f"keep_ratio={self.keep_ratio}, prune_locs={self.prune_locs}, stage_ratios={self.stage_ratios}, "
            f"keep_counts={self.keep_counts()} of {self.num_patches}"
        )

    # -- the stages ----------------------------------------------------------------------------

    def _run(
        self,
        images: torch.Tensor,
        masked: bool,
        decisions: Optional[Sequence[torch.Tensor]] = None,
        kept: Optional[Sequence[torch.Tensor]] = None,
        return_scores: bool = False,
        num_stages: int = 4,
    ) -> tuple[list[torch.Tensor], dict]:
        """Stem and stages; stage 3 sparsified. Returns (each stage's output map, what stage 3 decided)."""
        host = self.host
        host.check_images(images)
        x = host.stem(images)
        maps, record = [], {}
        for i, stage in enumerate(host.stages[:num_stages]):
            if i == host.sparse_stage:
                x = stage.downsample(x)
                x, record = self._sparse_stage(x, masked, decisions, kept, return_scores)
            else:
                x = stage(x)
            maps.append(x)
        return maps, record

    def _sparse_stage(
        self,
        x: torch.Tensor,
        masked: bool,
        decisions: Optional[Sequence[torch.Tensor]],
        kept: Optional[Sequence[torch.Tensor]],
        return_scores: bool,
    ) -> tuple[torch.Tensor, dict]:
        """The blocks of stage 3, one loop for both paths.

        Training path: streams (x1, x2) and a decision map m in the host's layout; at each predictor
        the merged map x1 * m + x2 * (1 - m) is scored and m replaced. Inference path: one map and the
        (keep, rest) position indices of the latest predictor.
        """
        host = self.host
        H, W = (x.shape[-2:] if host.layout == "NCHW" else x.shape[1:3])
        B, N = x.shape[0], H * W
        stage_at = {loc: s for s, loc in enumerate(self.prune_locs)}
        counts = self.keep_counts(N)
        if min(counts) < 1:  # images smaller than the model was built for (ConvNeXt takes any size)
            self.config.validate(host.depth, N)
        x1 = x2 = m = None  # training path
        keep = rest = None  # inference path
        record: dict[str, list] = {"decisions": [], "kept": [], "scores": []}
        for j, blk in enumerate(host.blocks):
            s = stage_at.get(j)
            if s is not None:
                if masked and m is not None:
                    x = x1 * m + x2 * (1 - m)
                elif not masked and s == 0 and host.layout == "NCHW":
                    # Channels-last from here on: gathering NHWC rows is then a view, not a copy per block.
                    x = x.contiguous(memory_format=torch.channels_last)
                tokens = host.to_nhwc(x).reshape(B, N, -1)  # (B, N, C)
                predictor = self.predictors[s]
                if masked:
                    if m is None or self.config.restart_streams:
                        x1 = x2 = x
                    if decisions is not None:
                        d = decisions[s].reshape(B, N).to(x.dtype)
                    else:
                        d = sample_keep(predictor(tokens), tokens.new_ones(B, N, 1))[..., 0]  # (B, N)
                    record["decisions"].append(d)
                    m = host.from_nhwc(d.reshape(B, H, W, 1))
                else:
                    if kept is not None:
                        score = torch.zeros(B, N, device=x.device).scatter(1, kept[s], 1.0)
                        num_keep = kept[s].shape[1]
                    else:
                        if return_scores:
                            log_p = predictor(tokens)[..., 0]  # (B, N)
                            record["scores"].append(log_p)
                            score = log_p
                        else:
                            score = predictor.keep_score(tokens)
                        num_keep = counts[s]
                    keep, rest = split_positions(score, num_keep)
                    record["kept"].append(keep)
            if j < self.prune_locs[0]:
                x = blk(x)
            elif masked:
                x1, x2 = self._adaptive_masked(j, x1, x2, m)
            else:
                x = self._adaptive_pruned(j, x, keep, rest)
        if masked:
            x = x1 * m + x2 * (1 - m)
        return x, record

    def _adaptive_masked(
        self, j: int, x1: torch.Tensor, x2: torch.Tensor, m: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adaptive block j on the two streams (the authors' training equations, docs/spatial.md):

            y = mix(x1 * m + x2 * (1 - m))
            a = y * m + x1 * (1 - m);   b = y * (1 - m) + x2 * m
            x1 <- r1 + drop_path(FFN(a));   x2 <- r2 + drop_path(fast(b))

        with (r1, r2) = (y, y) when the mixer carries its own residual (Swin; y includes it) and
        (x1, x2) otherwise (ConvNeXt). m is (B, 1, H, W) or (B, H, W, 1), 1 = full path.
        """
        host = self.host
        y = host.mix(j, x1 * m + x2 * (1 - m))
        a = y * m + x1 * (1 - m)
        b = y * (1 - m) + x2 * m
        r1, r2 = (y, y) if host.mixer_has_residual else (x1, x2)
        drop_path = host.drop_path(j)
        fa = host.from_nhwc(host.ffn(j, host.to_nhwc(a)))
        fb = host.from_nhwc(self.fast_paths[str(j)](host.to_nhwc(b)))
        return r1 + drop_path(fa), r2 + drop_path(fb)

    def _adaptive_pruned(self, j: int, x: torch.Tensor, keep: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """Adaptive block j at inference: the mixer on the whole map, the FFN on the kept positions
        (B, k), the fast path on the rest (B, N - k), both added into the residual by row.

        NHWC rows are gathered and added back with index_select / index_add: the residual is copied
        once and no full-size output map is built (on CPUs the map-sized passes are a visible share of
        a block whose FFN runs on few positions). ConvNeXt maps are channels-last here (see
        `_sparse_stage`), so the NHWC rows of an NCHW map are a view too.
        """
        host = self.host
        y = host.mix(j, x)
        residual = y if host.mixer_has_residual else x
        drop_path = host.drop_path(j)
        t = host.to_nhwc(y)
        B, H, W, C = t.shape
        t = t.reshape(B * H * W, C)  # a view for NHWC maps and channels-last NCHW ones, else a copy
        rows_keep, rows_rest = _flat_rows(keep, H * W), _flat_rows(rest, H * W)
        full = host.ffn(j, t.index_select(0, rows_keep))
        fast = self.fast_paths[str(j)](t.index_select(0, rows_rest))
        if self.training and not isinstance(drop_path, nn.Identity):  # per-image drop path: whole maps
            out = torch.empty_like(t).index_copy_(0, rows_keep, full).index_copy_(0, rows_rest, fast)
            return residual + drop_path(host.from_nhwc(out.view(B, H, W, C)))
        rows = host.to_nhwc(residual).reshape(B * H * W, C)
        out = rows.index_add(0, rows_keep, full).index_add_(0, rows_rest, fast)
        return host.from_nhwc(out.view(B, H, W, C))

    # -- the two paths -------------------------------------------------------------------------

    def forward_masked(
        self, images: torch.Tensor, decisions: Optional[Sequence[torch.Tensor]] = None
    ) -> DynamicViTOutput:
        """Training path: two full-size streams, hard straight-through Gumbel decisions.

        Args:
            images: (B, 3, H, W).
            decisions: optional per-predictor decisions (B, N) (1 = full path) instead of sampling;
                used to compare with the inference path.

        Returns:
            logits (B, K); tokens: the final normalized feature map (B, N4, C4) for feature
            distillation over all positions; decisions: per predictor (B, N) with straight-through
            gradients; mask: the last decision, detached.
        """
        maps, record = self._run(images, masked=True, decisions=decisions)
        features = self.host.final_norm(maps[-1])
        d = record["decisions"]
        return DynamicViTOutput(
            logits=self.host.logits(features),
            tokens=self.host.distill_targets(features),
            decisions=d,
            mask=d[-1].detach(),
        )

    def forward_pruned(
        self,
        images: torch.Tensor,
        return_scores: bool = False,
        kept: Optional[Sequence[torch.Tensor]] = None,
    ) -> PrunedOutput:
        """Inference path: per predictor, the top int(N * r_s) positions take the full path.

        Args:
            images: (B, 3, H, W).
            return_scores: also return each predictor's keep log-probabilities, (B, N).
            kept: optional per-predictor kept positions (B, k_s) instead of the predictors' top-k.

        Returns:
            logits; kept_indices: per predictor, the positions (row-major in the stage-3 map) that
            took the full path, (B, k_s); keep_scores when asked for.
        """
        if images.shape[0] == 0:
            return self.empty_output(images, return_scores)
        maps, record = self._run(images, masked=False, kept=kept, return_scores=return_scores)
        logits = self.host.logits(self.host.final_norm(maps[-1]))
        return PrunedOutput(logits, record["kept"], record["scores"] if return_scores else None)

    # -- backbone interface (dense prediction) -------------------------------------------------

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """What the dense backbone's `forward_features` returns, of its shape (training path in
        training mode, with sampled decisions; inference path otherwise)."""
        maps, _ = self._run(images, masked=self.training)
        return self.host.final_norm(maps[-1])

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.backbone.forward_head(features, pre_logits=pre_logits)

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """timm's `forward_intermediates`: the stage maps (NCHW, the dense model's shapes) and,
        unless `intermediates_only`, the final features.

        Args:
            indices: the last n stages if an int, all if None, else the stages to return.
            norm: apply the final norm to the last stage's map.
            stop_early: stop after the last stage asked for.
        """
        from timm.models._features import feature_take_indices

        if output_fmt != "NCHW":
            raise ConfigError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        num = len(self.host.stages)
        take, max_index = feature_take_indices(num, indices)
        maps, _ = self._run(images, masked=self.training, num_stages=max_index + 1 if stop_early else num)
        last = num - 1
        out = []
        for i in take:
            x = self.host.final_norm(maps[i]) if norm and i == last else maps[i]
            out.append(self.host.to_nchw(x).contiguous())
        if intermediates_only:
            return out
        final = self.host.final_norm(maps[-1]) if len(maps) == num else maps[-1]
        return final, out
