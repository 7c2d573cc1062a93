"""Export a trained model to ONNX and check ONNX Runtime against PyTorch.

    export_onnx("runs/student/last.pth", "student.onnx")      # coords, scores, sigmas
    check_onnx("runs/student/last.pth", "student.onnx")       # max |ORT - torch|, raises if > atol

The graph takes `images` float32 [B, 3, H_in, W_in]: RGB crops normalized with ImageNet mean/std
exactly as `distilpose.data.normalize` makes them (crop and normalize outside the graph). Outputs
are named: a student gives `coords` [B, K, 2] (normalized x, y), `scores` [B, K] (raw) and
`sigmas` [B, K, 2] (heatmap px); a teacher gives `heatmaps` [B, K, Hh, Wh]. With `tokens=True`
both add `keypoint_tokens` [B, K, D] and `visual_tokens` [B, P, D]. The model config, output
names and input convention are written into the file's metadata (`distilpose.*` keys).

The TorchScript-based exporter is used because the torch.export-based one needs onnxscript, which
is not a dependency; the model is plain tensor code, so both give the same graph.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distilpose.errors import BadCheckpointError, BadConfigError
from distilpose.io import atomic_path

STUDENT_OUTPUTS = ("coords", "scores", "sigmas")
TEACHER_OUTPUTS = ("heatmaps",)
TOKEN_OUTPUTS = ("keypoint_tokens", "visual_tokens")
INPUT_NAME = "images"


class ExportWrapper(nn.Module):
    """Returns the model's output dataclass as a tuple of tensors in `output_names` order."""

    def __init__(self, model: nn.Module, tokens: bool = False):
        super().__init__()
        self.model = model
        self.names = output_names(model.config.role, tokens)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        return tuple(getattr(out, name) for name in self.names)


def output_names(role: str, tokens: bool = False) -> list[str]:
    """ONNX output names for a "student" or "teacher", with or without the tokens."""
    if role not in ("student", "teacher"):
        raise BadConfigError(f"model role {role!r}; expected 'student' or 'teacher'")
    names = list(STUDENT_OUTPUTS if role == "student" else TEACHER_OUTPUTS)
    return names + list(TOKEN_OUTPUTS) if tokens else names


def _load(checkpoint: str | Path | nn.Module) -> nn.Module:
    if isinstance(checkpoint, nn.Module):
        return checkpoint.cpu().eval()
    from distilpose.models import build_from_checkpoint

    model, _ = build_from_checkpoint(checkpoint, map_location="cpu")
    return model.eval()


def export_onnx(
    checkpoint: str | Path | nn.Module,
    out_onnx: str | Path,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    tokens: bool = False,
) -> Path:
    """Export a student (coords, scores, sigmas) or teacher (heatmaps) checkpoint to ONNX.

    Args:
        checkpoint: this project's or an official checkpoint, or a built model.
        out_onnx: the .onnx file to write (atomically: a temporary file renamed into place).
        opset: ONNX opset (>= 14 for scaled dot-product attention).
        dynamic_batch: a symbolic batch axis; otherwise the graph is fixed to batch 1.
        tokens: also output the keypoint and visual tokens.
    """
    if opset < 14:
        raise BadConfigError(f"opset: {opset}; expected >= 14 (attention needs it)")
    model = _load(checkpoint)
    config = model.config
    wrapper = ExportWrapper(model, tokens).eval()
    w_in, h_in = config.input_size
    dummy = torch.zeros(1, 3, h_in, w_in)
    names = wrapper.names
    dynamic_axes = {n: {0: "batch"} for n in [INPUT_NAME, *names]} if dynamic_batch else None

    out = Path(out_onnx)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # The legacy exporter's deprecation notice and shape-tracing notes say nothing actionable.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                (dummy,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        _write_metadata(tmp, config, names)
    return out


def _write_metadata(path: Path, config, names: list[str]) -> None:
    import onnx

    from distilpose.data.crop import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

    proto = onnx.load(str(path))
    meta = {
        "distilpose.model": json.dumps(config.to_dict()),
        "distilpose.outputs": ",".join(names),
        "distilpose.input": (
            f"{INPUT_NAME}: float32 [B, 3, {config.input_size[1]}, {config.input_size[0]}] RGB, "
            f"(x / 255 - mean) / std, mean {list(IMAGENET_MEAN_RGB)}, std {list(IMAGENET_STD_RGB)}"
        ),
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def check_onnx(
    checkpoint: str | Path | nn.Module,
    onnx_path: str | Path,
    atol: float = 1e-4,
    *,
    batch: int = 2,
    seed: int = 0,
) -> float:
    """Max |ONNX Runtime - PyTorch| over every output for random inputs; raises if above `atol`.

    `batch` images are used when the graph's batch axis is symbolic (so a batch other than the
    export's 1 is checked), otherwise the graph's fixed batch.
    """
    import onnxruntime as ort

    model = _load(checkpoint)
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors for bad files
        raise BadCheckpointError(f"{onnx_path}: not a loadable ONNX model ({e})") from e
    names = [o.name for o in session.get_outputs()]
    tokens = TOKEN_OUTPUTS[0] in names
    expected = output_names(model.config.role, tokens)
    if names != expected:
        raise BadCheckpointError(
            f"{onnx_path}: outputs {names}; a {model.config.role} checkpoint gives {expected}"
        )
    input_shape = session.get_inputs()[0].shape
    n = input_shape[0] if isinstance(input_shape[0], int) else batch
    w_in, h_in = model.config.input_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, h_in, w_in, generator=generator)  # normalized-image statistics
    with torch.no_grad():
        reference = ExportWrapper(model, tokens)(images)
    got = session.run(names, {INPUT_NAME: images.numpy()})
    diff = max(
        float(np.max(np.abs(g - r.numpy()))) if r.numel() else 0.0
        for g, r in zip(got, reference, strict=True)
    )
    if not diff <= atol:  # also catches NaN
        raise BadCheckpointError(
            f"{onnx_path}: ONNX Runtime differs from PyTorch by {diff:.3g} > atol {atol:g}"
        )
    return diff
