"""Saving and resuming for :class:`~evlgen_lavis.runners.runner_iter.RunnerEvlgenIter` (the file format is
described in :mod:`evlgen_lavis.runners.checkpoint`).

Saving: every rank hashes its trainable weights and captures its RNG state; the digests must agree (a
diverged DDP replica is an error); rank 0 writes atomically while the others wait. Resuming restores the
weights, optimizer, scaler, LR schedule, training-stream position, counters and, right before the first
iteration, each rank's RNG state, so a resumed CPU run repeats the uninterrupted run's losses exactly.
"""
import logging
import os

from lavis.common.dist_utils import get_rank, get_world_size

from evlgen_lavis.runners import checkpoint as ckpt_io
from evlgen_lavis.runners.distributed import all_gather_object, run_on_main
from evlgen_lavis.runners.rng import capture_rng_state

logger = logging.getLogger(__name__)

# Config keys that, when changed between a checkpoint and its resumption, change the trajectory.
_TRAJECTORY_KEYS = ("seed", "batch_size_train", "max_iters", "iters_per_inner_epoch", "init_lr", "min_lr",
                    "lr_sched", "warmup_steps", "accum_grad_iters", "weight_decay", "cache_vision_features")


class CheckpointMixin:
    """Needs the runner's ``model``, ``optimizer``, ``scaler``, ``lr_scheduler``, ``train_loader``,
    ``settings``, ``config``, ``output_dir`` and the counters it saves."""

    def _save_checkpoint(self, cur_iters, is_best=False):
        """Every rank contributes its RNG state and a digest of its weights (all must be equal); rank 0
        writes ``checkpoint_<iters>.pth`` (rotated) or ``checkpoint_best.pth``, atomically."""
        weights = ckpt_io.trainable_state(self.unwrap_dist_model(self.model))
        gathered = all_gather_object((capture_rng_state(), ckpt_io.state_digest(weights)))
        rng, digests = [g[0] for g in gathered], [g[1] for g in gathered]
        if len(set(digests)) > 1:
            raise RuntimeError(
                f"the trainable weights differ across ranks at iteration {cur_iters} (digests "
                f"{[d[:12] for d in digests]}): the DDP replicas diverged. Every rank must run the same "
                "optimizer steps; check run.find_unused_parameters and any rank-dependent code in the model"
            )
        # the other ranks wait (they may read the file next: the best weights for testing) and fail too if
        # writing fails
        run_on_main(lambda: self._write_checkpoint(cur_iters, is_best, weights, rng, digests),
                    f"writing the checkpoint of iteration {cur_iters}")

    def _write_checkpoint(self, cur_iters, is_best, weights, rng, digests):
        state = {
            "format": ckpt_io.FORMAT,
            "model": weights,
            "rank_digests": digests,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "iters": cur_iters,
            "data": self.train_loader.state_dict(),
            "rng": rng,
            "world_size": get_world_size(),
            "skips": {"seen": self.skips.seen, "skipped": self.skips.skipped},
            "nonfinite_skipped": self.nonfinite_skipped,
            "best": {"agg_metrics": self.best_agg_metric, "iters": self.best_iters},
            "config": self.config.to_dict(),
        }
        name = "checkpoint_best.pth" if is_best else f"checkpoint_{cur_iters}.pth"
        path = ckpt_io.atomic_save(state, os.path.join(self.output_dir, name))
        logger.info("Saved checkpoint at iteration %d to %s", cur_iters, path)
        if not is_best:
            ckpt_io.prune_checkpoints(self.output_dir, self.settings.keep_last_ckpts)

    def _load_checkpoint(self, url_or_filename):
        self._resume(url_or_filename)

    def _resume(self, path):
        """Restore weights, optimizer, scaler, schedule, data position, counters and (later, right before
        the first iteration) the RNG states of a runner checkpoint."""
        path = ckpt_io.resolve_resume_path(path)
        ckpt = ckpt_io.load_checkpoint_file(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != ckpt_io.FORMAT:
            raise ValueError(f"run.resume_ckpt_path={path!r} is not a runner_evlgen_iter checkpoint (no training "
                             "state); to start from its weights set model.finetuned and model.load_finetuned=True")
        self._warn_config_changes(ckpt.get("config", {}).get("run", {}), path)
        ckpt_io.load_trainable_state(self.unwrap_dist_model(self.model), ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.lr_scheduler.load_state_dict(ckpt.get("lr_scheduler", {}))
        self.start_iters = int(ckpt["iters"])
        self.train_loader.load_state_dict(ckpt["data"])
        self.skips.seen, self.skips.skipped = ckpt["skips"]["seen"], ckpt["skips"]["skipped"]
        self.nonfinite_skipped = ckpt.get("nonfinite_skipped", 0)
        self.best_agg_metric = ckpt["best"]["agg_metrics"]
        self.best_iters = ckpt["best"]["iters"]
        rng = ckpt["rng"]
        if len(rng) == get_world_size():
            self._resume_rng = rng[get_rank()]
        else:
            logger.warning("checkpoint %s was written by %d rank(s), this run has %d: data order and random "
                           "streams differ from an uninterrupted run", path, len(rng), get_world_size())
            self._resume_rng = rng[0] if get_rank() == 0 else None
        logger.info("Resumed from %s at iteration %d", path, self.start_iters)

    def _warn_config_changes(self, old_run, path):
        run = self.config.run_cfg
        changed = [k for k in _TRAJECTORY_KEYS if k in old_run and old_run[k] != run.get(k, None)]
        if changed:
            logger.warning("resuming from %s with changed run settings %s: the run will not follow the "
                           "interrupted one's trajectory", path, {k: (old_run[k], run.get(k)) for k in changed})
