"""Validation, testing and weight loading for :class:`~evlgen_lavis.runners.runner_iter.RunnerEvlgenIter`.

Goes through the task's ``before_evaluation`` / ``evaluation`` / ``after_evaluation`` as LAVIS does, so any
LAVIS task plugs in. Differences from LAVIS's ``eval_epoch``: batches are moved to the runner's device
(CPU too), empty batches of unreadable samples are dropped and counted (``run.max_skip_fraction``
applies), the training RNG streams are left untouched, and the best model's agg_metrics is broadcast
from rank 0 so that every rank takes the same checkpoint decisions.
"""
import logging
import os

import torch
from lavis.common.dist_utils import is_main_process

from evlgen_lavis.datasets import SkipCounter
from evlgen_lavis.runners import checkpoint as ckpt_io
from evlgen_lavis.runners.data import EvalBatches
from evlgen_lavis.runners.distributed import all_reduce_sum, broadcast_object
from evlgen_lavis.runners.rng import preserved_rng

logger = logging.getLogger(__name__)


class EvaluationMixin:
    """Needs the runner's ``model``, ``dataloaders``, ``datasets``, ``task``, ``settings``,
    ``valid_splits``/``test_splits``, ``output_dir``, ``best_agg_metric``/``best_iters``, ``_check_skips``."""

    def _validate(self, it):
        """Evaluate every valid split; returns True when the first one's agg_metrics improved (all ranks
        agree: rank 0's metrics are broadcast)."""
        improved = False
        for i, split in enumerate(self.valid_splits):
            logger.info("Evaluating on %s.", split)
            val_log = self.eval_epoch(split_name=split, cur_epoch=self._progress(it))
            agg = None
            if is_main_process() and val_log is not None:
                if "agg_metrics" not in val_log:
                    raise KeyError(f"task {type(self.task).__name__}.after_evaluation returned no 'agg_metrics' "
                                   f"for split {split!r} (got {sorted(val_log)}); the runner needs it to pick "
                                   "the best checkpoint")
                agg = float(val_log["agg_metrics"])
            agg = broadcast_object(agg)
            if i == 0 and agg is not None and agg > self.best_agg_metric:
                self.best_agg_metric, self.best_iters, improved = agg, it, True
            if val_log is not None:
                self.log_stats({**val_log, "iters": it, "best_iters": self.best_iters}, split)
        return improved

    def _test(self, it):
        if not self.test_splits:
            return None
        best = os.path.join(self.output_dir, "checkpoint_best.pth")
        use_best = self.settings.test_checkpoint == "best" and bool(self.valid_splits)
        if use_best and not os.path.exists(best):
            logger.warning("no checkpoint_best.pth (validation never improved): testing the last weights")
            use_best = False
        logs = self.evaluate(cur_epoch="best" if use_best else self._progress(it), skip_reload=not use_best)
        for split, log in (logs or {}).items():
            if log is not None:
                self.log_stats(log, split)
        return logs

    @torch.no_grad()
    def eval_epoch(self, split_name, cur_epoch, skip_reload=False):
        """LAVIS's eval_epoch on our loaders: batches moved to the device, empty batches dropped and
        counted, the training RNG streams left untouched."""
        loader = self.dataloaders.get(split_name, None)
        if loader is None:
            raise KeyError(f"no data for split {split_name!r}: the datasets have splits {sorted(self.dataloaders)}")
        model = self.unwrap_dist_model(self.model)
        if not skip_reload and cur_epoch == "best":
            model = self._reload_best_model(model)
        was_training = model.training
        model.eval()
        batches = EvalBatches(loader, self.device)
        with preserved_rng():
            self.task.before_evaluation(model=model, dataset=self.datasets[split_name])
            results = self.task.evaluation(model, batches, cuda_enabled=self.cuda_enabled)
            counts = all_reduce_sum([batches.counter.seen, batches.counter.skipped])
            counter = SkipCounter()
            counter.seen, counter.skipped = int(counts[0]), int(counts[1])
            self._check_skips(f"evaluation of {split_name}", counter)
            log = None
            if results is not None:
                log = self.task.after_evaluation(val_result=results, split_name=split_name, epoch=cur_epoch)
        model.train(was_training)
        return log

    def _reload_best_model(self, model):
        path = os.path.join(self.output_dir, "checkpoint_best.pth")
        logger.info("Loading the best checkpoint %s.", path)
        ckpt_io.load_trainable_state(model, ckpt_io.load_checkpoint_file(path)["model"], path)
        return model

    def load_weights(self, path):
        """Load trainable weights from a runner checkpoint, a LAVIS checkpoint ({"model": ...}) or a bare
        state dict (``run.checkpoint`` in evaluate.py)."""
        state = ckpt_io.load_checkpoint_file(os.path.expanduser(str(path)))
        state = state.get("model", state)
        ckpt_io.load_trainable_state(self.unwrap_dist_model(self.model), state, path)
        logger.info("Loaded weights from %s", path)
