"""Runner checkpoints: atomic writes, rotation, RNG state, and loading the trainable weights.

A checkpoint (``checkpoint_<iters>.pth``, ``checkpoint_best.pth``) is a dict::

    {"format": "evlgen_runner/1",
     "model": {name: tensor} of the trainable parameters only (frozen weights come from their sources),
     "optimizer", "scaler" (or None), "lr_scheduler": optimizer/scaler/scheduler state dicts,
     "iters": iterations completed, "data": the training stream's position {"epoch", "batches"},
     "rng": [per-rank {"python", "numpy", "torch", "cuda"}], "world_size",
     "rank_digests": [per-rank state_digest of the trainable weights] (all equal: checked before saving),
     "skips": {"seen", "skipped"} (summed over ranks), "nonfinite_skipped", "best": {"agg_metrics", "iters"},
     "config": the run config as a dict}

``"model"`` is what ``EVLGen.load_checkpoint`` and LAVIS's ``load_finetuned`` read, so a runner
checkpoint is also a finetuned-weights file. Files are written to a temporary file in the same
directory and moved into place with ``os.replace`` (a crash never leaves a truncated checkpoint).
"""
import hashlib
import logging
import os
import re

import torch

from evlgen_lavis.common import atomic_save  # noqa: F401  (re-exported: ckpt_io.atomic_save)

logger = logging.getLogger(__name__)

FORMAT = "evlgen_runner/1"
_NUMBERED = re.compile(r"^checkpoint_(\d+)\.pth$")


def numbered_checkpoints(directory):
    """``[(iters, path)]`` of the ``checkpoint_<iters>.pth`` files in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NUMBERED.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def prune_checkpoints(directory, keep_last):
    """Delete all but the newest ``keep_last`` numbered checkpoints (``checkpoint_best.pth`` is kept).
    ``keep_last`` <= 0 keeps everything. Returns the deleted paths."""
    if keep_last is None or int(keep_last) <= 0:
        return []
    old = numbered_checkpoints(directory)[: -int(keep_last)]
    for _, path in old:
        os.remove(path)
    return [p for _, p in old]


def resolve_resume_path(path):
    """``run.resume_ckpt_path``: a checkpoint file, or a directory whose newest ``checkpoint_<n>.pth``
    is used (e.g. a previous run's output directory)."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        found = numbered_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"run.resume_ckpt_path={path!r} is a directory without checkpoint_<n>.pth files")
        return found[-1][1]
    raise FileNotFoundError(
        f"run.resume_ckpt_path={path!r} does not exist: give a checkpoint file or a run's output directory"
    )


def load_checkpoint_file(path):
    """Load a checkpoint on the CPU. Runner checkpoints hold numpy RNG state and the config, which
    ``weights_only`` loading rejects: only load checkpoints you trust (as any pickle)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def trainable_state(model):
    """The trainable parameters, detached on the CPU (``model.trainable_state_dict()`` if it has one)."""
    if hasattr(model, "trainable_state_dict"):
        state = model.trainable_state_dict()
    else:
        state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def state_digest(state):
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors (in name order): equal
    digests on every rank show that the DDP replicas hold identical weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{state[name].dtype}|{tuple(state[name].shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def load_trainable_state(model, state, source):
    """Load ``state`` (trainable parameters; frozen ones may be present too) into ``model``. A key the
    model lacks, or a trainable parameter the state lacks, is an error naming ``source``."""
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise KeyError(f"{source} has {len(unexpected)} keys this model lacks, e.g. {unexpected[:5]}: "
                       "was it saved from a different model type?")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise KeyError(f"{source} lacks {len(missing)} trainable parameters of this model, e.g. {missing[:5]}")
    model.load_state_dict(state, strict=False)
