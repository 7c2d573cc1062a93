"""The sizes of a model's input and outputs, defined once (torch-free).

Sizes are `(width, height)` as everywhere in the project. A crop of `input_size` goes through a
backbone of output stride `HEATMAP_STRIDE`, giving a feature map (and teacher heatmaps) of
`heatmap_size`; the encoder cuts that map into `patch_size` patches, a `patch_grid` of
`num_patches` visual tokens.

    Geometry()            # the paper's: 192x256 crops, 48x64 heatmaps, 16x16 patches
    Geometry((48, 64))    # heatmaps a quarter of the crop unless given: (12, 16)

`ModelConfig.geometry` gives a model's; the store records the same sizes in its StoreMeta.
"""

from __future__ import annotations

from dataclasses import dataclass

from distilpose.errors import BadConfigError

Size = tuple[int, int]

HEATMAP_STRIDE = 4  # every backbone here (HRNet, StemNet) outputs at a quarter of the input


@dataclass(frozen=True)
class Geometry:
    input_size: Size = (192, 256)  # crop (width, height), the paper's 256x192
    heatmap_size: Size | None = None  # backbone feature map = teacher heatmap; None: input / 4
    patch_size: Size = (3, 4)  # 3 wide, 4 high on the feature map (official [4, 3])

    def __post_init__(self) -> None:
        for key in ("input_size", "heatmap_size", "patch_size"):
            value = getattr(self, key)
            if value is None and key == "heatmap_size":  # the one home of the input / 4 rule
                value = tuple(v // HEATMAP_STRIDE for v in self.input_size)
            try:
                size = tuple(int(v) for v in value)
            except (TypeError, ValueError):
                size = ()
            if len(size) != 2 or min(size) <= 0:
                raise BadConfigError(f"'{key}' is {value!r}; expected (width, height) > 0")
            object.__setattr__(self, key, size)

    @property
    def stride(self) -> tuple[float, float]:
        """Crop pixels per heatmap pixel (x, y): 4.0 for every built-in model."""
        return (
            self.input_size[0] / self.heatmap_size[0],
            self.input_size[1] / self.heatmap_size[1],
        )

    @property
    def tiles(self) -> bool:
        """Whether `patch_size` divides `heatmap_size` (the encoder needs it)."""
        (wh, hh), (pw, ph) = self.heatmap_size, self.patch_size
        return wh % pw == 0 and hh % ph == 0

    @property
    def patch_grid(self) -> Size:
        """Number of patches (across, down): (16, 16) for the full models."""
        return (
            self.heatmap_size[0] // self.patch_size[0],
            self.heatmap_size[1] // self.patch_size[1],
        )

    @property
    def num_patches(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]

    def size_overrides(self) -> dict:
        """The ModelConfig fields that set a model to this crop and heatmap size."""
        return {"input_size": self.input_size, "heatmap_size": self.heatmap_size}


PAPER = Geometry()
# the smallest crop any run here uses (tests, benchmark dry runs): a quarter of the paper's sides
SMOKE = Geometry(tuple(v // 4 for v in PAPER.input_size))
