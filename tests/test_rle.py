"""The RLE objective (distilpose.training.rle): a normalized flow, finite at sigma -> 0, learns."""

import math

import torch

from distilpose.training.rle import RealNVP, RLELoss


def _grid_integral(log_density, half_width: float = 12.0, n: int = 601) -> float:
    axis = torch.linspace(-half_width, half_width, n)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    step = (axis[1] - axis[0]).item()
    with torch.no_grad():
        return float(log_density(points).exp().sum() * step * step)


def test_flow_density_integrates_to_one_also_after_training_moves_it():
    torch.manual_seed(0)
    flow = RealNVP()
    assert abs(_grid_integral(flow.log_prob) - 1.0) < 1e-3
    # moved away from its initialisation (as training moves it), it is still a normalized density
    # that is no longer the standard normal
    x = torch.randn(64, 2)
    before = flow.log_prob(x).detach()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    assert (flow.log_prob(x) - before).abs().max() > 0.1
    assert abs(_grid_integral(flow.log_prob) - 1.0) < 1e-3


def test_flow_starts_near_a_standard_normal():
    torch.manual_seed(0)
    flow = RealNVP()
    x = torch.randn(256, 2)
    normal = -0.5 * x.pow(2).sum(1) - math.log(2 * math.pi)
    # MMPose initialises only the weights (gain 0.01): the default biases shift it a little
    assert (flow.log_prob(x) - normal).abs().mean() < 0.5


def test_laplace_residual_term_matches_its_closed_form():
    loss = RLELoss()
    coords = torch.tensor([[[0.5, 0.5]]])
    gt = torch.tensor([[[0.6, 0.3]]])
    sigma = torch.tensor([[[0.1, 0.2]]])
    x = (coords - gt) / sigma
    log_g = loss.flow.log_prob(x.reshape(-1, 2))
    expected = (torch.log(sigma) - log_g + torch.log(2 * sigma) + x.abs()).mean()
    got = loss(coords, sigma, gt, torch.ones(1, 1))
    assert torch.allclose(got, expected, atol=1e-3)


def test_gradient_is_finite_as_sigma_goes_to_zero():
    loss = RLELoss()
    coords = torch.full((2, 3, 2), 0.4, requires_grad=True)
    sigmas = torch.full((2, 3, 2), 1e-12, requires_grad=True)
    value = loss(coords, sigmas, torch.full((2, 3, 2), 0.5), torch.ones(2, 3))
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(coords.grad).all() and torch.isfinite(sigmas.grad).all()


def test_invisible_joints_do_not_count():
    loss = RLELoss()
    coords, sigmas = torch.rand(2, 3, 2), torch.full((2, 3, 2), 0.1)
    gt = coords.clone()
    gt[:, 2] += 5.0  # far off, but weighted 0
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert torch.allclose(loss(coords, sigmas, gt, weights), loss(coords[:, :2], sigmas[:, :2],
                          gt[:, :2], weights[:, :2]))  # fmt: skip


def test_tiny_regressor_learns_with_rle_alone():
    torch.manual_seed(0)
    features = torch.randn(64, 8)
    gt = torch.sigmoid(features @ torch.randn(8, 4)).reshape(64, 2, 2)
    head = torch.nn.Linear(8, 8)
    loss = RLELoss()
    opt = torch.optim.Adam([*head.parameters(), *loss.parameters()], lr=1e-2)
    weights = torch.ones(64, 2)

    def step() -> tuple[float, float]:
        out = head(features).reshape(64, 2, 4)
        coords, sigmas = torch.sigmoid(out[..., :2]), torch.sigmoid(out[..., 2:])
        value = loss(coords, sigmas, gt, weights)
        return value, float((coords.detach() - gt).abs().mean())

    first_nll, first_err = (float(v.detach()) if torch.is_tensor(v) else v for v in step())
    for _ in range(300):
        value, _ = step()
        opt.zero_grad()
        value.backward()
        opt.step()
    last_nll, last_err = (float(v.detach()) if torch.is_tensor(v) else v for v in step())
    assert last_nll < first_nll - 1.0
    assert last_err < 0.5 * first_err


def test_a_real_student_overfits_a_few_crops_with_the_rle_term_alone():
    """Through the `rle` loss term (sigmoid of the student's sigma channels, the flow in the loss
    module, both optimized): distilpose_tiny fits 4 fixed crops' joints, no teacher."""
    from distilpose.geometry import SMOKE
    from distilpose.models import build_model
    from distilpose.training.losses import DistillationLoss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = build_model("distilpose_tiny", **SMOKE.size_overrides()).train()
    w, h = SMOKE.input_size
    images, gt = torch.randn(4, 3, h, w), torch.rand(4, 17, 2) * 0.6 + 0.2
    targets = {"coords": gt, "weights": torch.ones(4, 17)}
    loss = DistillationLoss("rle", geometry=student.config.geometry)
    flow_before = [p.detach().clone() for p in loss.parameters()]
    opt = torch.optim.Adam([*student.parameters(), *loss.parameters()], lr=1e-3)
    errors, nlls = [], []
    for _ in range(60):
        out = student(images)
        value = loss(out, targets)
        errors.append(float((out.coords.detach() - gt).abs().mean()))
        nlls.append(float(value["loss_rle"]))
        opt.zero_grad()
        value["loss"].backward()
        opt.step()
    torch.set_num_threads(threads)
    assert errors[-1] < 0.5 * errors[0], errors[::10]
    assert nlls[-1] < nlls[0] - 1.0, nlls[::10]
    assert any(not torch.equal(a, b) for a, b in zip(flow_before, loss.parameters(), strict=True))
