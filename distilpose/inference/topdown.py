"""Top-down inference: person instances in, keypoints in image pixels out.

The settings named below (`flip`, `flip_mode`, `dark`, `use_scores`) are `InferConfig` fields
(`distilpose.inference.config`).

For each `PersonInstance` the evaluation crop (no augmentation) is rendered, normalized and run
through the model; the output is decoded back to image pixels with `distilpose.data.codecs`:

- Students (`StudentOutput`): `coords` are normalized crop coordinates; the keypoint score is the
  raw `scores` head (trained with an L1 loss against teacher heatmap values, so about [0, 1]; the
  official code uses it raw). We clip it to [0, 1] before reporting and rescoring, in both flip
  modes; clipping only changes people whose raw scores leave [0, 1].
- Teachers (`TeacherOutput`): heatmaps decoded by argmax + quarter-pixel shift, or DARK
  (`dark=True`); the heatmap maxima are the keypoint scores.

Flip test (`flip=True`): the horizontally mirrored crop is run too and its answer mapped back and
averaged with the plain one.

- Students, `flip_mode="corrected"` (the DEFAULT): left/right joints swapped, `u' = 1 - u - 1/W_in`
  (a pixel at column i mirrors to W_in - 1 - i, as MMPose 1.x), and the scores swapped as well.
  For a flip-equivariant model the average equals the unflipped answer.
- Students, `flip_mode="official"`: what the released DistilPose code does, to reproduce its
  numbers: `u' = 1 - u` (no 1/W_in shift, so the average sits half an input pixel right) and the
  flipped scores averaged WITHOUT swapping left and right.
- Teachers: `HeatmapCodec.flip_back` (mirror, swap pairs, shift one heatmap pixel right, as the
  official MMPose 0.x code), heatmaps averaged, then decoded. `flip_mode` does not apply.

`use_scores=False` is for a student trained without the confidence loss ("cs"): its score head
never learned anything, and ranking people by it costs nearly all AP (the official undistilled
run scores ~0.03 AP). Keypoint scores are then all 1 and the instance score is the box score.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distilpose.data import PersonInstance, eval_crop_spec, read_image, render_crop
from distilpose.data.codecs import HeatmapCodec, RegressionCodec, crop_to_image
from distilpose.data.crop import normalize
from distilpose.data.keypoints import FLIP_INDEX
from distilpose.device import resolve_device
from distilpose.errors import BadConfigError
from distilpose.evaluation.metrics import rescore
from distilpose.inference.config import FLIP_MODES, InferConfig
from distilpose.models import StudentOutput, TeacherOutput
from distilpose.progress import progress

log = logging.getLogger(__name__)


def default_use_scores(role: str, meta: dict | None) -> bool:
    """Whether a model's keypoint scores may rank people, from its checkpoint meta.

    False only for a student whose meta lists its training losses ("losses": a list of names, a
    "reg,kt,..." string or a {name: weight} dict) without the confidence loss "cs" (or with weight
    0): its score head was never trained. Teachers and students of unknown recipe: True.
    """
    if role != "student" or not meta or meta.get("losses") is None:
        return True
    losses = meta["losses"]
    if isinstance(losses, str):
        names = {part.split("=")[0].strip() for part in losses.split(",") if part.strip()}
        weights = {}
        for part in losses.split(","):
            if "=" in part:
                name, value = part.split("=", 1)
                weights[name.strip()] = float(value)
        return "cs" in names and weights.get("cs", 1.0) > 0
    if isinstance(losses, dict):
        return float(losses.get("cs", 0.0) or 0.0) > 0
    return "cs" in {str(name) for name in losses}


class _EvalCrops(Dataset):
    """Evaluation crops of person instances: (uint8 BGR crop [H_in, W_in, 3], position).

    `images` maps an instance's `image_path` to an image already in memory (video frames,
    arrays); other paths are read from disk."""

    def __init__(
        self,
        instances: Sequence[PersonInstance],
        input_size: tuple[int, int],
        images: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.instances = instances
        self.input_size = input_size
        self.images = images or {}
        self._cached: tuple[str, np.ndarray] | None = None  # people of one image come together

    def __len__(self) -> int:
        return len(self.instances)

    def _image(self, path: str) -> np.ndarray:
        if path in self.images:
            return self.images[path]
        if self._cached is None or self._cached[0] != path:
            self._cached = (path, read_image(path))
        return self._cached[1]

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        inst = self.instances[i]
        spec = eval_crop_spec(inst)
        crop = render_crop(self._image(inst.image_path), spec, inst.keypoints, self.input_size)
        return crop.image, i


def _collate(batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, np.ndarray]:
    crops = np.stack([b[0] for b in batch])  # [B, H_in, W_in, 3] uint8 BGR
    return normalize(crops), np.array([b[1] for b in batch], dtype=np.int64)


def flip_student_output(
    coords: np.ndarray, scores: np.ndarray, input_width: int, flip_mode: str = "corrected"
) -> tuple[np.ndarray, np.ndarray]:
    """Map a student's answer on the mirrored crop back to the original crop.

    Args:
        coords: [B, K, 2] normalized crop coordinates predicted on the mirrored crop.
        scores: [B, K] keypoint scores predicted on the mirrored crop.
        input_width: W_in, the crop width in pixels.
        flip_mode: "corrected" (swap joints and scores, u' = 1 - u - 1/W_in) or "official"
            (swap joints only, u' = 1 - u; the released code's behaviour).

    Returns:
        (coords [B, K, 2], scores [B, K]) in the original crop's frame.
    """
    if flip_mode not in FLIP_MODES:
        raise BadConfigError(f"flip_mode: got {flip_mode!r}; expected one of {FLIP_MODES}")
    back = coords[:, FLIP_INDEX].copy()  # left joints of the mirror are right joints here
    if flip_mode == "corrected":
        back[..., 0] = 1.0 - back[..., 0] - 1.0 / input_width
        return back, scores[:, FLIP_INDEX]
    back[..., 0] = 1.0 - back[..., 0]
    return back, scores.copy()  # official: scores NOT swapped


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


class _HeatmapDecode:
    """Teacher outputs: heatmaps (with the flip test, the mirrored pass flipped back and
    averaged) decoded by argmax + quarter-pixel shift or DARK; the maxima are the scores."""

    def __init__(self, codec: HeatmapCodec, dark: bool, device: torch.device) -> None:
        self.codec, self.dark, self.device = codec, dark, device

    def gather(self, out: TeacherOutput, out_f: TeacherOutput | None) -> np.ndarray:
        """[B, K, Hh, Wh] on the host (waiting for the device: ends the forward timing)."""
        heatmaps = out.heatmaps.float()
        if out_f is not None:
            flipped = self.codec.flip_back(out_f.heatmaps.float())
            heatmaps = 0.5 * (heatmaps + torch.as_tensor(flipped, device=self.device))
        return heatmaps.cpu().numpy()

    def decode(self, heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(coords [B, K, 2] crop px, keypoint scores [B, K])."""
        coords, scores = self.codec.decode(heatmaps, dark=self.dark)
        return _to_numpy(coords), _to_numpy(scores)


class _RegressionDecode:
    """Student outputs: normalized `coords` (with the flip test, averaged with the mirrored
    pass mapped back by `flip_student_output`) and the raw `scores` head, clipped to [0, 1]."""

    def __init__(self, codec: RegressionCodec, input_width: int, flip_mode: str) -> None:
        self.codec, self.input_width, self.flip_mode = codec, input_width, flip_mode

    def gather(
        self, out: StudentOutput, out_f: StudentOutput | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(coords [B, K, 2] normalized, raw scores [B, K]) on the host."""
        coords, scores = _to_numpy(out.coords), _to_numpy(out.scores)
        if out_f is not None:
            coords_f, scores_f = flip_student_output(
                _to_numpy(out_f.coords), _to_numpy(out_f.scores), self.input_width, self.flip_mode
            )
            coords, scores = 0.5 * (coords + coords_f), 0.5 * (scores + scores_f)
        return coords, scores

    def decode(self, gathered: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(coords [B, K, 2] crop px, keypoint scores [B, K] in [0, 1])."""
        coords, scores = gathered
        return _to_numpy(self.codec.decode(coords)), np.clip(scores, 0.0, 1.0)


def _decoder(out: Any, decoders: dict[type, Any]) -> _HeatmapDecode | _RegressionDecode:
    """The decoder of the model's output type (TeacherOutput or StudentOutput)."""
    for kind, decoder in decoders.items():
        if isinstance(out, kind):
            return decoder
    raise BadConfigError(
        f"model output: got {type(out).__name__}; expected a TeacherOutput (heatmaps) or a "
        "StudentOutput (coords, scores)"
    )


def _instance_result(inst: PersonInstance, coords: np.ndarray, scores: np.ndarray) -> dict:
    """One person's prediction: image-px keypoints [K, 2] and their scores [K] with the box."""
    keypoints = np.concatenate([coords, scores[:, None]], axis=1)
    return {
        "index": inst.index,
        "image_id": inst.image_id,
        "ann_id": inst.ann_id,
        "bbox": tuple(float(v) for v in inst.bbox),
        "keypoints": keypoints.astype(np.float32),  # [K, 3]
        "box_score": float(inst.score),
        "score": rescore(scores, inst.score),
        "center": np.asarray(inst.center, dtype=np.float32),
        "scale": np.asarray(inst.scale, dtype=np.float32),
        "area": float(np.prod(np.asarray(inst.scale, dtype=np.float64) * 200.0)),
    }


def predict_instances(
    model: nn.Module,
    instances: Sequence[PersonInstance],
    config: InferConfig = InferConfig(),
    *,
    num_workers: int = 0,
    amp: bool = True,
    stats: dict | None = None,
    desc: str = "inference",
    image_arrays: Mapping[str, np.ndarray] | None = None,
    show_progress: bool = True,
) -> list[dict]:
    """Run top-down inference of `model` (student or teacher) over person instances.

    Args:
        model: a built model; `model.config.geometry` gives the crop and heatmap
            sizes.
        instances: `PersonInstance` records (GT boxes or detections).
        config: the test-time settings (`InferConfig`: flip test, flip mode, DARK, score use,
            device, batch size). The model is moved to the device and put in eval mode (its
            train/eval mode is restored afterwards). On CUDA with `amp`, the forward pass runs
            under float16 autocast (fp16 rather than bf16 keeps sub-pixel precision in `coords`).
            `use_scores=False`: keypoint scores all 1 and instance score = box score; None (no
            checkpoint meta here): the scores are used.
        num_workers: DataLoader worker processes for JPEG decoding and cropping.
        stats: if given, filled with "samples", "forward_s", "total_s", "forward_samples_per_s"
            (model only, flipped pass included) and "samples_per_s" (end to end).
        image_arrays: images in memory, by the `image_path` their instances name (others are
            read from disk).
        show_progress: False when the caller draws its own bar (frames of a video).

    Returns:
        One dict per instance, in input order: "index", "image_id", "ann_id", "bbox",
        "keypoints" ([K, 3] float32: image-pixel x, y and the keypoint score in [0, 1]),
        "box_score", "score" (box score x mean keypoint score above 0.2, paper Eq. 3),
        "center" [2], "scale" [2] and "area" (prod(scale * 200), the OKS-NMS area).
    """
    dev = resolve_device(config.device)
    use_scores = config.use_scores is not False
    model_config = getattr(model, "config", None)
    if model_config is None:
        raise BadConfigError(
            "model: no 'config' with its input and heatmap sizes; expected a model built by "
            "distilpose.models (build_model, build_from_checkpoint)"
        )
    geometry = model_config.geometry
    input_size = geometry.input_size
    regression, heatmap_codec = RegressionCodec(geometry), HeatmapCodec(geometry)
    use_amp = amp and dev.type == "cuda"
    decoders = {
        TeacherOutput: _HeatmapDecode(heatmap_codec, config.dark, dev),
        StudentOutput: _RegressionDecode(regression, input_size[0], config.flip_mode),
    }

    loader = DataLoader(
        _EvalCrops(instances, input_size, image_arrays),
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
    )
    was_training = model.training
    model.to(dev).eval()
    results: list[dict | None] = [None] * len(instances)
    forward_s = 0.0
    t_start = time.perf_counter()

    def forward(x: torch.Tensor) -> Any:
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            return model(x)

    try:
        with torch.inference_mode():
            bar = progress(loader, desc=desc, unit="batch", disable=None if show_progress else True)
            for images, positions in bar:
                images = images.to(dev, non_blocking=True)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                out = forward(images)
                out_f = forward(torch.flip(images, dims=[3])) if config.flip else None
                decoder = _decoder(out, decoders)
                gathered = decoder.gather(out, out_f)  # on the host: the forward pass is over
                forward_s += time.perf_counter() - t0
                coords_crop, kpt_scores = decoder.decode(gathered)
                if not use_scores:
                    kpt_scores = np.ones_like(kpt_scores)
                batch = [instances[int(p)] for p in positions]
                centers = np.stack([inst.center for inst in batch]).astype(np.float32)  # [B, 2]
                scales = np.stack([inst.scale for inst in batch]).astype(np.float32)  # [B, 2]
                coords_img = _to_numpy(crop_to_image(coords_crop, centers, scales, input_size))
                for j, (pos, inst) in enumerate(zip(positions, batch, strict=True)):
                    results[int(pos)] = _instance_result(inst, coords_img[j], kpt_scores[j])
    finally:
        model.train(was_training)
    total_s = time.perf_counter() - t_start
    if stats is not None:
        n = len(instances)
        stats.update(
            samples=n,
            forward_s=forward_s,
            total_s=total_s,
            forward_samples_per_s=n / forward_s if forward_s > 0 else 0.0,
            samples_per_s=n / total_s if total_s > 0 else 0.0,
            device=str(dev),
        )
    return results  # type: ignore[return-value]
