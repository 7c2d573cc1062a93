"""The lossy modes' codecs: teacher outputs quantized to small integers and back (the compact
modes, `store.compact`, use them on their windows and basis coefficients).

`lossy` stores heatmaps as uint8 codes, `lossy16` as uint16; both keep tokens as int8. Each code
array has a float32 `*_scale` array beside it (`store.schema.array_specs`), filled from what these
functions return. Pure numpy: the writer quantizes, the reader dequantizes.
"""

from __future__ import annotations

import numpy as np


def quantize_heatmaps(heatmaps: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """[S, K, H, W] float -> (codes uint8/uint16, [S, K, 2] float32 (offset, step)).

    Per sample and joint, [min, max] maps onto [0, 2^bits - 1]. The peak keeps its argmax: any
    other pixel that rounds to the top code is lowered by one code (error <= 1 step), so decoding
    the stored heatmap finds the same peak pixel as the teacher's.
    """
    top = (1 << bits) - 1
    h = heatmaps.astype(np.float32)
    s, k = h.shape[:2]
    flat = h.reshape(s, k, -1)
    lo = flat.min(-1)
    hi = flat.max(-1)
    step = (hi - lo) / top
    step = np.where(step > 0, step, 1.0).astype(np.float32)
    codes = np.rint((flat - lo[..., None]) / step[..., None])
    codes = np.clip(codes, 0, top)
    peak = flat.argmax(-1)
    at_top = codes == top
    at_top[np.arange(s)[:, None], np.arange(k)[None, :], peak] = False
    codes[at_top] = top - 1
    codes[np.arange(s)[:, None], np.arange(k)[None, :], peak] = np.where(hi > lo, top, 0)
    dtype = np.uint8 if bits == 8 else np.uint16
    return codes.astype(dtype).reshape(h.shape), np.stack([lo, step], -1).astype(np.float32)


def dequantize_heatmaps(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of `quantize_heatmaps`: [S, K, H, W] float32."""
    return codes.astype(np.float32) * scale[..., 1, None, None] + scale[..., 0, None, None]


def quantize_tokens(tokens: np.ndarray, scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """[S, T, D] float -> (int8 codes, [S, T] scale): symmetric, per token absmax/127.

    The scale is kept as `scale_dtype` (float16 in the compact modes), rounded up where the cast
    rounds it down, so no code clips and the error stays within half a step."""
    t = tokens.astype(np.float32)
    exact = np.abs(t).max(-1) / np.float32(127.0)
    scale = exact.astype(scale_dtype)
    scale = np.where(
        scale.astype(np.float32) < exact, np.nextafter(scale, scale_dtype(np.inf)), scale
    )
    scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)
    codes = np.clip(np.rint(t / scale.astype(np.float32)[..., None]), -127, 127).astype(np.int8)
    return codes, scale


def dequantize_tokens(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale[..., None]


def heatmap_bits(mode: str) -> int:
    return {"lossy": 8, "lossy16": 16}[mode]
