"""`Inferencer`: a trained student (or teacher) with a person detector in front, in one call.

    from distilpose import Inferencer
    pose = Inferencer("student.pth")             # detector: fasterrcnn_mobilenet_v3_large_fpn
    result = pose("photo.jpg")                   # -> PoseResult
    result.keypoints                             # [N, 17, 2] image px

Called on an image array ([H, W, 3] uint8 BGR, as `cv2.imread` gives), an image path or a list
of those, it returns one `PoseResult` per image (a list for a list). A folder, glob or video path
returns a list over its images or frames. Frames are detected in groups of `frames_per_batch`,
and all people of a group go through the pose model in batches of `batch_size` crops, on the
device `device` ("auto": CUDA when there is one). `stream` does the same lazily for long videos
and cameras. Students are decoded from their coordinates, teachers from their heatmaps
(`distilpose.inference.topdown`), so a teacher checkpoint works the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from distilpose.data import PersonInstance
from distilpose.data.crop import box_to_center_scale
from distilpose.data.keypoints import NUM_KEYPOINTS
from distilpose.device import resolve_device
from distilpose.errors import BadConfigError, BadImageError
from distilpose.evaluation.metrics import to_coco_results
from distilpose.inference.config import InferConfig
from distilpose.inference.detector import (
    BOX_THR,
    DEFAULT_DETECTOR,
    NMS_THR,
    Detector,
    build_detector,
    keep_people,
)
from distilpose.inference.sources import IMAGE_SUFFIXES, Frame, open_source
from distilpose.inference.topdown import default_use_scores, predict_instances
from distilpose.models import build_from_checkpoint
from distilpose.viz.skeleton import draw_pose


@dataclass
class PoseResult:
    """Every person found in one image.

    Attributes:
        boxes: [N, 4] person boxes x, y, w, h (image px).
        box_scores: [N] the detector's scores.
        keypoints: [N, K, 2] x, y (image px).
        keypoint_scores: [N, K] in [0, 1].
        scores: [N] person scores: box score x mean keypoint score above 0.2 (paper Eq. 3).
        image_id: the id the COCO results carry (see `distilpose.inference.sources`).
        name: the image's file name (a video's for its frames; "" for arrays).
        frame_index: the frame's index in a video, else None.
    """

    boxes: np.ndarray
    box_scores: np.ndarray
    keypoints: np.ndarray
    keypoint_scores: np.ndarray
    scores: np.ndarray
    image_id: int = 0
    name: str = ""
    frame_index: int | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    def to_coco(self) -> list[dict]:
        """COCO keypoint results (one per person), with `bbox`, `file_name` and, for video
        frames, `frame_index` added."""
        preds = [
            {
                "image_id": self.image_id,
                "keypoints": np.concatenate(
                    [self.keypoints[i], self.keypoint_scores[i, :, None]], 1
                ),
                "score": float(self.scores[i]),
            }
            for i in range(len(self))
        ]
        results = to_coco_results(preds)
        for res, box in zip(results, self.boxes, strict=True):
            res["bbox"] = [round(float(v), 2) for v in box]
            if self.name:
                res["file_name"] = self.name
            if self.frame_index is not None:
                res["frame_index"] = self.frame_index
        return results

    def draw(self, image: np.ndarray, kpt_thr: float = 0.3) -> np.ndarray:
        """A copy of `image` (uint8 BGR) with every person's box and skeleton drawn."""
        canvas = image.copy()
        for i in range(len(self)):
            kpts = np.concatenate([self.keypoints[i], self.keypoint_scores[i, :, None]], 1)
            draw_pose(canvas, kpts, tuple(self.boxes[i]), kpt_thr)
        return canvas


class Inferencer:
    """Top-down pose estimation on whole images: detector, crops, pose model, decoding.

    Args:
        checkpoint: a student or teacher checkpoint (this project's or an official one).
        detector: a torchvision detector name (`distilpose.inference.detector.DETECTORS`), None for
            "each image is one person", or any callable taking a list of `Frame`s and returning
            per frame (boxes [N, 4] x, y, w, h, scores [N]), e.g. `BoxesFile(path)`.
        detector_weights: a local weights file for a named detector (None: torchvision's COCO
            weights from torch's cache, downloaded when online; "random": untrained).
        det_thr: a named detector's own score threshold (torchvision's box_score_thresh).
        box_thr, nms_thr: of every detector's (or boxes file's) boxes, those scoring above
            `box_thr` are kept, then greedy NMS at IoU `nms_thr` (MMPose's inferencer: 0.3, 0.3;
            `distilpose.inference.detector.keep_people`).
        det_size: the detector's input shorter side (None: the model's default).
        max_people: a named detector keeps at most this many people per image.
        config: the test-time settings (`InferConfig`: flip test, flip mode, DARK, score use,
            device, batch size); `use_scores=None` is read from the checkpoint (False for a
            student trained without the confidence loss: its keypoint scores are then 1 and
            people rank by box score).
        frames_per_batch: images detected together.

    Attributes:
        timings: seconds spent so far: {"frames", "detector_s", "pose_s"}.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        detector: str | Detector | None = DEFAULT_DETECTOR,
        *,
        detector_weights: str | Path | None = None,
        det_thr: float = 0.5,
        det_size: int | None = None,
        max_people: int = 100,
        box_thr: float = BOX_THR,
        nms_thr: float = NMS_THR,
        config: InferConfig = InferConfig(),
        frames_per_batch: int = 8,
    ) -> None:
        if frames_per_batch < 1:
            raise BadConfigError(f"frames_per_batch: got {frames_per_batch}; expected at least 1")
        self.device = resolve_device(config.device)
        self.model, meta = build_from_checkpoint(checkpoint, map_location=self.device)
        self.config = self.model.config
        use_scores = config.use_scores
        if use_scores is None:
            use_scores = default_use_scores(self.config.role, meta)
        # resolved once: every batch runs on this device with this score use
        self.infer = replace(config, device=self.device, use_scores=use_scores)
        self.detector = build_detector(
            detector,
            weights=detector_weights,
            score_thr=det_thr,
            device=self.device,
            size=det_size,
            max_people=max_people,
        )
        self.box_thr, self.nms_thr = float(box_thr), float(nms_thr)
        self.frames_per_batch = frames_per_batch
        self.timings = {"frames": 0, "detector_s": 0.0, "pose_s": 0.0}

    def __call__(
        self, inputs: np.ndarray | str | Path | Sequence[np.ndarray | str | Path]
    ) -> PoseResult | list[PoseResult]:
        """One image (array or image file) -> PoseResult; a list, folder, glob or video ->
        a list of them, in order."""
        if isinstance(inputs, np.ndarray) or (
            isinstance(inputs, str | Path)
            and Path(inputs).is_file()
            and Path(inputs).suffix.lower() in IMAGE_SUFFIXES
        ):
            return [r for _, r in self.stream([self._frame(inputs, 0)])][0]
        if isinstance(inputs, str | Path):
            return [r for _, r in self.stream(open_source(inputs))]
        frames = (self._frame(x, i) for i, x in enumerate(inputs))
        return [r for _, r in self.stream(frames)]

    @staticmethod
    def _frame(x: np.ndarray | str | Path, position: int) -> Frame:
        """An array (id: its 0-based position in the call) or an image file (id: from its name,
        see `distilpose.inference.sources`)."""
        if isinstance(x, np.ndarray):
            image = x
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=2)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise BadImageError(
                    f"image {position}: got {image.dtype} array of shape {image.shape}; "
                    "expected [H, W, 3] uint8 BGR"
                )
            return Frame(image, "", position)
        source = open_source(x)
        if len(source) != 1 or source.kind != "images":
            raise BadImageError(f"{x}: expected one image file in a list of images")
        return next(iter(source))

    def stream(self, frames: Iterable[Frame]) -> Iterator[tuple[Frame, PoseResult]]:
        """(frame, result) for each frame, lazily: frames are read, detected and posed in
        groups of `frames_per_batch`, so a long video or a camera never sits in memory."""
        group: list[Frame] = []
        for frame in frames:
            group.append(frame)
            if len(group) == self.frames_per_batch:
                yield from zip(group, self._predict(group), strict=True)
                group = []
        if group:
            yield from zip(group, self._predict(group), strict=True)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _predict(self, frames: list[Frame]) -> list[PoseResult]:
        t0 = time.perf_counter()
        detections = [
            keep_people(boxes, scores, self.box_thr, self.nms_thr)
            for boxes, scores in self.detector(frames)
        ]
        self._sync()
        t1 = time.perf_counter()
        width, height = self.config.input_size
        instances, owner, arrays = [], [], {}
        for pos, (frame, (boxes, box_scores)) in enumerate(zip(frames, detections, strict=True)):
            key = f"<frame {pos}>"
            arrays[key] = frame.image
            for box, score in zip(np.asarray(boxes, np.float64), box_scores, strict=True):
                center, scale = box_to_center_scale(box.tolist(), aspect_ratio=width / height)
                instances.append(
                    PersonInstance(
                        index=len(instances),
                        image_id=frame.image_id,
                        ann_id=-1,
                        image_path=key,
                        bbox=tuple(float(v) for v in box),
                        score=float(score),
                        keypoints=np.zeros((NUM_KEYPOINTS, 3), np.float32),
                        center=center,
                        scale=scale,
                        area=float(box[2] * box[3]),
                    )
                )
                owner.append(pos)
        preds = predict_instances(
            self.model,
            instances,
            self.infer,
            image_arrays=arrays,
            show_progress=False,
        )
        t2 = time.perf_counter()
        self.timings["frames"] += len(frames)
        self.timings["detector_s"] += t1 - t0
        self.timings["pose_s"] += t2 - t1
        owner_arr = np.asarray(owner, dtype=np.int64)
        results = []
        for pos, frame in enumerate(frames):
            mine = [preds[i] for i in np.flatnonzero(owner_arr == pos)]
            kpts = np.zeros((len(mine), NUM_KEYPOINTS, 3), np.float32)
            for i, p in enumerate(mine):
                kpts[i] = p["keypoints"]
            results.append(
                PoseResult(
                    boxes=np.array([p["bbox"] for p in mine], np.float32).reshape(-1, 4),
                    box_scores=np.array([p["box_score"] for p in mine], np.float32),
                    keypoints=kpts[..., :2].astype(np.float32),
                    keypoint_scores=kpts[..., 2].astype(np.float32),
                    scores=np.array([p["score"] for p in mine], np.float32),
                    image_id=frame.image_id,
                    name=frame.name,
                    frame_index=frame.frame_index,
                )
            )
        return results
