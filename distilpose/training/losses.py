"""Training losses: the paper's distillation objective (Eq. 7) and the teacher's heatmap loss.

``L = L_reg + a1 L_KT + a2 L_VT + a3 L_SH + a4 L_CS`` with the official weights
``a1 = a2 = 5e-4, a3 = 1, a4 = 1e-2``. One term beyond the paper, ``rle`` (Residual
Log-likelihood Estimation, `distilpose.training.rle`), is the teacher-free regression objective
of RLE / SDPose-Reg: alone (``--losses rle``) it trains a student without a teacher, and it
mixes with the distillation terms like ``reg``; so does ``dsnt`` (DSNT's map regularizer, for
students whose coords are a soft-argmax). Every loss module returns a dict: ``"loss"`` is the
weighted sum to backpropagate; each ``"loss_<name>"`` is the UNWEIGHTED value of one term,
detached, for logging (so curves of different runs compare even when weights differ).

Coordinates follow :mod:`distilpose.data.codecs`: normalized crop coordinates, heatmap position
``u * W_hm``. All terms are computed in float32 (also under AMP) and are vectorized over samples
and joints.

Every mean is a sum over a count (`distilpose.training.distributed.global_mean`): in one process
it is the plain mean; in a multi-process run the count is the global batch's, so R ranks x B samples
give the loss and gradients of one process with R x B. Samples with `targets["valid"] = False`
(padding of a short last batch under DDP) add to no sum and no count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from distilpose.data.codecs import Size, heatmap_values_at, simulated_heatmaps
from distilpose.errors import BadConfigError
from distilpose.geometry import PAPER, Geometry
from distilpose.training.distributed import global_mean, global_total
from distilpose.training.rle import RLELoss

if TYPE_CHECKING:
    from distilpose.models import StudentOutput


def parse_losses(spec: str) -> dict[str, float]:
    """Parse a ``--losses`` string into ``{name: weight}``.

    ``"reg,kt,vt,sh,cs"`` enables terms with their default weights, ``"reg=1,kt=1e-3"`` sets
    weights, and both forms mix (``"reg,sh=0.5"``). ``"reg"`` alone is the undistilled baseline.
    Any non-empty subset is accepted; an unknown name, a repeated name, or a weight that is not a
    finite number >= 0 raises :class:`BadConfigError` naming the item.
    """
    items = [item.strip() for item in str(spec).split(",") if item.strip()]
    if not items:
        raise BadConfigError(
            f"losses: expected a comma-separated subset of {tuple(LOSS_TERMS)}, got {spec!r}"
        )
    weights: dict[str, float] = {}
    for item in items:
        name, sep, value = (part.strip() for part in item.partition("="))
        if name not in LOSS_TERMS:
            raise BadConfigError(
                f"losses: unknown loss {item!r}; expected one of {tuple(LOSS_TERMS)}"
            )
        if name in weights:
            raise BadConfigError(f"losses: {name!r} given twice in {spec!r}")
        if not sep:
            weights[name] = LOSS_TERMS[name].weight
            continue
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise BadConfigError(f"losses: weight of {item!r} must be a finite number >= 0")
        weights[name] = weight
    return weights


def _check_weights(weights: dict[str, float] | str) -> dict[str, float]:
    if isinstance(weights, str):
        return parse_losses(weights)
    if not weights:
        raise BadConfigError(f"losses: expected at least one of {tuple(LOSS_TERMS)}, got none")
    out = {}
    for name, weight in weights.items():
        if name not in LOSS_TERMS:
            raise BadConfigError(
                f"losses: unknown loss {name!r}; expected one of {tuple(LOSS_TERMS)}"
            )
        try:
            value = float(weight)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise BadConfigError(f"losses: weight of {name!r} must be a finite number >= 0")
        out[name] = value
    return out


def _inside_unit(coords: torch.Tensor) -> torch.Tensor:
    """``[B, K, 2] -> [B, K]``: True where both normalized coordinates lie in ``[0, 1]``."""
    return ((coords >= 0) & (coords <= 1)).all(-1)


def regression_loss(
    coords: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    """``L_reg``: Smooth-L1 on normalized coordinates over the joints that count.

    A joint counts when its target weight is > 0 and its predicted position lies inside the crop
    (paper Sec. 3.3: joints invisible in the target or the prediction are filtered). The loss is
    the weighted mean over the counted coordinates (0 when none counts). ``beta = 1`` is torch's
    and the official default; on normalized coordinates (``|d| <= 1``) it acts as ``d^2 / 2``.
    The official MMPose loss instead averages over all ``B * K * 2`` entries and does not filter
    predictions; with a sigmoid head predictions are always inside, so only the scale differs.

    Args:
        coords, target: ``[B, K, 2]`` normalized. weights: ``[B, K]``.
    """
    counted = (weights > 0) & _inside_unit(coords.detach())  # [B, K]
    per_coord = F.smooth_l1_loss(coords, target, reduction="none", beta=beta)  # [B, K, 2]
    w = (weights * counted)[..., None]
    return global_mean((per_coord * w).sum(), 2 * counted.sum())


def simulated_heatmap_mask(
    coords: torch.Tensor, sigmas: torch.Tensor, heatmap_size: Size
) -> torch.Tensor:
    """``[B, K]``: True where a simulated Gaussian's 3-sigma box overlaps the heatmap.

    The official check, MSRA target generation's "any part of the Gaussian is in bounds": the box
    ``[mu - 3 sigma, mu + 3 sigma + 1]`` must start before the map's far edge and end after 0.
    Predictions inside the crop always pass it; it only drops predictions far outside.
    """
    wh, hh = heatmap_size
    mu = coords.detach() * coords.new_tensor([wh, hh])
    radius = 3 * sigmas.detach().expand_as(coords)
    ul, br = mu - radius, mu + radius + 1
    size = coords.new_tensor([wh, hh])
    return ((ul < size) & (br >= 0)).all(-1)


def _valid(targets: dict, like: torch.Tensor) -> torch.Tensor:
    """[N] float: 1 for the batch's real samples, 0 for DDP padding (`targets["valid"]`)."""
    valid = targets.get("valid")
    if valid is None:
        return like.new_ones(like.shape[0])
    return torch.as_tensor(valid).to(device=like.device, dtype=torch.float32).reshape(-1)


class DistillationLoss(nn.Module):
    """The student's objective, paper Eq. 7, with any subset of its terms.

    Terms (``N`` samples, ``K`` joints, ``P`` patches, ``D`` token width):

    - ``reg``: :func:`regression_loss` against the ground truth (``targets["coords"]``,
      ``targets["weights"]``).
    - ``kt`` / ``vt``: MSE (mean over all elements) between the student's and the teacher's
      keypoint tokens ``[N, K, D]`` / visual tokens ``[N, P, D]``.
    - ``sh``: MSE between the simulated heatmaps (Eq. 2, from the predicted coords and sigmas) and
      the raw teacher heatmaps ``[N, K, H, W]``, as MMPose's JointsMSELoss with per-sample and
      per-joint weights ``w = target weight x 3-sigma in-bounds mask``:
      ``mean_{n,k}( mean_{pixels} ((S - T) * w)^2 )``. With ``official_sh_weight=True`` the
      official code's broadcasting quirk is reproduced instead: its ``[N, 1, 1]`` weight times an
      ``[N, H*W]`` map makes every sample's error weighted by the batch mean of ``w^2`` per joint,
      so per-sample masks are not applied.
    - ``rle``: RLE's negative log-likelihood of the ground truth under the student's predicted
      coords and sigmas (`RLELoss`, MMPose's residual Laplace form, its sigma the sigmoid of the
      student's raw sigma channels ``sigma_logits [N, K, 2]``), its flow trained with the
      student: the flow's parameters are this module's (``self.rle``), so the task holding this
      loss is trained, saved and resumed with the model (`student_train.train.StudentTask`).
    - ``dsnt``: DSNT's Jensen-Shannon regularizer on a soft-argmax student's maps
      (``heatmap_logits [N, K, H, W]``) against a Gaussian at the ground truth (`_dsnt_term`):
      teacher-free, like ``reg`` and ``rle``, and mixes with every term.
    - ``cs``: L1 between the raw predicted score and the teacher heatmap's value at
      ``round(coords * (W, H))`` (clipped), weighted by the target weight, as the official
      ``ScoreLoss``; the teacher value is replaced by 0 when the prediction lies outside the crop
      (so such scores are pushed to 0), and no gradient reaches the coordinates.

    Args:
        weights: ``{name: weight}`` for the enabled terms (or a ``parse_losses`` string).
        geometry: the student's sizes; its ``heatmap_size`` ``(W_hm, H_hm)`` is the teacher
            heatmaps' (``sh``, ``cs``).
        official_sh_weight: reproduce the official batch-averaged ``sh`` weight (compatibility).
        reg_beta: Smooth-L1 beta of ``reg`` in normalized units.
    """

    def __init__(
        self,
        weights: dict[str, float] | str,
        geometry: Geometry = PAPER,
        official_sh_weight: bool = False,
        reg_beta: float = 1.0,
    ) -> None:
        super().__init__()
        self.weights = _check_weights(weights)
        self.heatmap_size = geometry.heatmap_size
        self.official_sh_weight = official_sh_weight
        self.reg_beta = reg_beta
        # RLE's flow: parameters trained with the student's (only when the term is on)
        self.rle = RLELoss() if "rle" in self.weights else None

    def extra_repr(self) -> str:
        return f"weights={self.weights}, official_sh_weight={self.official_sh_weight}"

    def forward(self, student: StudentOutput, targets: dict) -> dict[str, torch.Tensor]:
        """Compute the enabled terms.

        Args:
            student: a ``StudentOutput`` (coords ``[N, K, 2]``, scores ``[N, K]``, sigmas
                ``[N, K, 2]``, keypoint_tokens ``[N, K, D]``, visual_tokens ``[N, P, D]``).
            targets: ``"coords" [N, K, 2]`` normalized ground truth and ``"weights" [N, K]``;
                with distillation terms also the teacher's ``"heatmaps" [N, K, H, W]``,
                ``"keypoint_tokens" [N, K, D]`` and ``"visual_tokens" [N, P, D]``.

        Returns:
            ``{"loss": weighted sum, "loss_<name>": unweighted term (detached), ...}``.
        """
        inputs = LossInputs(self, student, targets)
        # the table's order (the paper's), so the weighted sum adds up in a fixed order
        terms = {
            name: term.compute(inputs, name)
            for name, term in LOSS_TERMS.items()
            if name in self.weights
        }
        total = sum(self.weights[name] * value for name, value in terms.items())
        out = {"loss": total}
        out.update({f"loss_{name}": value.detach() for name, value in terms.items()})
        return out


class LossInputs:
    """What the terms of one `DistillationLoss` call read: the student's outputs, the batch's
    targets as float32 tensors, and the per-joint weights with DDP padding zeroed."""

    def __init__(self, loss: DistillationLoss, student: StudentOutput, targets: dict) -> None:
        self.loss, self.student, self.targets = loss, student, targets
        self.coords = student.coords.float()  # [N, K, 2]
        self.device = self.coords.device
        self.valid = _valid(targets, self.coords)  # [N] 1.0 for real samples, 0.0 for padding
        weights = self.target("weights").reshape(self.coords.shape[:2])
        self.weights = weights * self.valid[:, None]  # [N, K]
        self.samples = self.valid.sum()

    def target(self, key: str) -> torch.Tensor:
        if key not in self.targets:
            raise BadConfigError(f"targets: missing {key!r}, needed by the enabled losses")
        return torch.as_tensor(self.targets[key]).to(device=self.device, dtype=torch.float32)

    @functools.cached_property
    def heatmaps(self) -> torch.Tensor:
        """The teacher's ``[N, K, H, W]`` heatmaps, checked against the student's sizes."""
        heatmaps = self.target("heatmaps")
        wh, hh = self.loss.heatmap_size
        if heatmaps.dim() != 4 or heatmaps.shape != (*self.coords.shape[:2], hh, wh):
            raise BadConfigError(
                f"targets['heatmaps']: expected [N, K, {hh}, {wh}] for N, K = "
                f"{tuple(self.coords.shape[:2])}, got {tuple(heatmaps.shape)}"
            )
        return heatmaps


# ---- the terms: each a function (inputs, its name) -> scalar, listed in LOSS_TERMS ------------


def _reg_term(x: LossInputs, name: str) -> torch.Tensor:
    return regression_loss(x.coords, x.target("coords"), x.weights, beta=x.loss.reg_beta)


def _rle_term(x: LossInputs, name: str) -> torch.Tensor:
    """RLE on the student's predicted sigma channels, as MMPose reads them: sigma = sigmoid of
    the raw channel, in normalized crop units like the coords. (Read as `sigmas`, softplus in
    heatmap px, a fresh student's sigma is ~0.7 px = 0.03 of the crop, its residuals ~0.2: the
    flow's tails then give an NLL ~70 whose gradients fill Adam's second moments, and the coords
    stay at the mean pose for hundreds of steps; MMPose's sigmoid starts at 0.5.)"""
    logits = x.student.sigma_logits
    if logits is None:
        raise BadConfigError(f"{name} needs the student's sigma logits; the student has none")
    # float32 also under AMP: the flow's log-determinant sums 6 couplings' scales
    with torch.autocast(x.device.type, enabled=False):
        sigmas = torch.sigmoid(logits.float())  # [N, K, 2]
        return x.loss.rle(x.coords, sigmas, x.target("coords"), x.weights)


# DSNT's target: a Gaussian of 1 heatmap px around the ground truth (Nibali et al. 2018, Sec. 4)
DSNT_SIGMA = 1.0


def _dsnt_term(x: LossInputs, name: str) -> torch.Tensor:
    """DSNT's regularizer (Nibali et al., "Numerical Coordinate Regression with Convolutional
    Neural Networks", 2018): the Jensen-Shannon divergence between the student's spatial
    distribution (softmax of its similarity maps ``[N, K, H, W]``, whose mean is the predicted
    position) and a normalized Gaussian of `DSNT_SIGMA` px at the ground truth. The soft-argmax
    alone only constrains the mean, so a small student's map can stay a broad blob at the mean
    pose; this term gives every pixel of the map a target, from the labels alone. Joints count
    where their weight is > 0 and the ground truth lies inside the crop; mean over them."""
    logits = x.student.heatmap_logits
    if logits is None:
        raise BadConfigError(f"{name} needs the student's heatmap logits; the student has none")
    n, k, hh, wh = logits.shape
    logp = F.log_softmax(logits.float().reshape(n, k, -1), dim=-1)  # [N, K, H*W]
    gt = x.target("coords")
    gauss = simulated_heatmaps(gt, gt.new_full(gt.shape, DSNT_SIGMA), (wh, hh)).reshape(n, k, -1)
    q = gauss / gauss.sum(-1, keepdim=True).clamp(min=1e-12)  # [N, K, H*W], sums to 1
    p = logp.exp()
    log_m = (0.5 * (p + q)).clamp(min=1e-30).log()
    js = 0.5 * (p * (logp - log_m) + torch.xlogy(q, q) - q * log_m).sum(-1)  # [N, K]
    w = x.weights * _inside_unit(gt)
    return global_mean((js * w).sum(), (w > 0).sum())


def _token_term(x: LossInputs, name: str) -> torch.Tensor:
    """MSE between the student's and the teacher's tokens named by the term's one target."""
    (attr,) = LOSS_TERMS[name].targets
    mine = getattr(x.student, attr)
    if mine is None:  # DeepPose: nothing to match the teacher's tokens with
        raise BadConfigError(f"{name} needs {attr.replace('_', ' ')}; the student has none")
    teacher = x.target(attr)
    mine = mine.float()
    if mine.shape != teacher.shape:
        raise BadConfigError(
            f"targets[{attr!r}]: teacher shape {tuple(teacher.shape)} differs from "
            f"the student's {tuple(mine.shape)}; set the model's teacher_dim"
        )
    sq = (mine - teacher).pow(2) * x.valid.reshape(-1, *([1] * (mine.dim() - 1)))
    return global_mean(sq.sum(), x.samples * mine[0].numel())


def _sh_term(x: LossInputs, name: str) -> torch.Tensor:
    coords, sigmas, heatmaps, size = (
        x.coords,
        x.student.sigmas.float(),
        x.heatmaps,
        x.loss.heatmap_size,
    )
    simulated = simulated_heatmaps(coords, sigmas, size)  # [N, K, H, W]
    in_bounds = simulated_heatmap_mask(coords, sigmas, size).float()  # [N, K]
    w = x.weights * in_bounds  # weights are already 0 for padding samples
    per_sample = heatmaps[0].numel()  # K * H * W
    if not x.loss.official_sh_weight:
        err = (simulated - heatmaps) * w[..., None, None]
        return global_mean(err.pow(2).sum(), x.valid.sum() * per_sample)
    # Official: the simulated map is zeroed by the bounds mask, and the error of every sample
    # is weighted by the batch mean of w^2 for its joint (a global-batch mean, a constant).
    err = (simulated * in_bounds[..., None, None] - heatmaps).pow(2)
    err = (err * x.valid[:, None, None, None]).sum(dim=(0, 2, 3))  # [K]
    w2 = global_total(w.pow(2).sum(0)) / global_total(x.valid.sum()).clamp(min=1)  # [K]
    return global_mean((err * w2).sum(), x.valid.sum() * per_sample)


def _cs_term(x: LossInputs, name: str) -> torch.Tensor:
    coords = x.coords
    scores = x.student.scores.float().reshape(coords.shape[:2])  # also the official [N, K, 1]
    # Values at the rounded prediction; rounding stops gradients into coords by itself, and
    # the teacher heatmap is a constant.
    teacher = heatmap_values_at(x.heatmaps, coords.detach()) * _inside_unit(coords.detach())
    err = ((scores - teacher) * x.weights).abs().sum()
    return global_mean(err, x.samples * scores.shape[1])


@dataclass(frozen=True)
class LossTerm:
    """One term of the student's objective."""

    weight: float  # the official weight (a1..a4; 1 for reg and MMPose's RLE)
    targets: tuple[str, ...]  # the teacher outputs it reads (store.schema.TEACHER_OUTPUTS)
    compute: Callable[[LossInputs, str], torch.Tensor]  # (inputs, the term's name) -> scalar
    paper: bool = True  # a term of Eq. 7: in the default `--losses`
    sigmas: bool = False  # reads the student's predicted sigmas (`ModelConfig.has_sigmas`)
    maps: bool = False  # reads the student's heatmap logits (`ModelConfig.has_maps`)


# The one table of loss terms, Eq. 7's in the paper's order, then the others: adding a term is a
# row here and its function above. Names, default weights, the default `--losses`, the store
# arrays a run reads and whether a term needs a teacher are all derived from it.
LOSS_TERMS: dict[str, LossTerm] = {
    "reg": LossTerm(1.0, (), _reg_term),
    "kt": LossTerm(5e-4, ("keypoint_tokens",), _token_term),
    "vt": LossTerm(5e-4, ("visual_tokens",), _token_term),
    "sh": LossTerm(1.0, ("heatmaps",), _sh_term, sigmas=True),
    "cs": LossTerm(1e-2, ("heatmaps",), _cs_term),
    "rle": LossTerm(1.0, (), _rle_term, paper=False, sigmas=True),
    "dsnt": LossTerm(1.0, (), _dsnt_term, paper=False, maps=True),
}
LOSS_NAMES = tuple(LOSS_TERMS)
DEFAULT_WEIGHTS = {name: term.weight for name, term in LOSS_TERMS.items()}
# Eq. 7, every term at its official weight: "reg,kt,vt,sh,cs"
DEFAULT_LOSSES = ",".join(name for name, term in LOSS_TERMS.items() if term.paper)
# the terms that read no teacher output: what a student trains on without a store or a teacher
TEACHER_FREE = tuple(name for name, term in LOSS_TERMS.items() if not term.targets)


class HeatmapLoss(nn.Module):
    """The teacher's loss: MMPose 0.x JointsMSELoss.

    ``mean_k( MSE(pred[:, k] * w[:, k], target[:, k] * w[:, k]) )`` with per-sample, per-joint
    target weights ``w [N, K]``, i.e. the mean over samples, joints and pixels of
    ``((pred - target) * w)^2``. (MMPose 0.x has no factor 1/2, unlike the original HRNet code.)

    Args:
        use_target_weight: weight joints by their target weights (invisible joints weigh 0).
    """

    def __init__(self, use_target_weight: bool = True) -> None:
        super().__init__()
        self.use_target_weight = use_target_weight

    def forward(
        self,
        heatmaps: torch.Tensor,
        target: torch.Tensor,
        target_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``heatmaps``, ``target``: ``[N, K, H, W]``; ``target_weights``: ``[N, K]``."""
        pred = heatmaps.float()
        if pred.shape != target.shape:
            raise BadConfigError(
                f"target: expected heatmaps of shape {tuple(pred.shape)}, got {tuple(target.shape)}"
            )
        err = pred - target.to(pred)
        if self.use_target_weight:
            if target_weights is None:
                raise BadConfigError("target_weights: required when use_target_weight=True")
            w = target_weights.to(pred).reshape(pred.shape[:2])
            err = err * w[..., None, None]
        loss = global_mean(err.pow(2).sum(), err.numel())
        return {"loss": loss, "loss_heatmap": loss.detach()}
