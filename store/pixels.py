"""Crop pixels in the store: how a crop is encoded at dump time and decoded for training.

Formats (`StoreMeta.pixels`), one variable-length byte string per slot in the `pixels` array:

- `jpeg`: baseline JPEG of the uint8 BGR crop at `StoreMeta.jpeg_quality` (95 by default),
  OpenCV's libjpeg-turbo, 4:4:4 (no chroma subsampling): about 28 kB for a 192x256 COCO crop,
  0.3 ms to decode on one core, mean error 1.4 levels. The usual 4:2:0 saves a fifth of the
  bytes but nearly doubles the error (2.3 levels; 3.5 at the tiny models' 96x128), and the
  student is evaluated on crops that were never re-encoded.
- `lossless`: the crop's rows delta-coded along x (uint8, wrapping: PNG's "Sub" filter), then
  zstd level 1 (about 79 kB, 0.2 ms to decode). Measured on the COCO crops of the tests (see
  benchmarks/results/store_bench.md): PNG at level 1 is the same size (77 kB) but decodes 5x
  slower (1.1 ms), and plain zstd on the raw crop is 40% larger (111 kB).
- `canvas` (schema 4): each person's canvas (`distilpose.data.canvas`), once per person, JPEG
  like `jpeg` (`encode_crop(canvas, "jpeg")`, `decode_canvas`); a view's crop is warped from the
  decoded canvas by its spec, and `crop_digest` is of that warped crop.
- `none`: no pixels; training re-renders the crop from the image files, as in schema version 1.

`dump-teacher --pixels auto` (the default) is a choice, not a format (`choose_pixels`): an
existing store keeps its own; a new one gets `canvas` from `CANVAS_FROM_VIEWS` views on and `jpeg`
below (a canvas holds about 2.9 crops' bytes with the paper's recipe, 1.1 with the mild one:
benchmarks/results/canvas_bench.md, so from 3 views on it is smaller whatever the recipe).

The dump encodes the rendered crop, decodes it again and runs the teacher on the decoded pixels,
and the store's `crop_digest` is the sha256 of those decoded pixels (uint8 BGR [H, W, 3], C
order), so a student reading the store sees exactly what the teacher saw, and the digest proves
it. Decoding is deterministic for a given decoder; the reference decoders are OpenCV and
torchvision on the CPU, which agree byte for byte (both libjpeg-turbo; tested). The digest is
of OpenCV's pixels (the dump's decoder, `StoreMeta.pixel_decoder`): training checks it on
torchvision's and, where they differ, decodes again with OpenCV to tell another libjpeg build
(it then decodes with OpenCV) from a damaged crop (student_train/data.py). A GPU decode
(nvJPEG) may differ from them by a few levels in a few pixels; the digest is not checked there.
"""

from __future__ import annotations

import numpy as np

from distilpose.errors import BadConfigError
from store.schema import JPEG_QUALITY, PIXEL_FORMATS

LOSSLESS_ZSTD_LEVEL = 1
PIXEL_CHOICES = ("auto", *PIXEL_FORMATS)  # what a dump may ask for (`choose_pixels`)
CANVAS_FROM_VIEWS = 3  # `auto`: a new store of this many views or more keeps canvases
__all__ = [
    "PIXEL_CHOICES",
    "PIXEL_FORMATS",
    "choose_pixels",
    "canvas_crop",
    "decode_canvas",
    "encode_canvas",
    "decode_crop",
    "decode_rgb_batch",
    "decode_rgb_crops",
    "encode_crop",
]


def choose_pixels(requested: str, views: int, existing: str | None) -> str:
    """The pixel format a dump writes: `requested` unless it is "auto", which keeps an
    existing store's format (`existing`; None: no store yet) and otherwise picks `canvas` for
    `views >= CANVAS_FROM_VIEWS`, `jpeg` below (the module docstring says why)."""
    if requested not in PIXEL_CHOICES:
        raise BadConfigError(f"pixels {requested!r}: expected one of {PIXEL_CHOICES}")
    if requested != "auto":
        return requested
    if existing is not None:
        return existing
    return "canvas" if views >= CANVAS_FROM_VIEWS else "jpeg"


def _zstd():
    from numcodecs import Zstd

    return Zstd(level=LOSSLESS_ZSTD_LEVEL)


def encode_crop(image: np.ndarray, pixels: str, quality: int = JPEG_QUALITY) -> bytes:
    """uint8 BGR [H, W, 3] -> the stored bytes of format `pixels` ('jpeg' or 'lossless')."""
    import cv2

    image = np.ascontiguousarray(image, dtype=np.uint8)
    if pixels == "jpeg":
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
        ok, buf = cv2.imencode(".jpg", image, params)
        if not ok:
            raise ValueError(f"JPEG encoding of a {image.shape} crop failed")
        return buf.tobytes()
    if pixels == "lossless":
        delta = image.copy()
        delta[:, 1:] -= image[:, :-1]  # uint8 wraps: exact, and cumsum undoes it
        return bytes(_zstd().encode(delta))
    raise ValueError(f"pixels '{pixels}': expected 'jpeg' or 'lossless'")


def decode_crop(data: bytes, pixels: str, input_size: tuple[int, int]) -> np.ndarray:
    """Stored bytes -> uint8 BGR [H, W, 3] (the layout `crop_digest` hashes)."""
    import cv2

    w, h = int(input_size[0]), int(input_size[1])
    buf = np.frombuffer(data, dtype=np.uint8)
    if pixels == "jpeg":
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
        if image is None or image.shape != (h, w, 3):
            raise ValueError(f"stored JPEG crop does not decode to {w}x{h}x3")
        return image
    if pixels == "lossless":
        raw = np.frombuffer(_zstd().decode(buf), dtype=np.uint8)
        if raw.size != h * w * 3:
            raise ValueError(f"stored lossless crop holds {raw.size} bytes; expected {w}x{h}x3")
        return np.cumsum(raw.reshape(h, w, 3), axis=1, dtype=np.uint8)
    raise ValueError(f"pixels '{pixels}': expected 'jpeg' or 'lossless'")


def decode_canvas(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """A canvas store's stored canvas -> uint8 BGR [height, width, 3] (OpenCV, the dump's
    decoder); `size` (width, height) is its `canvas` row's."""
    import cv2

    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if image is None or image.shape != (int(size[1]), int(size[0]), 3):
        raise ValueError(f"stored canvas does not decode to {size[0]}x{size[1]}x3")
    return image


def encode_canvas(
    image: np.ndarray,
    inst: object,
    recipe: object,
    input_size: tuple[int, int],
    quality: int = JPEG_QUALITY,
) -> tuple[bytes, np.ndarray]:
    """A person's canvas as a canvas store keeps it: its pixels cut from the uint8 BGR image
    and JPEG-encoded (`encode_crop`), and its geometry [5] (`Canvas.to_array`). It depends on
    the person, the recipe and the image only, so every view's dump makes the same bytes."""
    from distilpose.data.canvas import canvas_for, render_canvas

    canvas = canvas_for(inst, recipe, (image.shape[1], image.shape[0]), input_size)
    return encode_crop(render_canvas(image, canvas), "jpeg", quality), canvas.to_array()


def canvas_crop(
    data: bytes, canvas_row: np.ndarray, spec_row: np.ndarray, input_size: tuple[int, int]
) -> np.ndarray:
    """One slot of a canvas store -> its crop, uint8 BGR [H_in, W_in, 3]: the stored canvas
    (`data`, its `canvas` row [5]) decoded and warped by the slot's spec [8], as the dump warped
    it for the teacher (ValueError: the bytes do not decode to the canvas's size)."""
    from distilpose.data.canvas import Canvas, warp_from_canvas
    from distilpose.data.crop import CropSpec

    canvas = Canvas.from_array(canvas_row)
    spec = CropSpec.from_array(np.asarray(spec_row, dtype=np.float64))
    return warp_from_canvas(decode_canvas(data, canvas.size), spec, canvas, input_size)


# The CPU decoder of JPEG batches, chosen by benchmarks/store_bench.py ("CPU JPEG decoders"):
# both are libjpeg-turbo and give the same pixels; torchvision writes the RGB [3, H, W] layout
# the model wants directly, OpenCV needs a flip and transpose after.
CPU_JPEG_DECODER = "torchvision"


def decode_rgb_crops(datas, pixels: str, input_size: tuple[int, int], decoder: str = ""):
    """Stored bytes of a batch -> uint8 RGB torch tensors [3, H, W] on the CPU, one per crop
    (unstacked: `normalize_rgb` casts them straight into a batch of floats, a copy saved).

    decoder: "torchvision" or "opencv" for JPEG (default `CPU_JPEG_DECODER`); lossless crops
    always go through `decode_crop`.
    """
    import torch

    if pixels == "jpeg" and (decoder or CPU_JPEG_DECODER) == "torchvision":
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        return decode_jpeg(tensors, mode=ImageReadMode.RGB)
    crops = np.stack([decode_crop(d, pixels, input_size) for d in datas])
    return list(torch.from_numpy(np.ascontiguousarray(crops[..., ::-1].transpose(0, 3, 1, 2))))


def decode_rgb_batch(datas, pixels: str, input_size: tuple[int, int], decoder: str = ""):
    """`decode_rgb_crops` stacked: uint8 RGB [B, 3, H, W]."""
    import torch

    return torch.stack(decode_rgb_crops(datas, pixels, input_size, decoder))
