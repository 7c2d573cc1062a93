"""Limits on untrusted input, each defined once: JSON files and images a user hands us.

A hostile or broken file must fail with one line naming it, never with a RecursionError, a
4300-digit ValueError or a 5 GB allocation. Every limit can be raised with an environment
variable for the rare legitimate giant:

| limit                  | default                      | variable                      |
|------------------------|------------------------------|-------------------------------|
| JSON file size         | 2048 MiB                     | DISTILPOSE_MAX_JSON_MB        |
| JSON nesting           | Python's recursion limit     | (sys.setrecursionlimit)       |
| JSON integer length    | 4300 digits (Python's guard) | PYTHONINTMAXSTRDIGITS         |
| image pixels           | 89,478,485 (Pillow's guard)  | DISTILPOSE_MAX_IMAGE_PIXELS   |
| --config file size     | 1024 KiB                     | DISTILPOSE_MAX_CONFIG_KB      |

Image sizes are read from the file header (Pillow, lazily: no pixel is decoded) before OpenCV
decodes anything, so a valid 30000x30000 PNG costs a header read, not gigabytes.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import warnings

from distilpose.errors import BadImageError, BadInputError

_PIL_LOCK = threading.Lock()  # Pillow's own pixel guard is a global we lift while reading
DEFAULT_MAX_JSON_MB = 2048
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # Pillow's decompression-bomb guard
CONFIG_LIMIT_ENV = "DISTILPOSE_MAX_CONFIG_KB"
DEFAULT_MAX_CONFIG_KB = 1024  # a config file of options is a few hundred bytes


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise BadInputError(f"environment {name}={text!r}: expected an integer") from None


def max_json_bytes() -> int:
    return _env_int("DISTILPOSE_MAX_JSON_MB", DEFAULT_MAX_JSON_MB) << 20


def max_config_bytes() -> int:
    return _env_int(CONFIG_LIMIT_ENV, DEFAULT_MAX_CONFIG_KB) << 10


def max_image_pixels() -> int:
    return _env_int("DISTILPOSE_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)


def loads_json(
    data: bytes | str, source: object, error: type[Exception] = BadInputError, what: str = ""
):
    """Parse JSON text from `source` (named in errors) within the limits; `error` is raised,
    saying "not a JSON <what> file" for text that is not JSON."""
    limit = max_json_bytes()
    if len(data) > limit:
        raise error(
            f"{source}: JSON of {len(data):,} bytes exceeds the limit of {limit:,}; "
            "expected a smaller file (or raise DISTILPOSE_MAX_JSON_MB)"
        )
    try:
        return json.loads(data)
    except RecursionError:
        raise error(
            f"{source}: JSON nested more than about {sys.getrecursionlimit()} levels deep; "
            "expected a flat document"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        kind = f"JSON {what}" if what else "JSON"
        raise error(f"{source}: not a {kind} file ({str(e).splitlines()[0]})") from None
    except ValueError as e:  # int() of a number longer than Python's digit limit
        raise error(
            f"{source}: JSON holds a number too long to read ({str(e).splitlines()[0]}); "
            "expected ordinary numbers"
        ) from None


def load_json(path: object, error: type[Exception] = BadInputError, what: str = ""):
    """Read and parse a JSON file within the limits (the size is checked before reading)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        limit = max_json_bytes()
        if size > limit:
            raise error(
                f"{path}: JSON file of {size:,} bytes exceeds the limit of {limit:,}; "
                "expected a smaller file (or raise DISTILPOSE_MAX_JSON_MB)"
            )
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder; expected a JSON file") from None
    return loads_json(data, path, error, what)


def image_size_from_header(data: bytes | memoryview, source: object) -> tuple[int, int] | None:
    """(width, height) read from an encoded image's header without decoding; None if the
    format is one Pillow does not know (OpenCV may still decode it)."""
    from PIL import Image

    with _PIL_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # we judge the size
        try:
            with Image.open(io.BytesIO(data)) as im:
                return int(im.width), int(im.height)
        except Exception:  # noqa: BLE001 - unknown format or broken header: the decoder judges
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = guard


def check_image_pixels(width: int, height: int, source: object) -> None:
    limit = max_image_pixels()
    if width <= 0 or height <= 0 or width * height > limit:
        raise BadImageError(
            f"{source}: image of {width}x{height} pixels exceeds the limit of {limit:,} pixels "
            "(or is empty); expected a photo-sized image (or raise DISTILPOSE_MAX_IMAGE_PIXELS)"
        )
