"""What `predict` and `Inferencer` read: images, folders, globs, video files and cameras, as
`Frame`s.

A SOURCE is one of:

- an image file, a folder (its images, sorted by name, not recursive) or a glob pattern
  (`"shots/*.jpg"`, sorted); several of these may be given together;
- a video file (`.mp4`, `.avi`, `.mov`, `.mkv`, ...; whatever OpenCV's FFmpeg backend reads);
- a camera index (`0`, `1`, ...), read with OpenCV until the stream ends, `max_frames` is reached
  or the user interrupts.

Image ids: an image file named by a number (COCO's `000000000785.jpg`) has that number, other
images their 1-based position in the list; a video frame has its 0-based frame index.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from distilpose.data import read_image
from distilpose.errors import BadConfigError, BadImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
_GLOB_CHARS = frozenset("*?[")


@dataclass
class Frame:
    """One image to predict on.

    Attributes:
        image: [H, W, 3] uint8 BGR (OpenCV's order).
        name: the image's file name, or the video's file name for a frame of a video.
        image_id: the id its results carry (see the module docstring).
        frame_index: 0-based index in a video or camera stream; None for images.
    """

    image: np.ndarray
    name: str
    image_id: int
    frame_index: int | None = None


def list_images(images: str | Path | list[str | Path]) -> list[Path]:
    """Image files from folders (their images sorted by name, not recursive), image files and
    glob patterns, in the order given."""
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
        elif _GLOB_CHARS & set(str(item)):
            found = sorted(
                Path(p) for p in glob.glob(str(item)) if Path(p).suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise BadImageError(f"{item}: the pattern matches no images")
            paths.extend(found)
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


class ImageSource:
    """Image files, read one at a time."""

    kind = "images"

    def __init__(self, items: list[str | Path]) -> None:
        self.paths = list_images(items)
        self.ids = image_ids(self.paths)
        self.fps = 0.0

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[Frame]:
        for path, image_id in zip(self.paths, self.ids, strict=True):
            yield Frame(read_image(str(path)), path.name, image_id)


class VideoSource:
    """A video file or a camera, read frame by frame with OpenCV.

    Args:
        target: a video path or a camera index.
        max_frames: stop after this many frames (None: until the stream ends).
    """

    kind = "video"

    def __init__(self, target: str | Path | int, max_frames: int | None = None) -> None:
        self.target = target
        self.camera = isinstance(target, int)
        self.name = f"camera{target}" if self.camera else Path(target).name
        self.stem = self.name if self.camera else Path(target).stem
        what = f"camera {target}" if self.camera else str(target)
        capture = self._open()
        if not capture.isOpened():
            raise BadImageError(f"{what}: OpenCV cannot open this video source")
        self.fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        capture.release()
        self.max_frames = max_frames
        self.total = None if self.camera or count <= 0 else count
        if max_frames is not None:
            self.total = max_frames if self.total is None else min(self.total, max_frames)

    def __len__(self) -> int:
        return self.total or 0

    def _open(self) -> cv2.VideoCapture:
        """OpenCV's capture, its backends' warnings silenced (the failure is reported once, as
        one error line)."""
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        try:
            return cv2.VideoCapture(self.target if self.camera else str(self.target))
        finally:
            cv2.utils.logging.setLogLevel(level)

    def __iter__(self) -> Iterator[Frame]:
        capture = self._open()
        try:
            index = 0
            while self.max_frames is None or index < self.max_frames:
                ok, image = capture.read()
                if not ok and self.total is not None and index < self.total:
                    # the header promised more frames: a damaged or cut file, not the end
                    raise BadImageError(
                        f"{self.target}: cannot decode frame {index} (of {self.total} the file "
                        f"declares); expected a readable video (re-encode it, or pass "
                        f"--max-frames {index} to keep the frames before it)"
                    )
                if not ok:
                    break
                yield Frame(image, self.name, index, index)
                index += 1
        finally:
            capture.release()


def _is_camera(item: str | Path | int) -> bool:
    return isinstance(item, int) or (str(item).isdigit() and not Path(item).exists())


def open_source(
    sources: str | Path | int | list[str | Path | int], max_frames: int | None = None
) -> ImageSource | VideoSource:
    """The frames of SOURCE(s): any number of image sources, or one video or camera."""
    items = list(sources) if isinstance(sources, list | tuple) else [sources]
    if not items:
        raise BadConfigError(
            "SOURCE: nothing given; expected an image, folder, glob, video or camera index"
        )
    videos = [
        item for item in items if _is_camera(item) or Path(item).suffix.lower() in VIDEO_SUFFIXES
    ]
    if not videos:
        return ImageSource(items)  # type: ignore[arg-type]
    if len(items) > 1:
        raise BadConfigError(
            f"SOURCE: {videos[0]} is a video or camera; give one video or camera at a time, "
            "or only images"
        )
    item = items[0]
    if _is_camera(item):
        return VideoSource(int(item), max_frames)
    if not Path(item).is_file():
        raise BadImageError(f"{item}: video file not found")
    return VideoSource(Path(item), max_frames)
