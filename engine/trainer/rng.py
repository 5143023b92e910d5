"""Seeding and RNG snapshots, so that a resumed run draws the same random numbers as an
uninterrupted one (MAE masks, dropout, drop-path are drawn on the training process; the data
loader keeps its own seeds in its ``state_dict``)."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with ``seed``.

    The launcher seeds with the run's base seed before building the model, so that every rank
    builds identical initial weights (ZeRO-3 partitions each rank's own copy without a
    broadcast); the trainer then reseeds with ``seed + rank`` so ranks draw different masks.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG a step may draw from on this rank (python, numpy, torch CPU, the CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a snapshot taken by :func:`rng_state` (on the same rank)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
