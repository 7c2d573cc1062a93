"""`distilpose predict`: keypoints for people in arbitrary images, without annotations.

No person detector ships with the toolkit: either a box per person is given in a JSON file, or the
whole image is taken as one person's box.

Boxes file (`boxes_json`): the COCO detections / results format, a JSON list of
``{"file_name": "a.jpg" or "image_id": 785, "bbox": [x, y, w, h], "score": 0.98}``
(`score` optional, default 1.0; entries with a `category_id` other than 1 are skipped). An entry
names its image by `file_name` (matched on the base name; the first image of that name wins) or
by `image_id`. Image ids: the number in the file name for COCO-style names
(`000000000785.jpg` -> 785), otherwise the image's 1-based position in the list of images.
Entries for images not being predicted are ignored; an image without entries has no people (no
whole-image fallback once a boxes file is given). Each box is one person: no NMS is applied.

Output: a COCO keypoint results JSON (`image_id`, `category_id` 1, flat `keypoints`, `score`,
plus `file_name` and `bbox` for convenience) and, optionally, one overlay per image
(`<stem>_pose<ext>` in `overlay_dir`) with each person's skeleton and joints above 0.3.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from distilpose.data import PersonInstance, read_image
from distilpose.data.crop import box_to_center_scale
from distilpose.data.keypoints import NUM_KEYPOINTS
from distilpose.errors import BadAnnotationError, BadImageError
from distilpose.eval_run import write_json_atomic
from distilpose.evaluation import to_coco_results
from distilpose.inference import default_use_scores, predict_instances, resolve_device
from distilpose.models import build_from_checkpoint
from distilpose.viz.skeleton import draw_pose

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
KPT_DRAW_THR = 0.3


def list_images(images: str | Path | list[str | Path]) -> list[Path]:
    """Image files from a folder (its images sorted by name, not recursive), one image, or a
    list mixing both, in the order given."""
    items = [images] if isinstance(images, str | Path) else list(images)
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise BadImageError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in folder")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise BadImageError(f"{path}: image file not found")
    if not paths:
        raise BadImageError("no images given")
    return paths


def image_ids(paths: list[Path]) -> list[int]:
    """COCO-style numeric names give their number, otherwise the 1-based position."""
    ids = [int(p.stem) if p.stem.isdigit() else i + 1 for i, p in enumerate(paths)]
    if len(set(ids)) != len(ids):  # mixed names could collide: fall back to positions
        ids = list(range(1, len(paths) + 1))
    return ids


def load_boxes(
    boxes_json: str | Path, paths: list[Path], ids: list[int]
) -> dict[int, list[tuple[list[float], float]]]:
    """Boxes per image position: {position: [(bbox_xywh, score), ...]} (see the module doc)."""
    try:
        entries = json.loads(Path(boxes_json).read_text())
    except (OSError, ValueError) as e:
        raise BadAnnotationError(f"{boxes_json}: not a readable JSON file ({e})") from e
    if not isinstance(entries, list):
        raise BadAnnotationError(f"{boxes_json}: expected a JSON list of box entries")
    by_name: dict[str, int] = {}
    for pos, p in enumerate(paths):
        by_name.setdefault(p.name, pos)
    by_id = {image_id: pos for pos, image_id in enumerate(ids)}
    boxes: dict[int, list[tuple[list[float], float]]] = defaultdict(list)
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "bbox" not in entry:
            raise BadAnnotationError(
                f"{boxes_json}: entry {n} has no 'bbox'; expected [x, y, w, h]"
            )
        if int(entry.get("category_id", 1)) != 1:
            continue
        if "file_name" in entry:
            pos = by_name.get(Path(str(entry["file_name"])).name)
        elif "image_id" in entry:
            pos = by_id.get(int(entry["image_id"]))
        else:
            raise BadAnnotationError(
                f"{boxes_json}: entry {n} names no image; expected 'file_name' or 'image_id'"
            )
        if pos is None:
            continue
        bbox = entry["bbox"]
        if (
            not isinstance(bbox, list | tuple)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) for v in bbox)
            or bbox[2] <= 0
            or bbox[3] <= 0
        ):
            raise BadAnnotationError(
                f"{boxes_json}: entry {n} 'bbox' is {bbox!r}; expected [x, y, w, h] with w, h > 0"
            )
        boxes[pos].append(([float(v) for v in bbox], float(entry.get("score", 1.0))))
    return boxes


def predict_images(
    checkpoint: str | Path,
    images: str | Path | list[str | Path],
    *,
    boxes_json: str | Path | None = None,
    out_json: str | Path,
    overlay_dir: str | Path | None = None,
    flip: bool = True,
    flip_mode: str = "corrected",
    device: str = "auto",
    batch_size: int = 32,
    use_scores: bool | None = None,
    kpt_thr: float = KPT_DRAW_THR,
) -> list[dict]:
    """Predict every person's keypoints in `images` (a folder, an image, or a list of both).

    Args:
        checkpoint: a student or teacher checkpoint.
        boxes_json: person boxes (format in the module docstring); None -> one whole-image box
            per image.
        out_json: where the COCO keypoint results go.
        overlay_dir: if given, one overlay image per input with the skeletons drawn.
        use_scores: None -> from the checkpoint meta (False for a student trained without the
            confidence loss); see `distilpose.inference`.
        kpt_thr: overlay joints and limbs need keypoint scores above it.

    Returns:
        The COCO results written to `out_json` (one per person, with `file_name` and `bbox`).
    """
    paths = list_images(images)
    ids = image_ids(paths)
    model, meta = build_from_checkpoint(checkpoint, map_location="cpu")
    config = model.config
    if use_scores is None:
        use_scores = default_use_scores(config.role, meta)
    width, height = config.input_size
    boxes = load_boxes(boxes_json, paths, ids) if boxes_json is not None else None

    instances: list[PersonInstance] = []
    owner: list[int] = []  # image position of each instance
    for pos, (path, image_id) in enumerate(zip(paths, ids, strict=True)):
        if boxes is None:
            h, w = read_image(str(path)).shape[:2]
            person_boxes = [([0.0, 0.0, float(w), float(h)], 1.0)]
        else:
            person_boxes = boxes.get(pos, [])
        for bbox, score in person_boxes:
            center, scale = box_to_center_scale(bbox, aspect_ratio=width / height)
            instances.append(
                PersonInstance(
                    index=len(instances),
                    image_id=image_id,
                    ann_id=-1,
                    image_path=str(path),
                    bbox=tuple(bbox),
                    score=score,
                    keypoints=np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32),
                    center=center,
                    scale=scale,
                    area=bbox[2] * bbox[3],
                )
            )
            owner.append(pos)

    predictions = predict_instances(
        model,
        instances,
        batch_size=batch_size,
        device=resolve_device(device),
        flip=flip,
        flip_mode=flip_mode,
        use_scores=use_scores,
        desc="predict",
    )
    results = to_coco_results(predictions)
    for res, pred, pos in zip(results, predictions, owner, strict=True):
        res["file_name"] = paths[pos].name
        res["bbox"] = [round(v, 2) for v in pred["bbox"]]
    write_json_atomic(out_json, results)

    if overlay_dir is not None:
        overlay_dir = Path(overlay_dir)
        overlay_dir.mkdir(parents=True, exist_ok=True)
        people: dict[int, list[dict]] = defaultdict(list)
        for pred, pos in zip(predictions, owner, strict=True):
            people[pos].append(pred)
        for pos, path in enumerate(paths):
            canvas = read_image(str(path))
            for pred in people.get(pos, []):
                draw_pose(canvas, pred["keypoints"], pred["bbox"], kpt_thr)
            target = overlay_dir / f"{path.stem}_pose{path.suffix.lower()}"
            if not cv2.imwrite(str(target), canvas):
                raise BadImageError(f"{target}: could not write the overlay image")
    return results
