"""Reading weight files: safe `torch.load`, the two file layouts unpacked, official keys renamed
(`checkpoint_filter_fn`), a state dict compared with a model, and a backbone's weights loaded.

The low half of checkpoint handling: `registry.build_model(weights=...)` and `checkpoint` (which
rebuilds models through the registry) both use it, so the imports run one way:
checkpoint -> registry -> state_io.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from distilpose.errors import BadCheckpointError

HEAD_PREFIX = "head."
# most specific first: the MMPose CNN heads sit directly under `keypoint_head.`
OFFICIAL_HEAD_PREFIXES = ("keypoint_head.tokenpose.", "keypoint_head.tokenhead.", "keypoint_head.")
# our keys a foreign file may lack: DeepPose's score/sigma head exists only in this project
OPTIONAL_KEYS = ("head.confidence.",)
_SHOW = 5  # keys listed per kind in an error message before "(+N more)"


def checkpoint_filter_fn(state_dict: dict) -> dict:
    """Rename official keys to this package's: strip a leading `module.` (DataParallel/DDP) and
    map `keypoint_head.tokenpose.` / `keypoint_head.tokenhead.` / `keypoint_head.` to `head.`.
    Other keys unchanged."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        for prefix in OFFICIAL_HEAD_PREFIXES:
            if key.startswith(prefix):
                key = HEAD_PREFIX + key[len(prefix) :]
                break
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Reading


def read_checkpoint_file(path: str | os.PathLike) -> dict:
    """torch.load a checkpoint file safely; every failure is one BadCheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise BadCheckpointError(f"{path}: no such file; expected a checkpoint (.pth)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise BadCheckpointError(
                f"{path}: refused: the file holds pickled code or objects, which weights-only "
                "loading does not run; expected tensors, numbers, strings, lists and dicts only"
            ) from None
        raise BadCheckpointError(f"{path}: not a PyTorch checkpoint (unreadable pickle)") from None
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        reason = (str(e).splitlines() or [""])[0][:80]
        detail = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
        raise BadCheckpointError(f"{path}: not a PyTorch checkpoint ({detail})") from None
    if not isinstance(obj, dict):
        raise BadCheckpointError(
            f"{path}: holds a {type(obj).__name__}; expected a dict with a 'state_dict'"
        )
    return obj


def unpack_checkpoint(obj: dict, source: str) -> tuple[dict, dict, dict | None, str]:
    """-> (state dict as in the file, meta, model config dict or None, format name)."""
    if isinstance(obj.get("state_dict"), dict):
        state, fmt = obj["state_dict"], obj.get("format", "mmpose")
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, fmt = obj, "state_dict"
    else:
        raise BadCheckpointError(
            f"{source}: no 'state_dict' entry and not a bare state dict; "
            "expected a distilpose or MMPose checkpoint"
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not state:
        raise BadCheckpointError(
            f"{source}: 'state_dict' is empty or has non-tensor entries {short_keys(bad)}"
        )
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    config = obj.get("model") if isinstance(obj.get("model"), dict) else None
    return state, meta, config, str(fmt)


def short_keys(keys: list) -> str:
    shown = ", ".join(str(k) for k in keys[:_SHOW])
    more = f", ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return f"[{shown}{more}]"


def diff_state(state: dict, reference: dict) -> tuple[list, list, list]:
    """Compare a (renamed) state dict with a model's {key: shape}: missing, unexpected, mismatched.
    BN `num_batches_tracked` (older files) and `OPTIONAL_KEYS` may be absent: not reported."""
    missing = [
        k
        for k in reference
        if k not in state
        and not k.endswith("num_batches_tracked")
        and not k.startswith(OPTIONAL_KEYS)
    ]
    unexpected = [k for k in state if k not in reference]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(reference[k])}"
        for k in state
        if k in reference and tuple(state[k].shape) != tuple(reference[k])
    ]
    return missing, unexpected, mismatched


def mismatch_message(source: str, name: str, missing: list, unexpected: list, bad: list) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys {short_keys(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys {short_keys(unexpected)}")
    if bad:
        parts.append(f"{len(bad)} shape mismatches {short_keys(bad)}")
    return f"{source}: checkpoint does not fit model '{name}': " + "; ".join(parts)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel wrappers."""
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local backbone file strictly into `model.backbone`: a bare state dict or a
    checkpoint whose keys are the trunk's (torchvision's ResNet files: their classifier `fc.*` is
    dropped) or `backbone.*` (an MMPose checkpoint: other keys are ignored)."""
    obj = read_checkpoint_file(path)
    state, _, _, _ = unpack_checkpoint(obj, str(path))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    backbone = unwrap(model).backbone
    shapes = {k: v.shape for k, v in backbone.state_dict().items()}
    missing, unexpected, bad = diff_state(state, shapes)
    if missing or unexpected or bad:
        name = getattr(getattr(unwrap(model), "config", None), "name", type(model).__name__)
        raise BadCheckpointError(
            mismatch_message(str(path), f"{name}'s backbone", missing, unexpected, bad)
        )
    backbone.load_state_dict(state, strict=False)  # num_batches_tracked may be absent
