"""Evaluate with LAVIS's interface: ``python evaluate.py --cfg-path CFG [--options key=value ...]``.

Evaluates ``run.test_splits`` with the model's configured weights (``model.finetuned`` with
``model.load_finetuned: True``) or ``run.checkpoint`` (a checkpoint written by train.py). Works under
``python -m torch.distributed.run`` as train.py does. See evlgen_lavis/runners/cli.py.
"""
import evlgen_lavis  # noqa: F401  (first: registers EVLGen's models, datasets, tasks and runner)
from evlgen_lavis.runners.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
