"""torch.distributed setup that works on CPUs (gloo) as well as GPUs (nccl), and small collective helpers.

LAVIS's ``dist_utils.init_distributed_mode`` calls ``torch.cuda.set_device`` and hard-codes nccl, so it
fails on a CPU. :func:`init_distributed` reads the variables torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), so one process, ``torchrun --nproc_per_node=N`` and
multi-node torchrun all work. Once the process group exists, LAVIS's own ``get_rank``,
``get_world_size``, ``is_main_process`` and ``is_dist_avail_and_initialized`` answer correctly (they
query torch.distributed).

Run config keys read here: ``device`` ("auto" | "cuda" | "cpu", default "auto"), ``dist_backend``
(default: nccl on CUDA, gloo on CPU), ``dist_url`` (default "env://"), ``dist_timeout_minutes`` (120:
rank 0 may spend long computing a feature cache while the others wait), ``seed`` (42).
"""
import datetime
import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from lavis.common import dist_utils

logger = logging.getLogger(__name__)


def env_ranks():
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without it."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return rank, world_size, local_rank
    return 0, 1, 0


def resolve_device(name="auto", local_rank=0):
    """``torch.device`` for ``run.device``: "auto" picks CUDA when available. On CUDA each process takes
    GPU ``local_rank`` (modulo the visible count) and makes it the current device."""
    name = str(name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"run.device={name!r} but no CUDA device is visible: set run.device=cpu (or auto)"
            )
        index = int(name.split(":")[1]) if ":" in name else local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"run.device={name!r} is not understood: use 'auto', 'cuda' or 'cpu'")


def init_distributed(run_cfg):
    """Initialise the process group from torchrun's environment and record the result in ``run_cfg``.

    Sets ``run_cfg.device`` (resolved, e.g. "cuda:0" or "cpu"), ``distributed`` (world size > 1),
    ``rank``, ``world_size``, ``gpu`` (local rank) and ``dist_backend``. In one process nothing is
    initialised and LAVIS's helpers report rank 0 of 1. Non-main ranks stop printing (as in LAVIS).
    """
    rank, world_size, local_rank = env_ranks()
    device = resolve_device(run_cfg.get("device", "auto"), local_rank)
    backend = run_cfg.get("dist_backend", None) or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("run.dist_backend=nccl needs CUDA devices; use gloo on CPUs (or leave it unset)")

    run_cfg.device = str(device)
    run_cfg.distributed = world_size > 1
    run_cfg.rank, run_cfg.world_size, run_cfg.gpu = rank, world_size, local_rank
    run_cfg.dist_backend = backend
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=float(run_cfg.get("dist_timeout_minutes", 120)))
        dist.init_process_group(
            backend=backend,
            init_method=run_cfg.get("dist_url", None) or "env://",
            world_size=world_size,
            rank=rank,
            timeout=timeout,
        )
        logger.info("distributed init: rank %d of %d, backend %s, device %s", rank, world_size, backend, device)
        barrier()
        dist_utils.setup_for_distributed(rank == 0)
    return device


def is_distributed():
    return dist_utils.is_dist_avail_and_initialized()


def comm_device():
    """Where collective tensors must live: the current CUDA device under nccl, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier():
    """``dist.barrier()`` when distributed, a no-op in one process (LAVIS calls it unconditionally)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(values):
    """Sum a list of floats over ranks (float64 on the communication device); returns a list."""
    tensor = torch.tensor(values, dtype=torch.float64, device=comm_device())
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(obj, src=0):
    """``obj`` from rank ``src`` on every rank (pickled)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj):
    """A list with every rank's ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn, what):
    """Run ``fn()`` on rank 0 while the others wait; if it fails, every rank raises (instead of the other
    ranks waiting at a barrier until the timeout). Returns ``fn()``'s result on rank 0, None elsewhere."""
    result, error = None, None
    if dist_utils.is_main_process():
        try:
            result = fn()
        except Exception as err:  # re-raised below, after telling the other ranks
            error = err
    message = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed while {what}: {message}")
    return result


def setup_seeds(seed, rank=None):
    """Seed python, numpy and torch with ``seed + rank`` (LAVIS's train.py does the same)."""
    rank = dist_utils.get_rank() if rank is None else rank
    seed = int(seed) + int(rank)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return seed


def cleanup():
    """Destroy the process group, if any (so torchrun's processes exit cleanly)."""
    if is_distributed():
        dist.destroy_process_group()
