"""What a run reports: `MetricsLog` (metrics.jsonl and TensorBoard), an epoch's row as one log line, and
the warnings for stages whose kept fraction missed its target."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from ..extras import MissingExtraError, require

_logger = logging.getLogger(__name__)


class MetricsLog:
    """Metrics as JSON lines (<output>/metrics.jsonl) and TensorBoard scalars; a no-op off rank 0."""

    def __init__(self, output: Path, enabled: bool, tensorboard: bool, purge_step: Optional[int] = None):
        """`purge_step`: TensorBoard drops events from this step on (a resume trains them again)."""
        self.enabled = enabled
        self.file = None
        self.writer = None
        if not enabled:
            return
        output.mkdir(parents=True, exist_ok=True)
        self.file = open(output / "metrics.jsonl", "a")
        if tensorboard:
            try:
                writer = require("torch.utils.tensorboard", "TensorBoard logs").SummaryWriter
            except MissingExtraError as e:  # metrics.jsonl still has every value
                _logger.warning("%s; training goes on without them (--no-tensorboard silences this)", e)
            else:
                self.writer = writer(str(output / "tb"), purge_step=purge_step)

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def format_row(row: dict) -> str:
    """An epoch's row as "name value, ..." (floats to 4 significant digits), for the log."""
    parts = []
    for k, v in row.items():
        if k == "epoch":
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts)


def keep_ratio_drift(
    row: dict, keep_ratio: float, tolerance: float = 0.05, targets: Optional[Sequence[float]] = None
) -> list[str]:
    """Warnings for stages whose kept fraction in an epoch of training missed its target by more than
    `tolerance`: rho^s, or `targets[s - 1]` when given (ConvNeXt / Swin: their own r_s; elastic
    training: the mean of rho^s over the ratios drawn).

    Inference keeps exactly int(N * rho^s) tokens per stage, so a model that kept more (or fewer) while
    training meets token sets it was not trained on. The usual cause is a prediction module that
    saturated at "keep every token": the straight-through Gumbel gradient then vanishes and the ratio
    loss can no longer move it (the stage keeps as much as the one before it).
    """
    out = []
    stage = 1
    while f"keep_ratio_stage{stage}" in row:
        realized = row[f"keep_ratio_stage{stage}"]
        target = targets[stage - 1] if targets is not None else keep_ratio**stage
        of = f"keep ratio {keep_ratio}^{stage}" if targets is None else "the mean of rho^s over the ratios drawn"
        if abs(realized - target) > tolerance:
            previous = row.get(f"keep_ratio_stage{stage - 1}", 1.0)
            stuck = " and keeps every token the stage before kept" if stage > 1 and realized >= previous - 1e-3 else ""
            out.append(
                f"stage {stage} kept {realized:.3f} of the patch tokens in the last epoch, against {target:.3f} "
                f"({of}){stuck}; at inference it keeps int(N * {target:.3f}) tokens, token sets "
                "the model was not trained on. Train longer or raise --ratio-weight; if a stage keeps everything, "
                "its prediction module saturated: lower --lr"
            )
        stage += 1
    return out
