"""One geometry: crop, heatmap and patch sizes, derived once."""

import pytest

from distilpose.errors import BadConfigError
from distilpose.geometry import PAPER, Geometry
from distilpose.models import model_config


def test_paper_geometry_and_the_quarter_rule():
    assert PAPER.heatmap_size == (48, 64) and PAPER.stride == (4.0, 4.0)
    assert PAPER.patch_grid == (16, 16) and PAPER.num_patches == 256
    small = Geometry((48, 64))
    assert small.heatmap_size == (12, 16) and small.patch_grid == (4, 4)
    assert small.size_overrides() == {"input_size": (48, 64), "heatmap_size": (12, 16)}
    assert Geometry([96, 128], [24, 32]) == Geometry((96, 128))  # lists and tuples alike
    with pytest.raises(BadConfigError, match="input_size"):
        Geometry((0, 64))


def test_model_config_derives_its_geometry():
    for name in ("distilpose_s", "tokenpose_tiny"):
        cfg = model_config(name)
        geometry = cfg.geometry
        assert geometry.input_size == cfg.input_size and geometry.patch_size == cfg.patch_size
        assert cfg.patch_grid == geometry.patch_grid and cfg.num_patches == geometry.num_patches
    assert model_config("distilpose_s").geometry == PAPER
    demo = model_config("distilpose_tiny", **Geometry((48, 64)).size_overrides())
    assert demo.heatmap_size == (12, 16) and demo.patch_grid == (4, 4)
