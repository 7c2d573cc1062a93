"""`InferConfig`: how a model is applied at test time, the one home of its defaults.

`predict_instances`, `run_eval` and `Inferencer` take one; `distilpose predict` and `distilpose
eval` build one from their options. The protocol (flip test, flip mode, DARK, score use) decides
the numbers; device and batch size only where and how fast they are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distilpose.errors import BadConfigError

FLIP_MODES = ("corrected", "official")


@dataclass(frozen=True)
class InferConfig:
    """Test-time settings (the official protocol by default: flip test, no DARK)."""

    flip: bool = True  # flip test: the mirrored crop too, its answer averaged (paper Sec. 4.1)
    flip_mode: str = "corrected"  # students: "corrected" or "official" (see `topdown`)
    dark: bool = False  # teachers: DARK heatmap decoding instead of the quarter-pixel shift
    # None: from the checkpoint meta (False for a student trained without the confidence loss
    # "cs", whose untrained scores must not rank people); a bare model's scores are used.
    use_scores: bool | None = None
    # Beside the protocol: where and in what groups the crops are run.
    device: str | torch.device = "auto"  # "auto" (CUDA when available), "cpu", "cuda:1", ...
    batch_size: int = 32  # person crops per forward pass

    def __post_init__(self) -> None:
        if self.flip_mode not in FLIP_MODES:
            raise BadConfigError(f"flip_mode: got {self.flip_mode!r}; expected one of {FLIP_MODES}")
        if self.batch_size < 1:
            raise BadConfigError(f"batch_size: got {self.batch_size}; expected at least 1")
