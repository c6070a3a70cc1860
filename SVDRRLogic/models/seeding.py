"""Seeded weight initialization that leaves the caller's random state alone.

Builders seed their own initialization so a configuration and a seed always give the same network; they must not
reseed the process, because training seeds every rank (and its CUDA generator) differently before building, and
a global ``torch.manual_seed`` here would give every GPU the same noise and timesteps.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded_init(seed: int | None) -> Iterator[None]:
    """Inside the block the CPU generator (where weights are built) starts from ``seed``; afterwards it is back
    where it was, and no CUDA generator is touched. ``None``: the caller's state, unseeded."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.random.default_generator.manual_seed(int(seed))
        yield
