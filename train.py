"""Train with LAVIS's interface: ``python train.py --cfg-path CFG [--options key=value ...]``.

Works as one process and under ``python -m torch.distributed.run --nproc_per_node=N train.py ...``
(gloo on CPUs, nccl on GPUs; multi-node as torchrun does). See evlgen_lavis/runners/cli.py.
"""
import evlgen_lavis  # noqa: F401  (first: registers EVLGen's models, datasets, tasks and runner)
from evlgen_lavis.runners.cli import train_main

if __name__ == "__main__":
    train_main()
