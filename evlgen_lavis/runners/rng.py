"""Random-number-generator state: capture/restore (checkpoints), and scopes that leave it untouched.

Used so that (a) a resumed run continues with the generators of the uninterrupted run, (b) evaluation in
the middle of training does not change the training's random stream, and (c) data augmentation of a
sample depends on ``(seed, epoch, index)`` alone (see :mod:`evlgen_lavis.runners.data`).
"""
import contextlib
import random

import numpy as np
import torch


def capture_rng_state():
    """This process's python, numpy, torch CPU and (if initialised) CUDA generator states."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng_state(state):
    """Inverse of :func:`capture_rng_state` (CUDA states are restored when CUDA is available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda[0])


@contextlib.contextmanager
def preserved_rng():
    """Run a block (e.g. evaluation) without changing any generator's state as seen after it."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


@contextlib.contextmanager
def seeded_rng(seed):
    """Seed python, numpy and torch (CPU) with ``seed`` inside the block; restore their states after."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
