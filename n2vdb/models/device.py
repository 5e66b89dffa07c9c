"""Which torch device a model runs on."""

from __future__ import annotations

import torch

from n2vdb.errors import UsageError


def pick_device(device: str | torch.device) -> torch.device:
    """'auto' = CUDA when torch sees a GPU, else the CPU; 'cpu', 'cuda', 'cuda:N' as asked, if present."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise UsageError(f"device {device}: expected auto, cpu, cuda or cuda:N", param="device") from None
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise UsageError(
            f"device {device} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s); use cpu or auto",
            param="device",
        )
    return chosen
