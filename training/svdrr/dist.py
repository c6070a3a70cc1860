"""Process setup shared by the training, rendering and evaluation scripts."""
from __future__ import annotations

import os


def cpu_only() -> bool:
    """Whether accelerate must be told it runs on the CPU: ``accelerate launch --cpu`` says so through
    ``ACCELERATE_USE_CPU``, but a plain ``torchrun`` on a machine without CUDA does not, and accelerate then treats
    every process as a separate single-process run instead of setting up gloo."""
    import torch
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def partial_state():
    """``accelerate.PartialState`` for scripts that only split work over processes (rendering, evaluation)."""
    from accelerate import PartialState
    return PartialState(cpu=cpu_only())
