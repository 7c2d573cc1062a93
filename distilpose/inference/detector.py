"""Person detectors in front of the pose model.

A detector is any callable that takes a list of `Frame`s and returns, per frame, the person
boxes [N, 4] (x, y, w, h in image px, float32) and their scores [N]. Three ship here:

- `TorchvisionDetector`: one of torchvision's COCO detectors (`DETECTORS`), people only.
  Weights: a local file (`weights=PATH`, read with `torch.load(weights_only=True)`), or
  torchvision's released COCO weights, taken from torch's hub cache
  (`$TORCH_HOME/hub/checkpoints`) or downloaded there when the machine is online (a download
  that stalls for DISTILPOSE_DOWNLOAD_TIMEOUT seconds, 60, fails). Offline (or
  with `DISTILPOSE_OFFLINE=1`) and not cached, one error line says which file to fetch and which
  option takes it. `weights="random"` builds it randomly initialised (speed measurements only).
- `BoxesFile`: boxes from a COCO detections / results JSON file (format below).
- `WholeImage`: each image is one person's box (for images that are already person crops).

Boxes file: a JSON list of ``{"file_name": "a.jpg" or "image_id": 785, "bbox": [x, y, w, h],
"score": 0.98}`` (`score` optional, default 1.0; entries with a `category_id` other than 1 are
skipped). An entry names its image by `file_name` (the base name; images only) or by `image_id`
(an image's id, or a video frame's index). An image without entries has no people.

Whatever the source, the `Inferencer` then keeps the boxes scoring above `box_thr` and removes
overlaps by greedy NMS at IoU `nms_thr` (`keep_people`; MMPose's top-down inferencer does the
same with bbox_thr=0.3, nms_thr=0.3): a detections file made for evaluation (every box down
to score 0) would otherwise draw several skeletons per person.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from distilpose.device import resolve_device
from distilpose.errors import BadAnnotationError, BadCheckpointError, BadConfigError
from distilpose.inference.sources import Frame
from distilpose.limits import MAX_COORD, env_seconds, load_json

Boxes = tuple[np.ndarray, np.ndarray]  # ([N, 4] x, y, w, h image px, [N] scores)
Detector = Callable[[Sequence[Frame]], list[Boxes]]

DETECTORS = ("fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn_v2")
DEFAULT_DETECTOR = DETECTORS[0]
PERSON_LABEL = 1  # "person" in torchvision's COCO category list
OFFLINE_ENV = "DISTILPOSE_OFFLINE"
DOWNLOAD_TIMEOUT_ENV = "DISTILPOSE_DOWNLOAD_TIMEOUT"
DOWNLOAD_TIMEOUT_S = 60.0
# torchvision resizes an image's shorter side to min_size, its longer side at most max_size
_MAX_TO_MIN_SIZE = 1333 / 800
BOX_THR = 0.3  # MMPose's top-down inferencer: bbox_thr=0.3 (boxes scoring above it are people)
NMS_THR = 0.3  # ... and nms_thr=0.3 between the kept boxes


def _empty() -> Boxes:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)


def _weights_enum(name: str):
    from torchvision.models import get_model_weights

    return get_model_weights(name).DEFAULT


def download_timeout() -> float:
    """Seconds a download may stall (no byte received) before it fails: DISTILPOSE_DOWNLOAD_
    TIMEOUT, default 60 (torch's hub download waits forever on a silent server)."""
    return env_seconds(DOWNLOAD_TIMEOUT_ENV, DOWNLOAD_TIMEOUT_S)


def _download(url: str, target: Path, timeout: float | None = None) -> None:
    """`url` into `target` (a temp file renamed when complete), each read bounded by
    `timeout` seconds; the sha256 prefix in torch's file names (`name-<hex>.pth`) checked."""
    import hashlib
    import tempfile
    import urllib.request

    from distilpose.progress import ProgressCounter

    timeout = download_timeout() if timeout is None else timeout
    match = re.search(r"-([a-f0-9]+)\.", target.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=timeout) as response,
        ):
            size = int(response.headers.get("Content-Length") or 0) or None
            with ProgressCounter(size, f"download {target.name}", "bytes") as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.advance(len(block))
        if match and not digest.hexdigest().startswith(match.group(1)):
            raise ValueError(f"sha256 {digest.hexdigest()[:12]} is not the file's {match.group(1)}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def released_weights_file(name: str) -> Path:
    """torchvision's COCO weights of detector `name`: the cached file, downloaded when missing
    and the machine is online; otherwise one error naming the file and the option to pass."""
    url = _weights_enum(name).url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if cached.is_file():
        return cached
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        reason = f"{OFFLINE_ENV} is set"
    else:
        try:
            _download(url, cached)
            return cached
        except Exception as e:  # no network, proxy, DNS, hash mismatch: all end the same way
            if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
                reason = f"no answer from the server within {download_timeout():g} s"
            else:
                first = str(e).splitlines()[0] if str(e) else ""
                reason = f"{type(e).__name__}: {first}".rstrip(": ")
    raise BadConfigError(
        f"detector {name}: its COCO weights are not in {cached.parent} and could not be "
        f"downloaded ({reason}); fetch {url} on a machine with internet and pass "
        "--detector-weights PATH (Python: detector_weights=PATH)"
    )


def load_detector_state(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """A detector state dict from a local file, read with weights_only=True (never unpickled).

    Accepts torchvision's released files (a plain state dict) and dicts holding one under
    "model" or "state_dict"."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadCheckpointError(f"{path}: detector weights file not found") from None
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadCheckpointError(
            f"{path}: not a loadable {name} weights file (read with weights_only=True: {first})"
        ) from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadCheckpointError(f"{path}: expected a {name} state dict of tensors")
    return obj


def keep_people(
    boxes: np.ndarray, scores: np.ndarray, box_thr: float = BOX_THR, nms_thr: float = NMS_THR
) -> Boxes:
    """The boxes [N, 4] (x, y, w, h) scoring above `box_thr`, then greedy NMS at IoU `nms_thr`
    (torchvision.ops.nms; nms_thr >= 1 keeps every box); in their original order."""
    from torchvision.ops import nms

    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    above = np.flatnonzero(scores > box_thr)
    if len(above) == 0:
        return _empty()
    xywh = torch.from_numpy(boxes[above])
    xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)  # [M, 4]
    kept = above[np.sort(nms(xyxy, torch.from_numpy(scores[above]), nms_thr).numpy())]
    return boxes[kept], scores[kept]


class TorchvisionDetector:
    """People from one of torchvision's COCO detectors (see the module docstring).

    Args:
        name: one of `DETECTORS`.
        weights: None (torchvision's COCO weights), a local file, or "random".
        score_thr: people scoring below it are dropped (also torchvision's box_score_thresh).
        device: "auto", "cpu", "cuda", ...
        size: the shorter side images are resized to before detection (torchvision's min_size;
            None: the model's default, 800 px). Smaller is faster and misses small people.
        max_people: at most this many people per image, the highest scoring (torchvision's
            box_detections_per_img).
        options: further keywords for the torchvision builder (e.g. rpn_post_nms_top_n_test).
    """

    def __init__(
        self,
        name: str = DEFAULT_DETECTOR,
        weights: str | Path | None = None,
        *,
        score_thr: float = 0.5,
        device: str | torch.device = "auto",
        size: int | None = None,
        max_people: int = 100,
        **options,
    ) -> None:
        if name not in DETECTORS:
            raise BadConfigError(
                f"detector: got {name!r}; expected one of {', '.join(DETECTORS)} or 'none'"
            )
        if size is not None and size < 32:
            raise BadConfigError(f"det_size: got {size}; expected at least 32 px")
        from torchvision.models import get_model_builder

        self.name = name
        self.score_thr = float(score_thr)
        self.device = resolve_device(device)
        kwargs = {"weights": None, "weights_backbone": None, "num_classes": 91}
        kwargs.update(box_score_thresh=self.score_thr, box_detections_per_img=max_people)
        if size is not None:
            kwargs.update(min_size=size, max_size=math.ceil(size * _MAX_TO_MIN_SIZE))
        kwargs.update(options)
        self.model = get_model_builder(name)(**kwargs)
        if not (isinstance(weights, str) and weights == "random"):
            path = released_weights_file(name) if weights is None else Path(weights)
            state = load_detector_state(path, name)
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise BadCheckpointError(
                    f"{path}: does not fit detector {name} ({len(missing)} missing keys, e.g. "
                    f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
                )
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, frames: Sequence[Frame]) -> list[Boxes]:
        if not frames:
            return []
        tensors = [
            torch.from_numpy(np.ascontiguousarray(f.image[..., ::-1]))  # BGR -> RGB
            .to(self.device)
            .permute(2, 0, 1)
            .float()
            .div_(255.0)
            for f in frames
        ]
        out = []
        for det in self.model(tensors):
            keep = (det["labels"] == PERSON_LABEL) & (det["scores"] >= self.score_thr)
            xyxy = det["boxes"][keep].float().cpu().numpy()
            xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
            out.append((xywh.astype(np.float32), det["scores"][keep].float().cpu().numpy()))
        return out


class WholeImage:
    """Each image is one person's box, score 1."""

    def __call__(self, frames: Sequence[Frame]) -> list[Boxes]:
        out = []
        for f in frames:
            h, w = f.image.shape[:2]
            out.append((np.array([[0.0, 0.0, w, h]], np.float32), np.ones(1, np.float32)))
        return out


def _is_number(value: object) -> bool:
    """A finite JSON number (not a bool: true is no coordinate)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object, path: object, n: int, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise BadAnnotationError(f"{path}: entry {n} '{key}' is {value!r:.40}; expected an integer")


class BoxesFile:
    """Person boxes from a COCO detections JSON file (format in the module docstring); the
    whole file is checked when it is opened, before any image is read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        entries = load_json(self.path, BadAnnotationError, "boxes")
        if not isinstance(entries, list):
            raise BadAnnotationError(f"{path}: expected a JSON list of box entries")
        self.matched = False  # whether any frame asked for so far had entries
        self.by_name: dict[str, list[tuple[int, list[float], float]]] = defaultdict(list)
        self.by_id: dict[int, list[tuple[int, list[float], float]]] = defaultdict(list)
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or "bbox" not in entry:
                raise BadAnnotationError(f"{path}: entry {n} has no 'bbox'; expected [x, y, w, h]")
            if _integer(entry.get("category_id", 1), path, n, "category_id") != 1:
                continue
            bbox = entry["bbox"]
            if (
                not isinstance(bbox, list | tuple)
                or len(bbox) != 4
                or not all(_is_number(v) and abs(v) <= MAX_COORD for v in bbox)
                or bbox[2] <= 0
                or bbox[3] <= 0
            ):
                raise BadAnnotationError(
                    f"{path}: entry {n} 'bbox' is {bbox!r:.80}; expected [x, y, w, h] with "
                    f"w, h > 0 (finite, within {MAX_COORD:g} px)"
                )
            score = entry.get("score", 1.0)
            if not _is_number(score):
                raise BadAnnotationError(
                    f"{path}: entry {n} 'score' is {score!r:.40}; expected a number"
                )
            record = (n, [float(v) for v in bbox], float(score))
            if "file_name" in entry:
                self.by_name[Path(str(entry["file_name"])).name].append(record)
            elif "image_id" in entry:
                self.by_id[_integer(entry["image_id"], path, n, "image_id")].append(record)
            else:
                raise BadAnnotationError(
                    f"{path}: entry {n} names no image; expected 'file_name' or 'image_id'"
                )

    def __call__(self, frames: Sequence[Frame]) -> list[Boxes]:
        out = []
        for f in frames:
            records = list(self.by_id.get(f.image_id, []))
            if f.frame_index is None:  # a video's file name would name every frame
                records += self.by_name.get(f.name, [])
            if not records:
                out.append(_empty())
                continue
            self.matched = True
            records.sort(key=lambda r: r[0])  # the file's order
            boxes = np.array([r[1] for r in records], np.float32)
            out.append((boxes, np.array([r[2] for r in records], np.float32)))
        return out


def build_detector(
    detector: str | Detector | None = DEFAULT_DETECTOR,
    *,
    weights: str | Path | None = None,
    score_thr: float = 0.5,
    device: str | torch.device = "auto",
    size: int | None = None,
    max_people: int = 100,
) -> Detector:
    """A detector from a name (`DETECTORS`, or "none"/None for `WholeImage`) or a callable."""
    if detector is None or (isinstance(detector, str) and detector.lower() == "none"):
        return WholeImage()
    if isinstance(detector, str):
        return TorchvisionDetector(
            detector, weights, score_thr=score_thr, device=device, size=size, max_people=max_people
        )
    if not callable(detector):
        raise BadConfigError(
            f"detector: got {type(detector).__name__}; expected a name, None or a callable"
        )
    return detector
