"""Checkpoints: safe loading, atomic saving, official-key renaming, identification.

Two file layouts are read, both with `torch.load(path, map_location="cpu", weights_only=True)`
(pickled code is refused, never run):

- this project's: `{"format": "distilpose/1", "model": ModelConfig.to_dict(), "state_dict",
  "meta", ...}`; `build_from_checkpoint` rebuilds the exact model from "model";
- official MMPose 0.x (yshMars/DistilPose): `{"state_dict", "meta", "optimizer"}` with keys
  `backbone.*` and `keypoint_head.tokenpose.*` (teachers) or `keypoint_head.tokenhead.*`
  (students), optionally behind `module.`; a bare state dict works too. The model is identified
  from the keys and shapes. MMPose 0.x SimpleBaseline / DeepPose files (`backbone.*` ResNet,
  `keypoint_head.deconv_layers.*` + `keypoint_head.final_layer.*`, or `keypoint_head.fc.*`)
  load the same way; DeepPose's `head.confidence.*` (scores, sigmas: not in MMPose) may be
  absent from them and then keeps its initial values (`OPTIONAL_KEYS`).

`checkpoint_filter_fn` (in `state_io`, with the file reading) is the one place foreign keys are
renamed to ours (`head.*`).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from distilpose.errors import BadCheckpointError, BadConfigError
from distilpose.io import atomic_open
from distilpose.models.complexity import count_params
from distilpose.models.layers import ModelConfig
from distilpose.models.registry import MODEL_NAMES, build_model, create_model, model_config
from distilpose.models.state_io import (
    OFFICIAL_HEAD_PREFIXES,
    checkpoint_filter_fn,
    diff_state,
    mismatch_message,
    read_checkpoint_file,
    unpack_checkpoint,
    unwrap,
)

FORMAT = "distilpose/1"
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# ---------------------------------------------------------------------------------------------
# Reading


def _load_state(model: nn.Module, state: dict, source: str, strict: bool) -> None:
    state = checkpoint_filter_fn(state)
    own = model.state_dict()
    missing, unexpected, bad = diff_state(state, {k: v.shape for k, v in own.items()})
    if strict and (missing or unexpected or bad):
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        message = mismatch_message(source, name, missing, unexpected, bad)
        fits = _identify_state(state)["model"]
        if fits and fits != name:
            message += f"; the keys fit built-in model '{fits}'"
        raise BadCheckpointError(message)
    if missing or unexpected or bad:
        warnings.warn(
            f"{source}: loaded non-strictly: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(bad)} shape-mismatched keys skipped",
            stacklevel=3,
        )
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)


def load_checkpoint(
    model: nn.Module, path_or_state: str | os.PathLike | dict, strict: bool = True
) -> dict:
    """Load a checkpoint file (or an already loaded checkpoint dict / state dict) into `model`.

    Official keys are renamed by `checkpoint_filter_fn`. With `strict` every tensor of the file
    must be used and every model tensor present with its shape, else one BadCheckpointError lists
    the missing, unexpected and shape-mismatched keys. Returns the file's "meta" ({} if none).
    """
    if isinstance(path_or_state, dict):
        obj, source = path_or_state, "<checkpoint dict>"
    else:
        obj, source = read_checkpoint_file(path_or_state), str(path_or_state)
    state, meta, _, _ = unpack_checkpoint(obj, source)
    _load_state(unwrap(model), state, source, strict)
    return dict(meta)


# ---------------------------------------------------------------------------------------------
# Writing


def _check_plain(value: object, where: str) -> None:
    """Refuse what `weights_only=True` could not load back (so a save never makes a bad file)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise BadConfigError(f"checkpoint {where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, torch.Tensor | str | int | float | bool | type(None)):
        raise BadConfigError(
            f"checkpoint {where} is a {type(value).__name__}; expected tensors, numbers, "
            "strings, lists and dicts only (convert numpy values with .tolist())"
        )


def _unwritable(path: Path, e: OSError) -> BadCheckpointError:
    return BadCheckpointError(
        f"{path}: cannot write the checkpoint ({e.strerror or e}); expected a writable folder "
        "with free space; the previous file, if any, is unchanged"
    )


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, *, meta: dict, extra: dict | None = None
) -> None:
    """Write `{"format", "model": config.to_dict(), "state_dict", "meta", **extra}` atomically:
    a temporary file in the same directory, flushed and fsynced, then `os.replace`d into place,
    so a crash leaves either the old file or the new one, never half of one. A read-only or
    full disk raises BadCheckpointError naming `path`."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise BadConfigError(
            f"{path}: the model has no ModelConfig 'config'; build it with build_model"
        )
    extra = dict(extra or {})
    clash = sorted({"format", "model", "state_dict", "meta"} & set(extra))
    if clash:
        raise BadConfigError(f"{path}: 'extra' may not replace the reserved entries {clash}")
    _check_plain(meta, "meta")
    _check_plain(extra, "extra")
    obj = {
        "format": FORMAT,
        "model": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta,
        **extra,
    }
    path = Path(path)
    try:
        with atomic_open(path, "wb", durable=True) as f:
            torch.save(obj, f)
    except OSError as e:  # read-only or full disk, a file where the folder should be
        raise _unwritable(path, e) from e


# ---------------------------------------------------------------------------------------------
# Identification and rebuilding


@functools.cache
def _signature(name: str) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], int]:
    """A built-in model's ((key, shape), ...) and trainable parameter count, built on the meta
    device (no memory, no init cost), cached."""
    with torch.device("meta"):
        model = build_model(name)
    keys = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return keys, count_params(model)


def _identify_state(state: dict) -> dict:
    """Which built-in model a renamed state dict fits: {"model", "closest", "differences"}."""
    best, best_n = None, None
    for name in MODEL_NAMES:
        keys, _ = _signature(name)
        missing, unexpected, bad = diff_state(state, dict(keys))
        n = len(missing) + len(unexpected) + len(bad)
        if n == 0:
            return {"model": name, "closest": name, "differences": 0}
        if best_n is None or n < best_n:
            best, best_n = name, n
    return {"model": None, "closest": best, "differences": best_n}


def _param_estimate(state: dict) -> int:
    """Trainable parameters of a state dict without its model: all tensors except BN buffers and
    the fixed position embedding."""
    return sum(
        v.numel()
        for k, v in state.items()
        if not k.endswith(_BN_BUFFERS) and not k.endswith("pos_embedding")
    )


def identify_checkpoint(path: str | os.PathLike) -> dict:
    """Describe a checkpoint: {"path", "format", "model" (built-in name it fits, or None),
    "role", "config" (own files), "fits" (keys and shapes equal the model's), "closest",
    "differences", "params" (trainable), "num_tensors", "keys" ({top-level prefix: count}),
    "official_head_prefix", "meta_keys"}. Raises BadCheckpointError if it is no checkpoint."""
    obj = read_checkpoint_file(path)
    state, meta, config, fmt = unpack_checkpoint(obj, str(path))
    renamed = checkpoint_filter_fn(state)
    found = _identify_state(renamed)
    info: dict = {"path": str(path), "format": fmt, "model": found["model"], "config": None}
    if config is not None:
        try:
            cfg = ModelConfig.from_dict(config)
        except (BadConfigError, TypeError) as e:
            raise BadCheckpointError(
                f"{path}: entry 'model' is not a valid model config: {e}"
            ) from None
        with torch.device("meta"):
            model = create_model(cfg)
        missing, unexpected, bad = diff_state(
            renamed, {k: v.shape for k, v in model.state_dict().items()}
        )
        info.update(model=cfg.name, role=cfg.role, config=cfg.to_dict(), params=count_params(model))
        info["fits"] = not (missing or unexpected or bad)
        info["differences"] = len(missing) + len(unexpected) + len(bad)
        info["closest"] = cfg.name
    else:
        info["fits"] = found["model"] is not None
        info["closest"], info["differences"] = found["closest"], found["differences"]
        if found["model"]:
            info["role"] = model_config(found["model"]).role
            info["params"] = _signature(found["model"])[1]
        else:
            info["role"] = None
            info["params"] = _param_estimate(renamed)
    prefixes: dict[str, int] = {}
    for key in renamed:
        top = key.split(".", 1)[0]
        prefixes[top] = prefixes.get(top, 0) + 1
    info["num_tensors"] = len(state)
    info["keys"] = prefixes
    info["official_head_prefix"] = next(
        (p.rstrip(".") for p in OFFICIAL_HEAD_PREFIXES if any(p in k for k in state)), None
    )
    info["meta_keys"] = sorted(str(k) for k in meta)
    return info


def build_from_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint was made for and load it strictly -> (model in eval mode on
    `map_location`, meta). Own files rebuild from their saved config (overrides included);
    official files from the built-in model their keys and shapes fit."""
    obj = read_checkpoint_file(path)
    state, meta, config, _ = unpack_checkpoint(obj, str(path))
    if config is not None:
        try:
            model = create_model(ModelConfig.from_dict(config))
        except (BadConfigError, TypeError) as e:
            raise BadCheckpointError(
                f"{path}: entry 'model' is not a valid model config: {e}"
            ) from None
    else:
        found = _identify_state(checkpoint_filter_fn(state))
        if found["model"] is None:
            raise BadCheckpointError(
                f"{path}: the keys fit no built-in model (closest '{found['closest']}' with "
                f"{found['differences']} differing keys); expected an official TokenPose-L / "
                "DistilPose-S / DistilPose-L checkpoint or one saved by distilpose"
            )
        model = build_model(found["model"])
    _load_state(model, state, str(path), strict=True)
    return model.to(map_location).eval(), dict(meta)
