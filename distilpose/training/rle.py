"""Residual Log-likelihood Estimation (RLE; Li et al., "Human Pose Regression with Residual
Log-likelihood Estimation", ICCV 2021), as MMPose's ``RLELoss`` formulates it.

The regression residual of each joint, scaled by the predicted sigma, ``x = (mu - gt) / sigma``,
is modelled by a learned density. With ``residual=True`` (MMPose's default) that density is a
fixed Laplace ``Q`` corrected by a normalizing flow ``G``: the negative log-likelihood per joint
and axis is

    log sigma - log G(x) + log(2 sigma) + |x|        (Laplace Q, MMPose's default ``q_dis``)

(or ``log(sigma sqrt(2 pi)) + x^2 / 2`` for a Gaussian ``Q``), where ``log G`` is the flow's
log density of the 2-D residual, shared by both axes as in MMPose. The flow is MMPose's
``RealNVP``: 3 pairs of affine coupling layers on 2-D points, each with scale and translation
nets of two hidden layers of 64 units (LeakyReLU; tanh on the scale), initialised with
``xavier_uniform(gain=0.01)`` weights (biases at torch's default), so that ``G`` starts near a
standard normal.
The flow's parameters train with the student's (they live in this module).

Sigmas here are in the units of the coordinates they scale (normalized crop coordinates). As in
MMPose, the caller (`losses`' ``rle`` term) makes them the sigmoid of the student's raw sigma
channels, not the softplus in heatmap pixels the student's ``sigmas`` (and ``sh``) use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distilpose.training.distributed import global_mean

_HIDDEN = 64  # MMPose's RealNVP width
_COUPLINGS = 6  # 3 pairs of alternating masks


def _coupling_net(last: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(2, _HIDDEN), nn.LeakyReLU(), nn.Linear(_HIDDEN, _HIDDEN)]
    layers += [nn.LeakyReLU(), nn.Linear(_HIDDEN, 2)]
    if last is not None:
        layers.append(last)
    return nn.Sequential(*layers)


class RealNVP(nn.Module):
    """A density on R^2 by affine couplings of a standard normal (Dinh et al., 2017).

    ``log_prob(x)`` maps ``x [M, 2]`` back to the normal's space through every coupling, in
    reverse, and adds the log-determinant of that map: an exact, normalized log density.
    """

    def __init__(self) -> None:
        super().__init__()
        masks = torch.tensor([[0.0, 1.0], [1.0, 0.0]] * (_COUPLINGS // 2))
        self.register_buffer("masks", masks)  # [C, 2]: the coordinate each layer keeps
        self.scales = nn.ModuleList(_coupling_net(nn.Tanh()) for _ in range(_COUPLINGS))
        self.shifts = nn.ModuleList(_coupling_net(None) for _ in range(_COUPLINGS))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, gain=0.01)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``[M]`` log density of the points ``x [M, 2]``."""
        log_det = x.new_zeros(x.shape[0])
        z = x
        for i in reversed(range(_COUPLINGS)):
            keep = self.masks[i]
            z_kept = keep * z
            s = self.scales[i](z_kept) * (1 - keep)
            t = self.shifts[i](z_kept) * (1 - keep)
            z = (1 - keep) * (z - t) * torch.exp(-s) + z_kept
            log_det = log_det - s.sum(dim=1)
        normal = -0.5 * z.pow(2).sum(dim=1) - math.log(2 * math.pi)
        return normal + log_det


class RLELoss(nn.Module):
    """The RLE objective of regressed joints, masked and averaged like ``reg``.

    Args:
        residual: model the density as a fixed ``Q`` corrected by the flow (MMPose's default);
            ``False`` uses the flow alone.
        q_distribution: ``"laplace"`` (MMPose's default) or ``"gaussian"``.
    """

    def __init__(self, residual: bool = True, q_distribution: str = "laplace") -> None:
        super().__init__()
        if q_distribution not in ("laplace", "gaussian"):
            raise ValueError(f"q_distribution: expected laplace or gaussian, got {q_distribution}")
        self.residual = residual
        self.q_distribution = q_distribution
        self.flow = RealNVP()

    def extra_repr(self) -> str:
        return f"residual={self.residual}, q_distribution={self.q_distribution!r}"

    def forward(
        self,
        coords: torch.Tensor,
        sigmas: torch.Tensor,
        gt: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """Negative log-likelihood, weighted, over the weighted joints' axes (a scalar).

        MMPose divides the weighted sum by the batch size; here it is divided by the count of
        weighted joint axes, as ``reg`` is, so a term's weight means the same in any run.

        Args:
            coords: predicted ``[N, K, 2]``; gt: ground truth ``[N, K, 2]``, same units.
            sigmas: predicted ``[N, K, 2]`` (> 0), in the units of ``coords``.
            weights: ``[N, K]`` target weights (0 for invisible joints and padding samples).
        """
        # MMPose adds 1e-9 to sigma before dividing: sigma -> 0 stays finite (see the test).
        sigmas = sigmas.clamp(min=1e-9)
        error = (coords - gt) / sigmas  # [N, K, 2]
        log_g = self.flow.log_prob(error.reshape(-1, 2)).reshape(*error.shape[:2], 1)
        nll = torch.log(sigmas) - log_g  # [N, K, 2]
        if self.residual:
            if self.q_distribution == "laplace":
                nll = nll + torch.log(2 * sigmas) + error.abs()
            else:
                nll = nll + torch.log(sigmas * math.sqrt(2 * math.pi)) + 0.5 * error.pow(2)
        return global_mean((nll * weights[..., None]).sum(), weights.gt(0).sum() * 2)
