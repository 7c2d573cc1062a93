"""Which torch device a process runs on: the one resolver for training, dumping and inference."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """ "auto" -> this rank's CUDA device when there is one, else CPU; a bare "cuda" -> this
    rank's CUDA device. The one device resolver (training, dumping, inference)."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev
