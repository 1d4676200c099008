"""Resolves the `--device` option (auto | cpu | cuda[:N]) to a torch device."""
from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU; asking for CUDA without one fails."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu or cuda[:N]")
    return device
