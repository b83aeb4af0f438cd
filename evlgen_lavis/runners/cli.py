"""What train.py and evaluate.py do, as functions (importable, testable in-process).

The structure of LAVIS's own train.py / evaluate.py: config (``--cfg-path``, ``--options``), distributed
init, per-rank seeds, logger, task -> datasets -> model -> runner. Differences: our
:func:`~evlgen_lavis.runners.distributed.init_distributed` (CPU/gloo capable), config errors that name
the key, and a job id chosen on rank 0 and shared (LAVIS's ``now()`` is computed on every rank and has
10-minute resolution, so two runs can share a directory and ranks can disagree).
"""
import datetime
import logging
import os

import lavis.tasks as tasks
from lavis.common.dist_utils import is_main_process
from lavis.common.logger import setup_logger
from lavis.common.registry import registry

from evlgen_lavis.runners.config import load_config
from evlgen_lavis.runners.distributed import broadcast_object, cleanup, init_distributed, setup_seeds

logger = logging.getLogger(__name__)


def new_job_id(run_cfg):
    """``run.job_id`` if set, else a timestamp (seconds); a suffix keeps it from reusing a directory."""
    job_id = run_cfg.get("job_id", None)
    if job_id:
        return str(job_id)
    base = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    output_dir = os.path.expanduser(str(run_cfg.get("output_dir", "output")))
    job_id, n = base, 0
    while os.path.exists(os.path.join(output_dir, job_id)):
        n += 1
        job_id = f"{base}_{n}"
    return job_id


def build_runner(cfg):
    """Distributed init, seeds, logger, then task, datasets, model and the configured runner."""
    init_distributed(cfg.run_cfg)
    setup_seeds(cfg.run_cfg.get("seed", 42))
    setup_logger()
    job_id = broadcast_object(new_job_id(cfg.run_cfg) if is_main_process() else None)
    cfg.pretty_print()
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    runner_cls = registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))
    return runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)


def train_main(argv=None):
    """``train.py``: train (and validate/test) as the config says. Returns the runner."""
    cfg = load_config(argv, "EVLGen training")
    try:
        runner = build_runner(cfg)
        runner.train()
        return runner
    finally:
        cleanup()


def evaluate_main(argv=None):
    """``evaluate.py``: evaluate ``run.test_splits`` with the model's configured weights
    (``model.finetuned`` + ``load_finetuned``) or ``run.checkpoint`` (a runner/LAVIS checkpoint)."""
    cfg = load_config(argv, "EVLGen evaluation")
    if not cfg.run_cfg.get("test_splits", None):
        raise ValueError("evaluate.py: run.test_splits is empty; set e.g. --options 'run.test_splits=[test]'")
    cfg.run_cfg.evaluate = True
    try:
        runner = build_runner(cfg)
        checkpoint = cfg.run_cfg.get("checkpoint", None)
        if checkpoint:
            if not hasattr(runner, "load_weights"):
                raise ValueError("run.checkpoint needs run.runner=runner_evlgen_iter, "
                                 f"got {cfg.run_cfg.get('runner')!r}")
            runner.load_weights(checkpoint)
        runner.log_config()
        logs = runner.evaluate(skip_reload=True)
        for split, log in (logs or {}).items():
            logger.info("%s: %s", split, log)
        return logs
    finally:
        cleanup()
