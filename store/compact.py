"""The compact modes' codecs (since schema 3): what the losses use, in a few kilobytes a view.

Two small codec objects, in the style of MMPose's keypoint codecs (`encode` -> stored arrays,
`decode` -> the training target), numpy but for the decoded tokens' product (torch:
`TokenBasis.decode`); the writer encodes, the reader decodes back into the full arrays, so the
losses and `train-student` see [K, Hh, Wh] heatmaps and [T, D] tokens as in every other mode.

`HeatmapWindows`: per sample and joint, the w x w window around the heatmap's peak (its first
argmax, the window shifted inside the map at the borders) as uint8 codes with the lossy mode's
quantizer (`store.quantize.quantize_heatmaps`: offset and step per window, the peak keeps its
argmax), plus the window's corner and the mean of the heatmap outside it. Decoding fills the
outside with that mean, so the decoded map has the teacher's total mass and the same argmax.
A mode with a grid (`compact-hq`) keeps the outside as a coarse map instead: the mean of each
cell of a gy x gx grid over the pixels outside the window, which halves to thirds the error of
the sh gradient the single mean leaves (docs/store.md, measured).
Why this keeps what the losses read: `sh` compares the teacher map with a Gaussian simulated at
the student's prediction, `cs` reads the teacher map at it; both weigh the teacher map where the
student predicts, which training brings to the peak, and the tail outside a window of 2.5 to 3.5
sigma (sigma 2 heatmap pixels at 64x48) holds about 1% of the map's energy.

`TokenBasis`: tokens [T, D] as codes in a basis fitted on the dump's first samples
(`store.schema.FIT_SAMPLES`, stored once per store): a mean per token position [T, D] (the
positional part: keypoint token k, patch p) and the top-r principal directions [r, D] of what is
left, pooled over positions. A token is its r coefficients, int8 with a per-token scale
(float16, rounded up so no code clips): error = the part outside the basis + half a step per
coefficient.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from distilpose.errors import StoreCorruptError, StoreFormatError
from store.quantize import (
    dequantize_heatmaps,
    dequantize_tokens,
    quantize_heatmaps,
    quantize_tokens,
)
from store.schema import FIT_SAMPLES, ArraySpec, StoreLayout, StoreMeta, array_compressors

# heatmaps_scale columns of a compact store: window corner (x0, y0), code offset and step, and
# the mean value outside the window; a mode with a grid adds its codes' offset and step
HEATMAP_PARAMS = ("x0", "y0", "offset", "step", "outside")
GRID_PARAMS = ("grid_offset", "grid_step")


@dataclass(frozen=True)
class HeatmapWindows:
    """Heatmaps [S, K, H, W] <-> a w x w window per joint: uint8 codes [S, K, w, w] and
    float32 params [S, K, 5] (`HEATMAP_PARAMS`).

    With a grid (gy, gx) the outside is kept coarsely instead of as one mean: the map is cut
    into gy x gx cells and each cell keeps the mean of its pixels outside the window (uint8,
    its own offset and step): codes [S, K, w * w + gy * gx] (the window's, then the cells'),
    params [S, K, 7] (`HEATMAP_PARAMS` + `GRID_PARAMS`). Decoded, an outside pixel gets its
    cell's mean, kept below the window's peak so the argmax stays the teacher's."""

    window: int  # w; at most the heatmap's shorter side
    grid: tuple[int, int] = (0, 0)  # (gy, gx) cells over the map; (0, 0): one outside mean

    def encode(self, heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = np.asarray(heatmaps, dtype=np.float32)
        s, k, hh, wh = h.shape
        w = self.window
        if not 1 <= w <= min(hh, wh):
            raise ValueError(f"window {w} does not fit {wh}x{hh} heatmaps")
        py, px = np.divmod(h.reshape(s, k, -1).argmax(-1), wh)  # [S, K] the first argmax
        x0 = np.clip(px - w // 2, 0, wh - w)
        y0 = np.clip(py - w // 2, 0, hh - w)
        flat = self._window_flat(s, k, hh, wh, x0, y0)  # [S, K, w * w]
        windows = np.take(h, flat).reshape(s, k, w, w)
        outside_n = hh * wh - w * w
        total = h.sum((2, 3), dtype=np.float64)
        inside = windows.sum((2, 3), dtype=np.float64)
        outside = (total - inside) / outside_n if outside_n else np.zeros_like(total)
        codes, scale = quantize_heatmaps(windows, 8)  # [S, K, w, w], [S, K, 2]
        params = np.concatenate(
            [np.stack([x0, y0], -1).astype(np.float32), scale, outside[..., None]], -1
        )
        if not self.has_grid:
            return codes, params.astype(np.float32)
        cells = self._cell_means(h, flat, outside.astype(np.float32))  # [S, K, gy, gx]
        grid_codes, grid_scale = quantize_heatmaps(cells, 8)
        codes = np.concatenate([codes.reshape(s, k, -1), grid_codes.reshape(s, k, -1)], -1)
        return codes, np.concatenate([params, grid_scale], -1).astype(np.float32)

    @property
    def has_grid(self) -> bool:
        return self.grid != (0, 0)

    def _cells(self, hh: int, wh: int) -> np.ndarray:
        """[H * W]: the grid cell of each heatmap pixel (row-major cells)."""
        gy, gx = self.grid
        ys, xs = (np.arange(hh) * gy) // hh, (np.arange(wh) * gx) // wh
        return (ys[:, None] * gx + xs[None, :]).reshape(-1)

    def _window_flat(self, s: int, k: int, hh: int, wh: int, x0, y0) -> np.ndarray:
        """[S, K, w * w]: the flat index into [S * K * H * W] of each window pixel."""
        ar = np.arange(self.window)
        corner = np.arange(s * k).reshape(s, k) * (hh * wh) + y0 * wh + x0  # [S, K]
        return corner[..., None] + (ar[:, None] * wh + ar).reshape(-1)

    def _cell_means(self, h: np.ndarray, flat: np.ndarray, outside: np.ndarray) -> np.ndarray:
        """[S, K, gy, gx]: each cell's mean over its pixels outside the window (`flat`, as
        `_window_flat` gives it; a cell the window covers whole gets the outside mean: no pixel
        reads it)."""
        s, k, hh, wh = h.shape
        gy, gx = self.grid
        onehot = np.zeros((hh * wh, gy * gx), np.float32)
        onehot[np.arange(hh * wh), self._cells(hh, wh)] = 1.0
        masked = h.reshape(-1).copy()
        kept = np.ones(s * k * hh * wh, np.float32)
        masked[flat.reshape(-1)] = 0.0
        kept[flat.reshape(-1)] = 0.0
        sums = masked.reshape(s, k, -1) @ onehot  # [S, K, G]
        counts = kept.reshape(s, k, -1) @ onehot
        means = np.where(counts > 0, sums / np.maximum(counts, 1), outside[..., None])
        return means.reshape(s, k, gy, gx).astype(np.float32)

    def decode(self, codes: np.ndarray, params: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(codes, params) -> heatmaps [S, K, H, W] float32; `size` = (W, H)."""
        wh, hh = size
        s, k, w = *codes.shape[:2], self.window
        x0, y0 = params[..., 0].astype(np.int64), params[..., 1].astype(np.int64)
        flat = self._window_flat(s, k, hh, wh, x0, y0)  # [S, K, w * w]
        rows = codes.reshape(s, k, -1, 1)  # [S, K, n, 1]: the quantizer's [S, K, H, W] form
        values = dequantize_heatmaps(rows[:, :, : w * w], params[..., 2:4]).reshape(s, k, -1)
        if self.has_grid:
            cells = dequantize_heatmaps(rows[:, :, w * w :], params[..., 5:7])[..., 0]
            # strictly below the peak: a cell rounded up to it must not take the argmax
            peak = np.nextafter(values.max(-1, keepdims=True), -np.inf)
            # [S, K, H * W]: np.take is 8x the fancy index's speed here
            out = np.take(np.minimum(cells, peak), self._cells(hh, wh), axis=-1)
        else:
            out = np.empty((s, k, hh * wh), dtype=np.float32)
            out[:] = params[..., 4, None]
        np.put(out, flat, values)  # flat C-order indices, in place whatever out's strides
        return out.reshape(s, k, hh, wh)


def heatmap_codec(meta: StoreMeta) -> HeatmapWindows:
    """The heatmap codec of a compact store (its window and grid)."""
    settings = meta.compact()
    return HeatmapWindows(settings.window, settings.grid)


@dataclass(frozen=True)
class TokenBasis:
    """Tokens [S, T, D] <-> int8 codes [S, T, r] and float16 scales [S, T] in a fitted basis.

    mean [T, D]: the mean token of each position; basis [r, D]: orthonormal rows."""

    mean: np.ndarray
    basis: np.ndarray

    @property
    def rank(self) -> int:
        return len(self.basis)

    @classmethod
    def fit(cls, tokens: np.ndarray, rank: int) -> TokenBasis:
        """PCA of tokens [S, T, D]: per-position mean, then the top `rank` eigenvectors of the
        pooled residuals' covariance (any rank <= D: directions the samples do not span get
        eigenvalue 0 and stay orthonormal). Signs fixed (largest entry positive): deterministic."""
        x = np.asarray(tokens, dtype=np.float64)
        d = x.shape[-1]
        if not 1 <= rank <= d:
            raise ValueError(f"rank {rank}: expected 1..{d} (the token dim)")
        mean = x.mean(0)
        res = (x - mean).reshape(-1, d)
        _, vecs = np.linalg.eigh(res.T @ res)  # ascending eigenvalues
        basis = vecs[:, ::-1][:, :rank].T  # [r, D]
        pick = np.abs(basis).argmax(1)
        basis *= np.sign(basis[np.arange(rank), pick])[:, None]
        return cls(mean.astype(np.float32), np.ascontiguousarray(basis, dtype=np.float32))

    def encode(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        coeffs = (np.asarray(tokens, dtype=np.float32) - self.mean) @ self.basis.T  # [S, T, r]
        return quantize_tokens(coeffs, np.float16)

    def decode(self, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """[S, T, D] float32. The product runs in torch, on torch's threads (one in a loader
        worker): numpy's OpenBLAS starts its own threads from rank 48 on, which spun a second
        core and halved a compact store's samples per CPU-second (store_bench)."""
        import torch

        coeffs = torch.from_numpy(dequantize_tokens(codes, scale.astype(np.float32)))
        out = (coeffs @ torch.from_numpy(self.basis)).numpy()
        out += self.mean  # in place: the same sums without a second [S, T, D] array (4x faster)
        return out

    def to_array(self) -> np.ndarray:
        """[T + r, D] float32: the mean rows, then the basis rows (how a store keeps it)."""
        return np.concatenate([self.mean, self.basis]).astype(np.float32)

    @classmethod
    def from_array(cls, a: np.ndarray, positions: int) -> TokenBasis:
        a = np.asarray(a, dtype=np.float32)
        return cls(a[:positions], a[positions:])


def bases_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of stored bases {output: [T + r, D] float32}, in sorted name order: the store's
    metadata keeps it, so a basis that is missing, zeroed or edited is refused, never used."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype=np.float32)
        h.update(f"{name}:{list(a.shape)}:".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---- the bases in a store (zarr arrays beside the per-slot ones, written once) ---------------

BASIS_SUFFIX = "_basis"  # array `<output>_basis` [T + r, D] float32


def token_outputs(meta: StoreMeta) -> tuple[str, ...]:
    """The token outputs a compact store keeps bases for (none in a heatmap-only store)."""
    return tuple(o for o in meta.teacher_outputs if o != "heatmaps")


def positions(meta: StoreMeta, output: str) -> int:
    """T of a token output: K keypoint tokens or P visual tokens."""
    return meta.num_keypoints if output == "keypoint_tokens" else meta.num_patches


def fit_samples(layout: StoreLayout) -> list[tuple[int, int, int]]:
    """(slot, instance, view) of the samples the bases are fitted on: the first `FIT_SAMPLES`
    slots of view 0, a random subset of the people (the slots are a permutation)."""
    n = min(layout.n, FIT_SAMPLES)
    return [(j, int(i), 0) for j, i in enumerate(layout.view_permutation(0)[:n])]


def fit_bases(meta: StoreMeta, tokens: dict[str, np.ndarray]) -> dict[str, TokenBasis]:
    """Bases of rank `meta.compact().rank` for the teacher's tokens {output: [n, T, D]}."""
    rank = meta.compact().rank
    bases = {}
    for output in token_outputs(meta):
        t = np.asarray(tokens.get(output, np.empty(0)))
        want = (positions(meta, output), meta.token_dim)
        if t.ndim != 3 or t.shape[1:] != want or not len(t) or not np.isfinite(t).all():
            raise StoreFormatError(
                f"{output} to fit the compact basis on: {list(t.shape)}; expected finite [n, "
                f"{want[0]}, {want[1]}] with n >= 1 (the teacher's outputs on the first slots)"
            )
        bases[output] = TokenBasis.fit(t, rank)
    return bases


def write_bases(group: object, bases: dict[str, TokenBasis]) -> str:
    """Create the basis arrays in a new store's zarr group; returns their digest."""
    arrays = {o + BASIS_SUFFIX: b.to_array() for o, b in bases.items()}
    for name, a in arrays.items():
        spec = ArraySpec(name, a.shape, "float32")
        group.create_array(
            name, shape=a.shape, chunks=a.shape, dtype="float32",
            compressors=array_compressors(spec), overwrite=True,
        )  # fmt: skip
        group[name][...] = a
    return bases_digest(arrays)


def read_bases(group: object, meta: StoreMeta, where: str) -> dict[str, TokenBasis]:
    """A compact store's bases, checked against `meta.basis_sha256`: a basis missing, deleted
    (zarr would read zeros), damaged or edited is refused (StoreCorruptError), never used."""
    arrays = {}
    for output in token_outputs(meta):
        name = output + BASIS_SUFFIX
        try:
            arrays[name] = np.asarray(group[name][...], dtype=np.float32)
        except KeyError:
            raise StoreCorruptError(
                f"{where}: array '{name}' (the compact token basis) is missing; expected it "
                "beside the codes (restore the store from a copy or rerun the dump into a new one)"
            ) from None
        except Exception as e:  # noqa: BLE001 - zarr's checksum and decode errors
            raise StoreCorruptError(
                f"{where}: array '{name}' (the compact token basis) cannot be read "
                f"({type(e).__name__}); expected intact data (restore the store from a copy)"
            ) from None
    if arrays and bases_digest(arrays) != meta.basis_sha256:
        raise StoreCorruptError(
            f"{where}: the compact token bases {sorted(arrays)} differ from the digest in the "
            f"store's metadata (basis_sha256 {meta.basis_sha256[:12] or 'empty'}...); expected "
            "the bases written with the store (restore it from a copy or rerun the dump)"
        )
    return {
        o: TokenBasis.from_array(arrays[o + BASIS_SUFFIX], positions(meta, o))
        for o in token_outputs(meta)
    }
