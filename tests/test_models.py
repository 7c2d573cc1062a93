"""Models: official sizes and keys, output shapes and ranges, gradients, GMACs, encoder details."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distilpose.errors import BadConfigError
from distilpose.models import (
    MODEL_NAMES,
    ModelConfig,
    StudentOutput,
    TeacherOutput,
    build_model,
    count_macs,
    count_params,
    list_model_infos,
    model_config,
    model_info,
)
from distilpose.models.layers import Attention, patchify, sine_position_embedding

# (trainable params, state-dict tensors incl. BN buffers) of the official code's models
OFFICIAL_SIZES = {
    "tokenpose_l_w48": (69_411_360, 1_896),
    "distilpose_s": (5_364_101, 230),
    "distilpose_l": (21_265_637, 1_070),
}
# the paper's GFLOPs (= GMACs, MMCV counter), Tables 1 and 3
PAPER_GMACS = {"tokenpose_l_w48": 17.03, "distilpose_s": 2.38, "distilpose_l": 10.33}


def meta_model(name: str, **overrides):
    """Build on the meta device: the full module tree and shapes at no memory or init cost."""
    with torch.device("meta"):
        return build_model(name, **overrides)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_with_its_config(name):
    model = meta_model(name)
    cfg = model.config
    assert cfg.name == name and cfg.role in ("teacher", "student")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert count_params(model) > 0


@pytest.mark.parametrize("name", sorted(OFFICIAL_SIZES))
def test_official_param_and_tensor_counts(name):
    params, tensors = OFFICIAL_SIZES[name]
    model = build_model(name)
    assert count_params(model) == params
    state = model.state_dict()
    assert len(state) == tensors
    # the fixed sine position embedding is saved but not trained (the paper's counts exclude it)
    assert not model.head.pos_embedding.requires_grad
    assert "head.pos_embedding" in state


def test_official_key_layout():
    teacher = meta_model("tokenpose_l_w48").state_dict()
    layer = "head.transformer.layers.11"
    shapes = {
        f"{layer}.0.fn.norm.weight": (192,),
        f"{layer}.0.fn.fn.to_qkv.weight": (576, 192),
        f"{layer}.0.fn.fn.to_out.0.weight": (192, 192),
        f"{layer}.1.fn.norm.weight": (192,),
        f"{layer}.1.fn.fn.net.0.weight": (576, 192),
        f"{layer}.1.fn.fn.net.3.weight": (192, 576),
        "head.keypoint_token": (1, 17, 192),
        "head.pos_embedding": (1, 256, 192),
        "head.patch_to_embedding.weight": (192, 576),
        "head.mlp_head.0.weight": (192,),
        "head.mlp_head.1.weight": (384, 192),
        "head.mlp_head.2.weight": (384,),
        "head.mlp_head.3.weight": (3072, 384),
        "backbone.bn1.running_var": (64,),
        "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.transition1.1.0.0.weight": (96, 256, 3, 3),
        "backbone.transition3.3.0.0.weight": (384, 192, 3, 3),
        "backbone.stage4.2.branches.3.3.conv2.weight": (384, 384, 3, 3),
        "backbone.stage4.2.fuse_layers.0.3.0.weight": (48, 384, 1, 1),
        "backbone.stage4.1.fuse_layers.3.0.2.0.weight": (384, 48, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(teacher[key].shape) == shape, key
    assert "head.transformer.layers.0.0.fn.fn.to_qkv.bias" not in teacher
    # only branch 0 leaves the last module: no fusion into branches 1-3 there
    assert not any(k.startswith("backbone.stage4.2.fuse_layers.1") for k in teacher)

    student_l = meta_model("distilpose_l").state_dict()
    assert not any(".stage4." in k or "transition3" in k for k in student_l)
    assert not any(k.startswith("backbone.stage3.3.fuse_layers.1") for k in student_l)
    assert tuple(student_l["head.mlp_head.1.weight"].shape) == (5, 192)
    # every DistilPose-L backbone tensor exists with its shape in the teacher (its init source)
    backbone = {k: v.shape for k, v in student_l.items() if k.startswith("backbone.")}
    assert len(backbone) == 930
    assert all(teacher[k].shape == s for k, s in backbone.items())

    student_s = meta_model("distilpose_s").state_dict()
    assert tuple(student_s["head.patch_to_embedding.weight"].shape) == (192, 3072)
    stem = [k for k in student_s if k.startswith("backbone.")]
    assert len(stem) == 90 and all(teacher[k].shape == student_s[k].shape for k in stem)


def test_tiny_teacher_outputs():
    torch.manual_seed(0)
    model = build_model("tokenpose_tiny").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 96))
    assert isinstance(out, TeacherOutput)
    assert out.heatmaps.shape == (2, 17, 32, 24)
    assert out.keypoint_tokens.shape == (2, 17, 64)
    assert out.visual_tokens.shape == (2, 64, 64)
    assert torch.isfinite(out.heatmaps).all()


def test_tiny_student_outputs_and_ranges():
    torch.manual_seed(0)
    model = build_model("distilpose_tiny").eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 128, 96) * 3)
    assert isinstance(out, StudentOutput)
    assert out.coords.shape == (3, 17, 2) and out.scores.shape == (3, 17)
    assert out.sigmas.shape == (3, 17, 2)
    assert out.keypoint_tokens.shape == (3, 17, 64) and out.visual_tokens.shape == (3, 64, 64)
    assert ((out.coords >= 0) & (out.coords <= 1)).all()
    assert (out.sigmas > 0).all()
    # sigmoid / raw / softplus of the head's x, y, score, sigma_x, sigma_y (the official order)
    with torch.no_grad():
        kpt, _ = model.head.encode(model.backbone(torch.zeros(1, 3, 128, 96)))
        raw = model.head.mlp_head(kpt)
        out0 = model(torch.zeros(1, 3, 128, 96))
    torch.testing.assert_close(out0.coords, raw[..., :2].sigmoid())
    torch.testing.assert_close(out0.scores, raw[..., 2])
    torch.testing.assert_close(out0.sigmas, F.softplus(raw[..., 3:5]))


def test_full_size_student_forward_shapes():
    model = build_model("distilpose_s").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 192))
    assert out.coords.shape == (1, 17, 2)
    assert out.keypoint_tokens.shape == (1, 17, 192)
    assert out.visual_tokens.shape == (1, 256, 192)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("distilpose_tiny", {}),
        ("distilpose_tiny", {"single_sigma": True}),
        ("distilpose_tiny", {"teacher_dim": 48}),
        ("distilpose_demo", {}),
    ],
    ids=["default", "1sigma", "proj", "demo"],
)
def test_every_student_parameter_gets_a_gradient(name, overrides):
    torch.manual_seed(0)
    model = build_model(name, **overrides).train()
    out = model(torch.randn(2, 3, 128, 96))
    loss = (
        out.coords.sum()
        + out.scores.pow(2).sum()
        + out.sigmas.sum()
        + out.keypoint_tokens.pow(2).mean()
        + out.visual_tokens.pow(2).mean()
    )
    loss.backward()
    no_grad = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert no_grad == []


def test_single_sigma_and_token_projection():
    model = build_model("distilpose_tiny", single_sigma=True, teacher_dim=48).eval()
    assert model.head.mlp_head[1].out_features == 4
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 96))
    assert torch.equal(out.sigmas[..., 0], out.sigmas[..., 1])
    assert out.keypoint_tokens.shape == (2, 17, 48) and out.visual_tokens.shape == (2, 64, 48)
    assert model.config.token_dim == 48
    # one fewer output row than the 5-output head: 192 weights + 1 bias on DistilPose-S
    single = count_params(meta_model("distilpose_s", single_sigma=True))
    assert single == OFFICIAL_SIZES["distilpose_s"][0] - 193


def test_config_errors():
    with pytest.raises(BadConfigError, match="distilpose_xl"):
        build_model("distilpose_xl")
    with pytest.raises(BadConfigError, match="depht"):
        build_model("distilpose_tiny", depht=3)
    with pytest.raises(BadConfigError, match="patch_size"):
        model_config("distilpose_tiny", patch_size=(5, 4))
    with pytest.raises(BadConfigError, match="backbone"):
        model_config("distilpose_tiny", backbone="resnet")
    cfg = model_config("distilpose_tiny", depth=3, input_size=[96, 128])
    assert cfg.depth == 3 and cfg.input_size == (96, 128) and cfg.patch_grid == (8, 8)


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_gmacs_match_the_paper(name):
    info = model_info(name)
    assert abs(info["gflops"] - PAPER_GMACS[name]) / PAPER_GMACS[name] < 0.015
    assert info["params"] == OFFICIAL_SIZES[name][0]
    # the full count adds exactly the two attention products: 2 * N^2 * D per layer
    n, d, depth = 17 + 256, 192, 12
    assert info["gflops_full"] - info["gflops"] == pytest.approx(
        2 * n * n * d * depth / 1e9, abs=2e-4
    )


def test_macs_rules_on_a_tiny_model():
    """Paper-style MACs = conv + linear + norms (x2, affine) + ReLU outputs, by hand."""
    model = build_model("distilpose_tiny")
    macs = count_macs(model)
    # conv + linear alone, counted independently of the hooks' module types
    conv_lin = 0
    records = []

    def hook(m, inputs, output):
        records.append((m, inputs[0], output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 128, 96))
    for h in handles:
        h.remove()
    extra = 0
    for m, x, y in records:
        if isinstance(m, torch.nn.Conv2d):
            conv_lin += y.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            conv_lin += x.numel() * m.out_features
        elif isinstance(m, torch.nn.BatchNorm2d | torch.nn.LayerNorm):
            extra += 2 * x.numel()
        elif isinstance(m, torch.nn.ReLU):
            extra += y.numel()
    assert macs == conv_lin + extra
    assert count_macs(model, full=True) - macs == 2 * 81 * 81 * 64 * 2  # N=17+64, D=64, depth 2


def test_model_info_fields_and_cache():
    infos = list_model_infos()
    assert [i["name"] for i in infos] == MODEL_NAMES
    for info in infos:
        assert set(info) == {"name", "role", "input_size", "params", "gflops", "gflops_full"}
        assert info["gflops_full"] >= info["gflops"] > 0  # equal without attention
    assert model_info("distilpose_tiny")["input_size"] == [96, 128]
    built = model_info(build_model("distilpose_tiny", depth=4))
    assert built["params"] > model_info("distilpose_tiny")["params"]


# --------------------------------------------------------------------------- encoder details


def test_patch_flatten_order():
    """Patches row-major; inside a patch (row, column, channel) with channel fastest."""
    b, c, h, w = 1, 2, 8, 6
    feat = torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)
    patches = patchify(feat, (3, 4))  # 3 wide, 4 high -> grid 2 x 2
    assert patches.shape == (1, 4, 4 * 3 * 2)
    for p in range(4):
        gy, gx = divmod(p, 2)
        for py in range(4):
            for px in range(3):
                for ch in range(c):
                    got = patches[0, p, (py * 3 + px) * c + ch]
                    assert got == feat[0, ch, gy * 4 + py, gx * 3 + px]


def test_sine_position_embedding_formula():
    grid, dim = (4, 3), 16  # 4 across, 3 down
    pos = sine_position_embedding(grid, dim)
    assert pos.shape == (1, 12, dim)
    half = dim // 2
    for token in (0, 5, 11):
        y, x = divmod(token, 4)
        for i in range(half):
            freq = 10000 ** (2 * (i // 2) / half)
            ay = (y + 1) / (3 + 1e-6) * 2 * math.pi / freq
            ax = (x + 1) / (4 + 1e-6) * 2 * math.pi / freq
            f = math.sin if i % 2 == 0 else math.cos  # interleaved sin, cos, sin, cos
            assert pos[0, token, i].item() == pytest.approx(f(ay), abs=1e-5)  # y half first
            assert pos[0, token, half + i].item() == pytest.approx(f(ax), abs=1e-5)


def test_attention_matches_the_reference_formula():
    torch.manual_seed(0)
    attn = Attention(dim=32, heads=4)
    x = torch.randn(2, 5, 32)
    q, k, v = attn.to_qkv(x).chunk(3, dim=-1)  # head-major: [B, N, (h d)]
    q, k, v = (t.reshape(2, 5, 4, 8).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) * (32 / 4) ** -0.5).softmax(-1)
    ref = attn.to_out((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), ref)


def test_sine_full_adds_position_before_later_layers():
    """With layer 1 made an identity, the encoder output is layer 0's output + pos on the
    visual tokens (and nothing on the keypoint tokens)."""
    torch.manual_seed(0)
    model = build_model("distilpose_tiny").eval()
    head = model.head
    layer1 = head.transformer.layers[1]
    with torch.no_grad():
        for lin in (layer1[0].fn.fn.to_out[0], layer1[1].fn.fn.net[3]):
            lin.weight.zero_()
            lin.bias.zero_()
        feat = model.backbone(torch.randn(1, 3, 128, 96))
        kpt, vis = head.encode(feat)
        x = head.patch_to_embedding(patchify(feat, head.patch_size)) + head.pos_embedding
        x = torch.cat((head.keypoint_token, x), dim=1)
        attn0, ff0 = head.transformer.layers[0]
        y = ff0(attn0(x))
    torch.testing.assert_close(kpt, y[:, :17])
    torch.testing.assert_close(vis, y[:, 17:] + head.pos_embedding)


def test_wrong_input_size_is_a_clear_error():
    model = build_model("distilpose_tiny")
    with pytest.raises(ValueError, match="heatmap_size"):
        model(torch.zeros(1, 3, 256, 192))


def test_similarity_maps_put_each_patch_pixel_in_place():
    """The demo heads' layout: key s of visual token p is heatmap pixel s of patch p."""
    from distilpose.models.layers import similarity_maps

    hm, patch, d = (6, 8), (2, 2), 4  # 3 x 4 patches of 2 x 2 pixels
    keys = torch.zeros(1, 12, 4, d)
    q = torch.zeros(1, 1, d)
    q[0, 0, 0] = 1.0
    # pixel (x=3, y=5): patch column 1, row 2 -> token 2 * 3 + 1 = 7; in-patch (1, 1) -> s = 3
    keys[0, 7, 3, 0] = 10.0
    maps = similarity_maps(q, keys.reshape(1, 12, 4 * d), hm, patch)
    assert maps.shape == (1, 1, 8, 6)
    y, x = divmod(int(maps[0, 0].argmax()), 6)
    assert (x, y) == (3, 5)


def test_demo_student_soft_argmax_units_match_the_codec():
    """A map peaked at heatmap pixel (j, i) gives coords (j / W_hm, i / H_hm), as the codecs."""
    model = build_model("distilpose_demo")
    head = model.head
    wh, hh = model.config.heatmap_size
    d = model.config.dim
    # a query equal to one key direction: only pixel (5, 9) has a large similarity
    with torch.no_grad():
        maps_query = torch.zeros(1, 17, d)
        maps_query[..., 0] = 1.0
        keys = torch.zeros(1, model.config.num_patches, 4 * d)
        p = (9 // 2) * (wh // 2) + 5 // 2  # token of pixel (x=5, y=9)
        s = (9 % 2) * 2 + 5 % 2
        keys[0, p, s * d] = 1000.0
        head.query = torch.nn.Identity()
        head.key = torch.nn.Identity()
        coords, _ = head.soft_argmax(maps_query, keys)
    assert torch.allclose(coords[0, 0], torch.tensor([5 / wh, 9 / hh]), atol=1e-4)


# ---- the models table and the backbone table (one table per extension point) -----------------


def _models_table() -> list[list[str]]:
    """Rows of the table in distilpose.models' docstring: [name, role, backbone, tokens, paper]."""
    import distilpose.models

    rows = []
    for line in (distilpose.models.__doc__ or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 5:
            rows.append([cells[0].strip("`"), *cells[1:]])
    return rows


def test_models_table_lists_every_model_with_its_config():
    import distilpose.models

    rows = _models_table()
    assert [r[0] for r in rows] == MODEL_NAMES
    for name, role, _, tokens, _ in rows:
        config = model_config(name)
        assert role == config.role, name
        assert tokens == (f"{config.dim} x {config.depth}" if config.has_tokens else "none"), name
    # sizes are written width x height (the project's convention), as the configs hold them
    doc = " ".join((distilpose.models.__doc__ or "").split())
    for name, words in (("distilpose_tiny", "Tiny models take"), ("distilpose_demo", "pair takes")):
        c = model_config(name)
        (w, h), (hw, hh), (pw, ph) = c.input_size, c.heatmap_size, c.patch_size
        expected = (
            f"{words} {w}x{h} crops (heatmaps {hw}x{hh}, {c.num_patches} patches of {pw}x{ph})"
        )
        assert expected in doc, expected


def test_backbone_table_is_the_one_list_of_backbones():
    from distilpose.models.hrnet import _FAMILIES
    from distilpose.models.layers import BACKBONES

    used = {model_config(name).backbone for name in MODEL_NAMES}
    assert used == set(BACKBONES)  # every row is a built-in model's, and no model's is missing
    assert {spec.family for spec in BACKBONES.values()} == {*_FAMILIES, "resnet"}
    with pytest.raises(BadConfigError, match="expected one of \\('stemnet'"):
        model_config("distilpose_tiny", backbone="vgg")
