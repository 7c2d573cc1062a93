"""COCO person-keypoint files -> a stable list of `PersonInstance`s to crop.

Ground-truth boxes follow MMPose 0.x's COCO top-down loader: crowd annotations and people
without labelled keypoints are left out, and each box is clipped to the image as
`x2 = min(W - 1, x + max(0, w - 1))` (likewise y) before it becomes a centre and scale. Boxes left
empty by that clipping (zero width or height, or a zero `area`) are skipped and their count is
logged as one warning per file (logger `distilpose.data.coco`). Detection boxes (COCO results
format) are used as they are, like MMPose does.

Keypoints outside the image are kept as labelled; they simply get weight 0 in any crop they fall
outside of. Anything malformed (not JSON, missing fields, a box with a negative side or not four
numbers, keypoints not 3 x 17 numbers, detections for images that are not in the annotation file)
raises `BadAnnotationError` with one line naming the file, the record and what was expected.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import posixpath

import cv2
import numpy as np

from distilpose.data.crop import box_to_center_scale
from distilpose.data.instance import PersonInstance
from distilpose.data.keypoints import NUM_KEYPOINTS
from distilpose.errors import BadAnnotationError, BadConfigError, BadImageError
from distilpose.io import file_sha256
from distilpose.limits import MAX_COORD, check_image_pixels, image_size_from_header, load_json

logger = logging.getLogger(__name__)

PERSON_CATEGORY_ID = 1


def annotation_digest(ann_file) -> str:
    """sha256 hex of the annotation file's bytes (stores refuse a different dataset)."""
    return file_sha256(ann_file)


def resolve_image_path(image_root, file_name) -> str:
    """Join `file_name` to `image_root`, refusing names that would leave the root."""
    name = str(file_name)
    if (
        not name
        or name.startswith(("/", "\\"))
        or os.path.isabs(name)
        or (len(name) > 1 and name[1] == ":")  # Windows drive letters
    ):
        raise BadAnnotationError(
            f"image file_name {name!r} is absolute or empty; expected a path relative to the "
            f"image root {str(image_root)!r}"
        )
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise BadAnnotationError(
            f"image file_name {name!r} leaves the image root {str(image_root)!r}; "
            "expected a path inside it"
        )
    return os.path.join(os.path.abspath(os.fspath(image_root)), *norm.split("/"))


def read_image(path) -> np.ndarray:
    """uint8 BGR [H, W, 3]; BadImageError if the file is missing or cannot be decoded."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadImageError(f"{path}: image file not found")
    data = np.fromfile(path, dtype=np.uint8)
    size = image_size_from_header(data, path) if data.size else None
    if size is not None:  # before decoding: a huge image must not cost gigabytes first
        check_image_pixels(*size, path)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise BadImageError(f"{path}: cannot decode image; expected a JPEG/PNG file")
    return image


def _load_json(path, what: str):
    if not os.path.exists(path):
        raise BadAnnotationError(f"{path}: {what} file not found")
    return load_json(path, BadAnnotationError, what)


def _number_list(
    value, n: int, path, record: str, field: str, limit: float = MAX_COORD
) -> list[float]:
    """`value` as `n` floats, each finite and within +-`limit` (image px for coordinates)."""
    ok = isinstance(value, (list, tuple)) and len(value) == n
    if ok:
        try:
            out = [float(v) for v in value]
        except (TypeError, ValueError, OverflowError):
            ok = False
        else:
            ok = all(math.isfinite(v) and abs(v) <= limit for v in out)
    if not ok:
        single = n == 1 and isinstance(value, (list, tuple)) and len(value) == 1
        shown = repr(value[0] if single else value)  # a scalar field is wrapped in a list
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        within = f", within +-{limit:g}" if math.isfinite(limit) else ""
        raise BadAnnotationError(
            f"{path}: {record} '{field}' is {shown}; expected {n} number{'s' if n > 1 else ''} "
            f"(finite{within})"
        )
    return out


def _check_box(box: list[float], path, record: str) -> None:
    if box[2] < 0 or box[3] < 0:
        raise BadAnnotationError(
            f"{path}: {record} 'bbox' has width {box[2]:g} and height {box[3]:g}; "
            "expected a box [x, y, w, h] with w, h >= 0"
        )


def _validate_gt(data, path) -> None:
    """Check the structure pycocotools relies on before handing it the file."""
    if not isinstance(data, dict):
        raise BadAnnotationError(f"{path}: top level is {type(data).__name__}; expected an object")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise BadAnnotationError(
                f"{path}: missing list '{key}'; expected a COCO keypoints file"
            )
    for i, img in enumerate(data["images"]):
        for key in ("id", "file_name"):
            if not isinstance(img, dict) or key not in img:
                raise BadAnnotationError(f"{path}: images[{i}] has no '{key}'")
    image_ids = {img["id"] for img in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise BadAnnotationError(f"{path}: annotations[{i}] is not an object")
        record = f"annotation {ann.get('id', f'#{i}')}"
        for key in ("id", "image_id", "category_id"):
            if key not in ann:
                raise BadAnnotationError(f"{path}: {record} has no '{key}'")
        if ann["image_id"] not in image_ids:
            raise BadAnnotationError(
                f"{path}: {record} refers to image_id {ann['image_id']!r}; "
                "expected an id listed in 'images'"
            )


def _load_coco(path, data):
    from pycocotools.coco import COCO  # pycocotools prints progress lines; keep them quiet

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _clip_gt_box(box: list[float], width: float, height: float) -> list[float] | None:
    """MMPose 0.x's GT box cleaning; None when nothing of the box is left."""
    x, y, w, h = box
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x2 > x1 and y2 > y1:
        return [x1, y1, x2 - x1, y2 - y1]
    return None


def load_coco_instances(
    ann_file,
    image_root,
    *,
    dets_file=None,
    det_score_thr: float = 0.0,
    train: bool = False,
    aspect_ratio: float = 192 / 256,
) -> list[PersonInstance]:
    """Read person instances, ordered by image id, then annotation id / detection order.

    Without `dets_file`: ground-truth boxes (crowd and keypoint-less people skipped). With it:
    person detections (COCO results format, category 1) scoring >= `det_score_thr`; their
    keypoints are zeros. `train=True` asks for training instances, so a `dets_file` is refused.
    """
    if train and dets_file is not None:
        raise BadConfigError("training instances come from ground-truth boxes; got a dets_file")
    data = _load_json(ann_file, "COCO annotation")
    _validate_gt(data, ann_file)
    coco = _load_coco(ann_file, data)
    images = {img["id"]: img for img in data["images"]}
    paths = {i: resolve_image_path(image_root, img["file_name"]) for i, img in images.items()}

    raw: list[dict] = []
    if dets_file is None:
        raw, skipped = _gt_records(coco, images, ann_file)
        if skipped:
            logger.warning(
                "%s: skipped %d ground-truth boxes that are empty after clipping to the image",
                ann_file,
                skipped,
            )
    else:
        raw = _det_records(dets_file, images, det_score_thr)

    instances = []
    for rec in raw:
        center, scale = box_to_center_scale(rec["bbox"], aspect_ratio)
        instances.append(
            PersonInstance(
                index=len(instances),
                image_id=rec["image_id"],
                ann_id=rec["ann_id"],
                image_path=paths[rec["image_id"]],
                bbox=tuple(rec["bbox"]),
                score=rec["score"],
                keypoints=rec["keypoints"],
                center=center,
                scale=scale,
                area=rec["area"],
            )
        )
    return instances


def _gt_records(coco, images: dict, path) -> tuple[list[dict], int]:
    out, skipped = [], 0
    for image_id in sorted(images):
        img = images[image_id]
        ann_ids = sorted(coco.getAnnIds(imgIds=[image_id], catIds=[PERSON_CATEGORY_ID]))
        for ann in coco.loadAnns(ann_ids):
            record = f"annotation {ann['id']}"
            # Every person record is checked, also those skipped below.
            for key in ("keypoints", "bbox"):
                if key not in ann:
                    raise BadAnnotationError(f"{path}: {record} has no '{key}'")
            kpts = _number_list(ann["keypoints"], 3 * NUM_KEYPOINTS, path, record, "keypoints")
            kpts = np.asarray(kpts, dtype=np.float32).reshape(NUM_KEYPOINTS, 3)
            box = _number_list(ann["bbox"], 4, path, record, "bbox")
            _check_box(box, path, record)
            if ann.get("iscrowd", 0):
                continue
            num = ann.get("num_keypoints", int(np.count_nonzero(kpts[:, 2] > 0)))
            if num == 0 or not np.any(kpts[:, 2] > 0):
                continue
            width, height = _image_size(img, path)
            clean = _clip_gt_box(box, width, height)
            area = box[2] * box[3]
            if "area" in ann:  # COCO's segment area: inf or NaN would pass "area <= 0"
                area = _number_list([ann["area"]], 1, path, record, "area", math.inf)[0]
            if clean is None or area <= 0:
                skipped += 1
                continue
            out.append(
                {
                    "image_id": image_id,
                    "ann_id": int(ann["id"]),
                    "bbox": clean,
                    "score": 1.0,
                    "keypoints": kpts,
                    "area": area,
                }
            )
    return out, skipped


def _image_size(img: dict, path) -> tuple[float, float]:
    try:
        width, height = float(img["width"]), float(img["height"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise BadAnnotationError(
            f"{path}: image {img.get('id')!r} has no numeric 'width'/'height'"
        ) from None
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        raise BadAnnotationError(
            f"{path}: image {img.get('id')!r} has width {width:g} and height {height:g}; "
            "expected finite positive numbers"
        )
    return width, height


def _det_records(dets_file, images: dict, thr: float) -> list[dict]:
    dets = _load_json(dets_file, "detections")
    if not isinstance(dets, list):
        raise BadAnnotationError(
            f"{dets_file}: top level is {type(dets).__name__}; expected a list of detections "
            "in the COCO results format"
        )
    by_image: dict[int, list[dict]] = {}
    empty = 0  # person boxes of zero width or height: nothing to crop
    for i, det in enumerate(dets):
        record = f"detection {i}"
        if not isinstance(det, dict):
            raise BadAnnotationError(f"{dets_file}: {record} is not an object")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise BadAnnotationError(
                    f"{dets_file}: {record} has no '{key}'; expected image_id, category_id, "
                    "bbox, score"
                )
        if det["image_id"] not in images:
            raise BadAnnotationError(
                f"{dets_file}: {record} is for image_id {det['image_id']!r}, which is not in "
                "the annotation file; expected detections of the same dataset"
            )
        if det["category_id"] != PERSON_CATEGORY_ID:
            continue
        box = _number_list(det["bbox"], 4, dets_file, record, "bbox")
        _check_box(box, dets_file, record)
        score = _number_list([det["score"]], 1, dets_file, record, "score")[0]
        if score < thr:
            continue
        if box[2] == 0 or box[3] == 0:
            empty += 1
            continue
        by_image.setdefault(det["image_id"], []).append(
            {
                "image_id": det["image_id"],
                "ann_id": -1,
                "bbox": box,
                "score": score,
                "keypoints": np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32),
                "area": box[2] * box[3],
            }
        )
    if empty and not by_image:
        raise BadAnnotationError(
            f"{dets_file}: all {empty} person detections scoring >= {thr:g} have an empty box "
            "(zero width or height, e.g. [0, 0, 0, 0]); expected boxes [x, y, w, h] with w, h > 0"
        )
    if empty:
        logger.warning("%s: skipped %d person detections with an empty box", dets_file, empty)
    return [rec for image_id in sorted(by_image) for rec in by_image[image_id]]
