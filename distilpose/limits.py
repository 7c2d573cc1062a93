"""Limits on untrusted input, each defined once: JSON files and images a user hands us.

A hostile or broken file must fail with one line naming it, never with a RecursionError, a
4300-digit ValueError or a 5 GB allocation. Every limit can be raised with an environment
variable for the rare legitimate giant:

| limit                  | default                      | variable                      |
|------------------------|------------------------------|-------------------------------|
| JSON file size         | 512 MiB (COCO train: 238)    | DISTILPOSE_MAX_JSON_MB        |
| JSON parse memory      | 2048 MiB, estimated first    | DISTILPOSE_MAX_JSON_MEMORY_MB |
| JSON nesting           | Python's recursion limit     | (sys.setrecursionlimit)       |
| JSON integer length    | 4300 digits (Python's guard) | PYTHONINTMAXSTRDIGITS         |
| image pixels           | 89,478,485 (Pillow's guard)  | DISTILPOSE_MAX_IMAGE_PIXELS   |
| --config file size     | 1024 KiB                     | DISTILPOSE_MAX_CONFIG_KB      |
| annotation coordinates | within 1e6 px of the origin  | (MAX_COORD)                   |

Parsing JSON into Python objects costs 2-4 bytes of memory per byte of a real COCO file but up
to 30 per byte of junk (`[[],[],...]`: a list object per 3 bytes). So before parsing, the memory
is estimated from the text (`json_memory_estimate`: a bound, checked against Python 3.11's json
on the test data and on junk of every shape: it is never below what the parse costs) and a file
whose estimate exceeds the memory limit is refused; no JSON read costs more than that limit.

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

from distilpose.errors import BadConfigError, BadImageError, BadInputError

_PIL_LOCK = threading.Lock()  # Pillow's own pixel guard is a global we lift while reading
DEFAULT_MAX_JSON_MB = 512
DEFAULT_MAX_JSON_MEMORY_MB = 2048
# Memory per element of parsed JSON (CPython 3.11, 64-bit), each an upper bound: an object
# (dict, 184 bytes with a key) per "{", a list (56 + 8) per "[", a value and its slot (a float:
# 24 + 8) per ",", a string object (~60) per two quotes, a dict entry per ":", and the text
# itself four times (the strings' characters, the decoder's copies; nine times with a
# character beyond U+FFFF, which makes its whole string 4 bytes per character).
_JSON_COSTS = {b"{": 200, b"[": 72, b",": 40, b'"': 32, b":": 48}
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # Pillow's decompression-bomb guard
# |x|, |y|, w, h of boxes and keypoints in annotation, detection and boxes files: no photo is
# a million pixels wide, and 1e30 would overflow float32 to inf in a crop's affine
MAX_COORD = 1e6
CONFIG_LIMIT_ENV = "DISTILPOSE_MAX_CONFIG_KB"
DEFAULT_MAX_CONFIG_KB = 1024  # a config file of options is a few hundred bytes


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise BadInputError(f"environment {name}={text!r}: expected an integer") from None


def env_seconds(name: str, default: float) -> float:
    """A timeout from environment variable `name` (seconds > 0), `default` when unset."""
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1.0
    if not value > 0:  # also NaN: a wait must end
        raise BadConfigError(f"environment {name}={text!r}: expected a number of seconds > 0")
    return value


def max_json_bytes() -> int:
    return _env_int("DISTILPOSE_MAX_JSON_MB", DEFAULT_MAX_JSON_MB) << 20


def max_json_memory() -> int:
    return _env_int("DISTILPOSE_MAX_JSON_MEMORY_MB", DEFAULT_MAX_JSON_MEMORY_MB) << 20


def json_memory_estimate(data: bytes | str) -> int:
    """An upper bound of the bytes `json.loads(data)` allocates, counted without parsing
    (structural characters inside strings count too: the bound only gets looser)."""
    if isinstance(data, str):
        wide = bool(data) and max(data) > "\uffff"
        return (9 if wide else 4) * len(data) + sum(
            c * data.count(k.decode()) for k, c in _JSON_COSTS.items()
        )
    # a character beyond U+FFFF (4 UTF-8 bytes, lead byte F0-F4) makes its string 4 bytes wide
    wide = any(bytes([lead]) in data for lead in range(0xF0, 0xF5))
    return (9 if wide else 4) * len(data) + sum(c * data.count(k) for k, c in _JSON_COSTS.items())


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
    need, budget = json_memory_estimate(data), max_json_memory()
    if need > budget:
        raise error(
            f"{source}: JSON would take about {need >> 20:,} MiB of memory to read ({len(data):,} "
            f"bytes, mostly lists and objects), over the limit of {budget >> 20:,} MiB; "
            "expected a file of ordinary records (or raise DISTILPOSE_MAX_JSON_MEMORY_MB)"
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


def read_config_text(path: os.PathLike | str) -> str:
    """A config file's text (--config, an ablation grid): within `max_config_bytes()` and UTF-8,
    else one BadConfigError line naming the file."""
    limit = max_config_bytes()
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise BadConfigError(f"{path}: cannot read config file ({e.strerror})") from e
    if len(data) > limit:
        raise BadConfigError(
            f"{path}: config file larger than the limit of {limit:,} bytes; expected a small "
            f"file of options (or raise {CONFIG_LIMIT_ENV})"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "expected a TOML or YAML file saved as UTF-8"
        ) from None


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
