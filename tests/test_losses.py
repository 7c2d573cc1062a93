"""Losses: every term of paper Eq. 7 against a hand-computed value on tiny tensors, masking,
gradient paths, the official sh-weight quirk, loss-spec parsing, and the teacher's heatmap loss."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distilpose.errors import BadConfigError
from distilpose.geometry import Geometry
from distilpose.models import StudentOutput
from distilpose.training.losses import (
    DEFAULT_LOSSES,
    DEFAULT_WEIGHTS,
    LOSS_NAMES,
    LOSS_TERMS,
    TEACHER_FREE,
    DistillationLoss,
    HeatmapLoss,
    LossTerm,
    parse_losses,
    simulated_heatmap_mask,
)
from distilpose.training.rle import RLELoss
from distilpose.training.runs import StudentRun
from store.schema import TEACHER_OUTPUTS
from student_train.data import target_fields

HM = (4, 4)  # tiny heatmaps, (W, H)
GEOMETRY = Geometry((16, 16), HM)


def student(coords, scores=None, sigmas=None, kt=None, vt=None):
    coords = torch.tensor(coords, requires_grad=True)
    b, k = coords.shape[:2]
    return StudentOutput(
        coords=coords,
        scores=torch.tensor(scores if scores is not None else [[0.0] * k] * b, requires_grad=True),
        sigmas=torch.tensor(sigmas if sigmas is not None else [[[2.0, 2.0]] * k] * b),
        keypoint_tokens=torch.tensor(kt if kt is not None else [[[0.0]] * k] * b),
        visual_tokens=torch.tensor(vt if vt is not None else [[[0.0]]] * b),
    )


def gauss_sum(mu, sigma, n, power=1):
    """Sum over the grid 0..n-1 of exp(-power (x - mu)^2 / (2 sigma^2)), evaluated by hand."""
    return sum(math.exp(-power * (x - mu) ** 2 / (2 * sigma**2)) for x in range(n))


# ---- parse_losses ------------------------------------------------------------------------------


def test_parse_losses_forms():
    assert parse_losses("reg,kt,vt,sh,cs") == {n: DEFAULT_WEIGHTS[n] for n in LOSS_NAMES[:5]}
    assert parse_losses("reg") == {"reg": 1.0}
    assert parse_losses("rle,kt=0.1,sh") == {"rle": 1.0, "kt": 0.1, "sh": 1.0}
    assert parse_losses(" reg=1, kt=1e-3 ,sh") == {"reg": 1.0, "kt": 1e-3, "sh": 1.0}
    assert parse_losses("cs=0") == {"cs": 0.0}
    assert set(DEFAULT_WEIGHTS) == set(LOSS_NAMES)


@pytest.mark.parametrize(
    "spec, culprit",
    [("reg,foo", "foo"), ("reg=abc", "reg=abc"), ("kt=-1", "kt=-1"), ("sh=nan", "sh=nan"),
     ("reg,reg", "reg"), ("", "losses"), (" , ", "losses")],
)  # fmt: skip
def test_parse_losses_rejects(spec, culprit):
    with pytest.raises(BadConfigError, match=culprit):
        parse_losses(spec)


def test_unknown_loss_fails_at_construction():
    with pytest.raises(BadConfigError, match="bogus"):
        DistillationLoss({"reg": 1.0, "bogus": 1.0})
    with pytest.raises(BadConfigError, match="bogus"):
        DistillationLoss("reg,bogus")
    with pytest.raises(BadConfigError):
        DistillationLoss({})
    with pytest.raises(BadConfigError, match="kt"):
        DistillationLoss({"kt": -1.0})


def test_missing_target_names_the_key():
    loss = DistillationLoss("reg,sh", geometry=GEOMETRY)
    s = student([[[0.5, 0.5]]])
    with pytest.raises(BadConfigError, match="heatmaps"):
        loss(s, {"coords": torch.zeros(1, 1, 2), "weights": torch.ones(1, 1)})
    with pytest.raises(BadConfigError, match="heatmaps"):
        bad = {"coords": torch.zeros(1, 1, 2), "weights": torch.ones(1, 1)}
        loss(s, {**bad, "heatmaps": torch.zeros(1, 1, 3, 4)})


# ---- reg ---------------------------------------------------------------------------------------


def reg_case():
    coords = [[[0.5, 0.5], [0.2, 0.9]], [[1.2, 0.1], [1.0, 0.3]]]
    targets = {
        "coords": torch.tensor([[[0.7, 0.5], [0.2, 0.4]], [[0.1, 0.1], [0.0, 0.3]]]),
        "weights": torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
    }
    return coords, targets


def test_reg_hand_computed():
    coords, targets = reg_case()
    # Counted: sample 0 both joints; sample 1 joint 0 predicted outside [0, 1], joint 1 weight 0.
    # Smooth-L1 (beta 1): 0.5 d^2 -> 0.5*0.2^2 + 0.5*0.5^2 = 0.145 over 4 coordinates.
    out = DistillationLoss({"reg": 1.0})(student(coords), targets)
    assert set(out) == {"loss", "loss_reg"}
    assert out["loss"].item() == pytest.approx(0.145 / 4, rel=1e-5)
    # beta 0.1: |d| - beta / 2 -> 0.15 + 0.45
    out = DistillationLoss({"reg": 2.0}, reg_beta=0.1)(student(coords), targets)
    assert out["loss_reg"].item() == pytest.approx(0.6 / 4, rel=1e-5)
    assert out["loss"].item() == pytest.approx(2 * 0.6 / 4, rel=1e-5)


def test_reg_ignores_masked_joints_and_guards_zero_count():
    coords, targets = reg_case()
    loss = DistillationLoss({"reg": 1.0})
    base = loss(student(coords), targets)["loss"].item()
    coords[1][1] = [0.9, 0.9]  # weight 0 in the target
    coords[1][0] = [1.5, -0.3]  # still outside the crop
    assert loss(student(coords), targets)["loss"].item() == pytest.approx(base, rel=1e-6)
    s = student(coords)
    zero = loss(s, {**targets, "weights": torch.zeros(2, 2)})["loss"]
    zero.backward()
    assert zero.item() == 0.0 and torch.isfinite(s.coords.grad).all()


# ---- kt / vt -----------------------------------------------------------------------------------


def test_token_losses_hand_computed():
    s = student(
        [[[0.5, 0.5], [0.5, 0.5]]],
        kt=[[[1.0, 2.0], [3.0, 4.0]]],
        vt=[[[0.0], [1.0], [2.0]]],
    )
    targets = {
        "coords": torch.zeros(1, 2, 2),
        "weights": torch.ones(1, 2),
        "keypoint_tokens": torch.tensor([[[1.0, 0.0], [3.0, 7.0]]]),
        "visual_tokens": torch.tensor([[[1.0], [1.0], [0.0]]]),
    }
    out = DistillationLoss({"kt": 5e-4, "vt": 1e-3})(s, targets)
    assert out["loss_kt"].item() == pytest.approx((4 + 9) / 4)
    assert out["loss_vt"].item() == pytest.approx((1 + 0 + 4) / 3)
    assert out["loss"].item() == pytest.approx(5e-4 * 13 / 4 + 1e-3 * 5 / 3)
    with pytest.raises(BadConfigError, match="teacher_dim"):
        DistillationLoss({"kt": 1.0})(s, {**targets, "keypoint_tokens": torch.zeros(1, 2, 3)})


# ---- sh ----------------------------------------------------------------------------------------


def test_sh_hand_computed_and_masked():
    # Joint 0: mu = (0.5 * 4, 0.25 * 4) = (2, 1), sigma 1, teacher 0.5 everywhere.
    # Joint 1: target weight 0.
    coords = [[[0.5, 0.25], [0.25, 0.0]]]
    sigmas = [[[1.0, 1.0], [2.0, 1.0]]]
    targets = {
        "coords": torch.zeros(1, 2, 2),
        "weights": torch.tensor([[1.0, 0.0]]),
        "heatmaps": torch.full((1, 2, 4, 4), 0.5),
    }
    sum_s2 = gauss_sum(2, 1, 4, power=2) * gauss_sum(1, 1, 4, power=2)
    sum_s = gauss_sum(2, 1, 4) * gauss_sum(1, 1, 4)
    expected = (sum_s2 - sum_s + 0.25 * 16) / (2 * 16)  # mean over N*K*H*W
    loss = DistillationLoss({"sh": 1.0}, geometry=GEOMETRY)
    out = loss(student(coords, sigmas=sigmas), targets)
    assert set(out) == {"loss", "loss_sh"}
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    coords[0][1] = [0.9, 0.6]
    sigmas[0][1] = [0.5, 3.0]
    again = loss(student(coords, sigmas=sigmas), targets)["loss"].item()
    assert again == pytest.approx(out["loss"].item(), rel=1e-6)


def test_sh_gradients_reach_coords_and_sigmas():
    s = student([[[0.4, 0.3], [0.6, 0.7]]], sigmas=[[[1.5, 2.0], [1.0, 1.2]]])
    s.sigmas.requires_grad_(True)
    targets = {"coords": torch.zeros(1, 2, 2), "weights": torch.ones(1, 2)}
    targets["heatmaps"] = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    DistillationLoss({"sh": 1.0}, geometry=GEOMETRY)(s, targets)["loss"].backward()
    assert (s.coords.grad.abs() > 0).all() and (s.sigmas.grad.abs() > 0).all()


def test_sh_in_bounds_mask():
    coords = torch.tensor([[[0.5, 0.5], [-1.0, 0.5], [-2.0, 0.5], [0.5, 3.0]]])
    sigmas = torch.ones(1, 4, 2)
    # mu_x = -4: the box [-7, 0] still touches column 0; mu_x = -8 and mu_y = 12 do not.
    mask = simulated_heatmap_mask(coords, sigmas, HM)
    assert mask.tolist() == [[True, True, False, False]]


def test_official_sh_weight_uses_batch_mean_weight():
    # K = 1, two samples; only sample 0 is visible. Teacher heatmaps are 0.
    coords = [[[0.5, 0.25]], [[0.25, 0.25]]]  # mu = (2, 1) and (1, 1)
    sigmas = [[[1.0, 1.0]], [[2.0, 1.0]]]
    targets = {
        "coords": torch.zeros(2, 1, 2),
        "weights": torch.tensor([[1.0], [0.0]]),
        "heatmaps": torch.zeros(2, 1, 4, 4),
    }
    e0 = gauss_sum(2, 1, 4, power=2) * gauss_sum(1, 1, 4, power=2) / 16
    e1 = gauss_sum(1, 2, 4, power=2) * gauss_sum(1, 1, 4, power=2) / 16
    ours = DistillationLoss({"sh": 1.0}, geometry=GEOMETRY)(student(coords, sigmas=sigmas), targets)
    official = DistillationLoss({"sh": 1.0}, geometry=GEOMETRY, official_sh_weight=True)(
        student(coords, sigmas=sigmas), targets
    )
    assert ours["loss"].item() == pytest.approx(e0 / 2, rel=1e-5)
    # Official: mean_n(w^2) = 0.5 times the unmasked error of both samples.
    assert official["loss"].item() == pytest.approx(0.5 * (e0 + e1) / 2, rel=1e-5)
    # Equal masks across the batch: both modes agree.
    all_on = {**targets, "weights": torch.ones(2, 1)}
    a = DistillationLoss({"sh": 1.0}, geometry=GEOMETRY)(student(coords, sigmas=sigmas), all_on)
    b = DistillationLoss({"sh": 1.0}, geometry=GEOMETRY, official_sh_weight=True)(
        student(coords, sigmas=sigmas), all_on
    )
    assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-6)


# ---- cs ----------------------------------------------------------------------------------------


def cs_case(weights):
    coords = [[[0.3, 0.6], [1.2, 0.5]]]  # joint 0 -> column round(1.2) = 1, row round(2.4) = 2
    teacher = (torch.arange(16.0) / 16).reshape(1, 1, 4, 4).repeat(1, 2, 1, 1)
    targets = {"coords": torch.zeros(1, 2, 2), "weights": torch.tensor([weights])}
    return coords, {**targets, "heatmaps": teacher}


def test_cs_hand_computed():
    coords, targets = cs_case([1.0, 1.0])
    s = student(coords, scores=[[0.1, 0.4]])
    out = DistillationLoss({"cs": 1e-2}, geometry=GEOMETRY)(s, targets)
    # joint 0: |0.1 - T[2, 1] = 9/16|; joint 1 predicted outside the crop: |0.4 - 0|
    expected = (abs(0.1 - 9 / 16) + 0.4) / 2
    assert out["loss_cs"].item() == pytest.approx(expected, rel=1e-6)
    assert out["loss"].item() == pytest.approx(1e-2 * expected, rel=1e-6)
    out["loss"].backward()
    assert s.coords.grad is None or not s.coords.grad.any()  # rounding: no gradient into coords
    torch.testing.assert_close(s.scores.grad, torch.tensor([[-0.5e-2, 0.5e-2]]))


def test_cs_ignores_masked_joints():
    coords, targets = cs_case([1.0, 0.0])
    loss = DistillationLoss({"cs": 1.0}, geometry=GEOMETRY)
    a = loss(student(coords, scores=[[0.1, 0.4]]), targets)["loss"].item()
    b = loss(student(coords, scores=[[0.1, -3.0]]), targets)["loss"].item()
    assert a == pytest.approx(abs(0.1 - 9 / 16) / 2, rel=1e-6) and a == b


def _student_and_targets() -> tuple[StudentOutput, dict]:
    """A random student output and a batch with every target, N=2, K=3, P=5, D=4."""
    torch.manual_seed(0)
    b, k, p, d = 2, 3, 5, 4
    logits = torch.randn(b, k, 2)
    s = StudentOutput(
        coords=torch.rand(b, k, 2),
        scores=torch.randn(b, k),
        sigmas=F.softplus(logits),
        keypoint_tokens=torch.randn(b, k, d),
        visual_tokens=torch.randn(b, p, d),
        sigma_logits=logits,
        heatmap_logits=torch.randn(b, k, 4, 4),
    )
    targets = {
        "coords": torch.rand(b, k, 2),
        "weights": torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]),
        "heatmaps": torch.rand(b, k, 4, 4).half(),  # the store keeps fp16
        "keypoint_tokens": torch.randn(b, k, d),
        "visual_tokens": torch.randn(b, p, d),
    }
    return s, targets


def test_all_terms_together_sum_with_weights():
    s, targets = _student_and_targets()
    out = DistillationLoss(DEFAULT_WEIGHTS, geometry=GEOMETRY)(s, targets)
    assert set(out) == {"loss"} | {f"loss_{n}" for n in LOSS_NAMES}
    total = sum(DEFAULT_WEIGHTS[n] * out[f"loss_{n}"] for n in LOSS_NAMES)
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    assert all(not out[f"loss_{n}"].requires_grad for n in LOSS_NAMES)


# ---- rle -----------------------------------------------------------------------------------------


def test_rle_term_is_rle_on_the_sigmoid_of_the_sigma_channels():
    """`rle` = RLELoss with MMPose's sigma, the sigmoid of the raw sigma channels (normalized
    units, as the coords), with the loss module's own flow, over the weighted joints."""
    s, targets = _student_and_targets()
    loss = DistillationLoss("rle", geometry=GEOMETRY)
    assert isinstance(loss.rle, RLELoss) and DistillationLoss("reg").rle is None
    out = loss(s, targets)
    sigmas = torch.sigmoid(s.sigma_logits)
    expected = loss.rle(s.coords, sigmas, targets["coords"], targets["weights"])
    torch.testing.assert_close(out["loss_rle"], expected)
    # the flow's parameters are the loss module's: what the trainer optimizes with the student
    assert {n for n, _ in loss.named_parameters()} and all(
        n.startswith("rle.flow.") for n, _ in loss.named_parameters()
    )
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    with pytest.raises(BadConfigError, match="rle needs the student's sigma logits"):
        loss(student([[[0.5, 0.5]]]), {"coords": torch.rand(1, 1, 2), "weights": torch.ones(1, 1)})


def test_rle_term_gradient_is_finite_at_zero_sigma_and_reaches_coords_and_sigmas():
    coords = torch.tensor([[[0.4, 0.6], [0.5, 0.5]]], requires_grad=True)
    # sigmoid(-1e4) is exactly 0, sigmoid(-60) ~ 1e-26: sigma -> 0
    logits = torch.tensor([[[-1e4, -60.0], [0.0, 2.0]]], requires_grad=True)
    s = StudentOutput(coords=coords, scores=torch.zeros(1, 2), sigmas=F.softplus(logits),
                      sigma_logits=logits)  # fmt: skip
    targets = {"coords": torch.tensor([[[0.5, 0.5], [0.4, 0.7]]]), "weights": torch.ones(1, 2)}
    out = DistillationLoss("rle", geometry=GEOMETRY)(s, targets)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert torch.isfinite(coords.grad).all() and torch.isfinite(logits.grad).all()
    assert coords.grad.abs().sum() > 0 and logits.grad[0, 1].abs().sum() > 0


def test_rle_mixes_with_the_distillation_terms():
    s, targets = _student_and_targets()
    out = DistillationLoss("rle,kt=0.1,vt=0.1,sh,cs", geometry=GEOMETRY)(s, targets)
    assert set(out) == {"loss", "loss_rle", "loss_kt", "loss_vt", "loss_sh", "loss_cs"}
    total = out["loss_rle"] + 0.1 * (out["loss_kt"] + out["loss_vt"])
    total = total + out["loss_sh"] + 1e-2 * out["loss_cs"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)


# ---- dsnt ----------------------------------------------------------------------------------------


def _maps_student(logits: torch.Tensor) -> StudentOutput:
    b, k = logits.shape[:2]
    return StudentOutput(coords=torch.full((b, k, 2), 0.5), scores=torch.zeros(b, k),
                         sigmas=torch.ones(b, k, 2), heatmap_logits=logits)  # fmt: skip


def _gaussian(mu_x: float, mu_y: float, w: int = 4, h: int = 4) -> torch.Tensor:
    """[H, W]: the normalized Gaussian of sigma 1 px at (mu_x, mu_y), written out by hand."""
    g = torch.tensor([[math.exp(-((x - mu_x) ** 2 + (y - mu_y) ** 2) / 2) for x in range(w)]
                      for y in range(h)])  # fmt: skip
    return g / g.sum()


def test_dsnt_is_the_js_divergence_to_a_gaussian_at_the_label():
    """0 when the map's softmax is the label's Gaussian; ln 2 at most (disjoint maps); the hand
    computed JS divergence otherwise; joints of weight 0 or labelled outside the crop count not."""
    loss = DistillationLoss("dsnt", geometry=GEOMETRY)
    q = _gaussian(1.0, 2.0)
    coords = torch.tensor([[[1 / 4, 2 / 4]]])  # heatmap px (1, 2)
    targets = {"coords": coords, "weights": torch.ones(1, 1)}
    exact = loss(_maps_student(q.log()[None, None]), targets)["loss_dsnt"]
    assert exact.item() == pytest.approx(0.0, abs=1e-6)
    far = torch.full((4, 4), -1e4)
    far[3, 3] = 0.0  # all mass at (3, 3), where the label's Gaussian is ~1e-4 of its peak
    js_far = loss(_maps_student(far[None, None]), targets)["loss_dsnt"].item()
    assert 0.6 < js_far <= math.log(2) + 1e-6
    flat = torch.zeros(4, 4)
    p, m = torch.full((4, 4), 1 / 16), (torch.full((4, 4), 1 / 16) + q) / 2
    by_hand = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    got = loss(_maps_student(flat[None, None]), targets)["loss_dsnt"]
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # a second joint of weight 0 and a third labelled outside the crop change nothing
    two = torch.stack([flat, far, far])[None]
    more = {"coords": torch.tensor([[[0.25, 0.5], [0.9, 0.9], [1.2, 0.5]]]),
            "weights": torch.tensor([[1.0, 0.0, 1.0]])}  # fmt: skip
    assert loss(_maps_student(two), more)["loss_dsnt"].item() == pytest.approx(got.item(), 1e-5)


def test_dsnt_gradient_reaches_the_maps_and_a_student_without_maps_is_refused():
    from distilpose.models import build_model
    from student_train.train import check_student_outputs

    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    targets = {"coords": torch.rand(2, 3, 2), "weights": torch.ones(2, 3)}
    out = DistillationLoss("reg,dsnt", geometry=GEOMETRY)(_maps_student(logits), targets)
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(BadConfigError, match="dsnt needs the student's heatmap logits"):
        one = {"coords": torch.rand(1, 1, 2), "weights": torch.ones(1, 1)}
        DistillationLoss("dsnt", geometry=GEOMETRY)(student([[[0.5, 0.5]]]), one)
    check_student_outputs({"dsnt": 1.0}, build_model("distilpose_demo").config)
    with pytest.raises(BadConfigError, match="dsnt needs a student whose coords are a soft-arg"):
        check_student_outputs({"dsnt": 1.0}, build_model("distilpose_tiny").config)


def test_dsnt_alone_moves_a_demo_students_coords_to_the_labels():
    """`dsnt` alone overfits one sample: its loss falls and the soft-argmax coords come nearer
    the labels (the maps' shape carries the position; no other term is in the objective)."""
    from distilpose.models import build_model

    torch.manual_seed(0)
    model = build_model("distilpose_demo")
    loss = DistillationLoss("dsnt", geometry=model.config)
    images = torch.randn(1, 3, 128, 96)
    targets = {"coords": torch.rand(1, 17, 2) * 0.6 + 0.2, "weights": torch.ones(1, 17)}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    seen = []
    for _ in range(40):
        opt.zero_grad()
        out = model(images)
        value = loss(out, targets)["loss"]
        seen.append((value.item(), (out.coords - targets["coords"]).abs().mean().item()))
        value.backward()
        opt.step()
    (loss0, error0), (loss1, error1) = seen[0], seen[-1]
    assert loss1 < 0.75 * loss0 and error1 < 0.75 * error0, seen[::10]


# ---- HeatmapLoss -------------------------------------------------------------------------------


def test_heatmap_loss_hand_computed_and_matches_joints_mse():
    pred = torch.ones(1, 2, 2, 2)
    out = HeatmapLoss()(pred, torch.zeros(1, 2, 2, 2), torch.tensor([[1.0, 0.0]]))
    assert set(out) == {"loss", "loss_heatmap"}
    assert out["loss"].item() == pytest.approx(4 / 8)
    assert HeatmapLoss(use_target_weight=False)(pred, torch.zeros_like(pred))["loss"].item() == 1.0
    # Against MMPose 0.x JointsMSELoss written as its per-joint loop.
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(3, 4, 5, 6, generator=g), torch.rand(3, 4, 5, 6, generator=g)
    w = (torch.rand(3, 4, generator=g) > 0.3).float()
    flat_pred, flat_target = pred.reshape(3, 4, -1), target.reshape(3, 4, -1)
    per_joint = [
        F.mse_loss(flat_pred[:, j] * w[:, j, None], flat_target[:, j] * w[:, j, None])
        for j in range(4)
    ]
    ref = sum(per_joint) / 4
    assert HeatmapLoss()(pred, target, w)["loss"].item() == pytest.approx(ref.item(), rel=1e-6)


# ---- the loss table: one row per term, everything else derived ---------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def test_loss_table_is_the_one_source_of_names_weights_and_targets():
    # Eq. 7's order, then RLE (not the paper's: the teacher-free objective)
    assert LOSS_NAMES == tuple(LOSS_TERMS) == ("reg", "kt", "vt", "sh", "cs", "rle", "dsnt")
    paper = {"reg": 1.0, "kt": 5e-4, "vt": 5e-4, "sh": 1.0, "cs": 1e-2}
    assert DEFAULT_WEIGHTS == {**paper, "rle": 1.0, "dsnt": 1.0}
    assert DEFAULT_LOSSES == "reg,kt,vt,sh,cs"  # Eq. 7 alone, at its official weights
    assert TEACHER_FREE == ("reg", "rle", "dsnt")
    # runs.py stays torch-free for the CLI, so it writes the default out: kept equal here
    assert StudentRun(store=None).losses == DEFAULT_LOSSES
    for term in LOSS_TERMS.values():
        assert set(term.targets) <= set(TEACHER_OUTPUTS)
    assert target_fields(LOSS_NAMES) == ("keypoint_tokens", "visual_tokens", "heatmaps")
    assert target_fields(["reg"]) == ()


def _docs_loss_rows() -> list[tuple[str, float, tuple[str, ...]]]:
    """(term, default weight, stored targets) of the loss-term table in docs/architecture.md."""
    rows = []
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4 and cells[3].startswith("loss_"):
            targets = (
                () if cells[2] == "none" else tuple(t.strip(" `") for t in cells[2].split(","))
            )
            rows.append((cells[0].strip("`"), float(cells[1]), targets))
    return rows


def test_docs_list_the_loss_terms_of_the_table():
    assert _docs_loss_rows() == [(n, t.weight, t.targets) for n, t in LOSS_TERMS.items()]


def test_a_new_loss_term_is_a_table_row_and_its_function(monkeypatch):
    """What docs/architecture.md promises: a row in LOSS_TERMS (with its function) is parsed,
    computed, weighted and logged, and its stored target is read, with nothing else changed."""

    def mean_abs_sigma(x, name):  # a made-up term, reading the teacher heatmaps it declares
        (key,) = LOSS_TERMS[name].targets
        assert x.target(key).shape[0] == x.coords.shape[0]
        return x.student.sigmas.float().abs().mean()

    monkeypatch.setitem(LOSS_TERMS, "ms", LossTerm(0.5, ("heatmaps",), mean_abs_sigma))
    weights = parse_losses("reg,ms")
    assert weights == {"reg": 1.0, "ms": 0.5}
    assert target_fields(weights) == ("heatmaps",)
    s, targets = _student_and_targets()
    out = DistillationLoss(weights, geometry=GEOMETRY)(s, targets)
    assert set(out) == {"loss", "loss_reg", "loss_ms"}
    expected = out["loss_reg"] + 0.5 * s.sigmas.abs().mean()
    torch.testing.assert_close(out["loss"], expected)
