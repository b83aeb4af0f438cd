"""``runner_evlgen_iter``: LAVIS's iteration-based runner, fixed for CPUs, resumable, and EVLGen-aware.

Same role and config as LAVIS's ``runner_iter`` (``run.max_iters``, ``run.iters_per_inner_epoch``;
validation, train stats and checkpoints per inner epoch; test at the end), plus (see
:mod:`.settings` for every key):

* CPU and GPU alike: DDP with ``device_ids=None`` on CPU (gloo), no PrefetchLoader / cuda.Stream, no
  barrier outside torch.distributed, statistics reduced on the backend's device, ``model.float()`` on CPU;
* AMP on CUDA (bf16, or fp16 with a GradScaler), gradient accumulation and clipping, an AdamW over the
  trainable parameters only, LR schedules stepped per iteration (:mod:`.optim`);
* checkpoints with optimizer/scaler/scheduler/RNG/data-position state, written atomically, rotated
  (:mod:`.checkpoint`); ``run.resume_ckpt_path`` continues the exact loss trajectory on CPU;
* several train datasets mixed per iteration by ``run.train_dataset_ratios`` (the same draw on every rank
  and after a resume), and iterable (webdataset) train datasets, e.g. the paper's LAION/CCS shards
  (:mod:`.mix`, :class:`~.data.IterableStream`; their resume is approximate); ``log.txt`` counts the
  batches per dataset (``train_batches_<name>``);
* NaN/inf losses stop the run (or skip the update); unreadable samples are counted over ranks and stop
  the run above ``run.max_skip_fraction``; ``run.cache_vision_features`` (:mod:`.vision_cache`; refused
  for iterable train datasets);
* ``metrics.csv`` and a tqdm bar next to LAVIS's ``log.txt`` (:mod:`.metrics_log`).

Validation and testing (:mod:`.runner_eval`) go through the task's ``before_evaluation`` / ``evaluation``
/ ``after_evaluation``, as in LAVIS, so any LAVIS task plugs in; saving and resuming are in
:mod:`.runner_ckpt`.
"""
import datetime
import logging
import math
import os
import time
from pathlib import Path

import torch
from lavis.common.dist_utils import get_rank, get_world_size, is_main_process
from lavis.common.registry import registry
from lavis.runners.runner_base import RunnerBase
from lavis.runners.runner_iter import RunnerIter
from torch.nn.parallel import DistributedDataParallel as DDP

from evlgen_lavis.common import registry_once
from evlgen_lavis.datasets import SkipCounter, TooManySkippedError, concat_datasets
from evlgen_lavis.datasets.skipping import batch_size_of
from evlgen_lavis.runners.data import (
    IterableStream,
    TrainStream,
    build_eval_loader,
    is_iterable_dataset,
    move_to_device,
)
from evlgen_lavis.runners.distributed import all_reduce_sum, is_distributed, resolve_device
from evlgen_lavis.runners.metrics_log import MetricsCSV, Progress
from evlgen_lavis.runners.mix import build_train_stream, resolve_ratios
from evlgen_lavis.runners.optim import build_lr_scheduler, build_optimizer, trainable_parameters
from evlgen_lavis.runners.rng import restore_rng_state
from evlgen_lavis.runners.runner_ckpt import CheckpointMixin
from evlgen_lavis.runners.runner_eval import EvaluationMixin
from evlgen_lavis.runners.settings import RunSettings
from evlgen_lavis.runners.step import NonFiniteLossError, Stepper
from evlgen_lavis.runners.vision_cache import cache_vision_features

logger = logging.getLogger(__name__)

@registry_once("runner", "runner_evlgen_iter")
class RunnerEvlgenIter(CheckpointMixin, EvaluationMixin, RunnerIter):
    """Iteration-based runner (see the module docstring). Constructed like every LAVIS runner:
    ``RunnerEvlgenIter(cfg, task, model, datasets, job_id)``; then ``train()`` or ``evaluate()``."""

    def __init__(self, cfg, task, model, datasets, job_id):
        self.settings = RunSettings.from_run_cfg(cfg.run_cfg)
        RunnerBase.__init__(self, cfg, task, model, datasets, job_id)  # RunnerIter's init only asserts
        self.max_iters = self.settings.max_iters
        self.iters_per_inner_epoch = self.settings.iters_per_inner_epoch
        self.start_iters = 0
        self.skips = SkipCounter()  # summed over ranks, every iteration
        self.nonfinite_skipped = 0
        self.best_agg_metric, self.best_iters = -math.inf, None
        self._placed = False
        self._stepper = None
        self._resume_rng = None
        self._metrics_csv = None

    # -- setup ----------------------------------------------------------------------------------------

    def setup_output_dir(self):
        """``<run.output_dir>/<job_id>/`` (and ``result/``), a relative output_dir taken from the working
        directory (LAVIS puts it inside the installed lavis package)."""
        base = Path(os.path.expanduser(str(self.config.run_cfg.get("output_dir", "output"))))
        if not base.is_absolute():
            base = Path.cwd() / base
        self.output_dir = base / self.job_id
        self.result_dir = self.output_dir / "result"
        self.result_dir.mkdir(parents=True, exist_ok=True)
        # LAVIS's register_path refuses to re-register; a second run in one process must replace them
        registry.mapping["paths"]["output_dir"] = str(self.output_dir)
        registry.mapping["paths"]["result_dir"] = str(self.result_dir)

    @property
    def device(self):
        if self._device is None:
            self._device = resolve_device(self.config.run_cfg.get("device", "auto"),
                                          self.config.run_cfg.get("gpu", 0))
        return self._device

    @property
    def use_distributed(self):
        return is_distributed()

    @property
    def evaluate_only(self):
        return bool(self.config.run_cfg.get("evaluate", False))

    def _place_model(self):
        """Move the model to the device: float32 throughout on CPU; on CUDA the model keeps its frozen
        parts' precision and the trainable parameters are made float32."""
        if self._placed:
            return self._model
        model = self._model.to(self.device)
        if self.device.type == "cpu":
            model = model.float()
        else:
            for _, p in trainable_parameters(model):
                if p.dtype != torch.float32:
                    p.data = p.data.float()
        self._model, self._placed = model, True
        return model

    @property
    def model(self):
        """The model on the device, wrapped in DDP when distributed (CPU: ``device_ids=None``)."""
        if self._wrapped_model is None:
            model = self._place_model()
            if self.use_distributed:
                ids = [self.device.index] if self.device.type == "cuda" else None
                self._wrapped_model = DDP(model, device_ids=ids,
                                          find_unused_parameters=self.settings.find_unused_parameters)
            else:
                self._wrapped_model = model
        return self._wrapped_model

    def unwrap_dist_model(self, model):
        return model.module if isinstance(model, DDP) else model

    @property
    def optimizer(self):
        if self._optimizer is None:
            self._optimizer = build_optimizer(self.unwrap_dist_model(self.model), self.config.run_cfg)
        return self._optimizer

    @property
    def stepper(self):
        if self._stepper is None:
            s = self.settings
            params = [p for _, p in trainable_parameters(self.unwrap_dist_model(self.model))]
            self._stepper = Stepper(self.model, params, self.optimizer, self.device, s.accum_grad_iters,
                                    s.max_grad_norm, s.amp, s.amp_dtype)
        return self._stepper

    @property
    def scaler(self):
        return self.stepper.scaler

    @property
    def lr_scheduler(self):
        if self._lr_sched is None:
            self._lr_sched = build_lr_scheduler(self.config.run_cfg, self.optimizer, self.max_iters,
                                                self.iters_per_inner_epoch)
        return self._lr_sched

    # -- data -----------------------------------------------------------------------------------------

    @property
    def dataloaders(self):
        """``{split: loader}``: the training stream for the train split (:func:`.mix.build_train_stream`: one
        :class:`TrainStream` / :class:`IterableStream`, or a :class:`MixedStream` over several datasets with
        ``run.train_dataset_ratios``), DataLoaders for the others. Built on first use, after the optional
        vision-feature caching."""
        if self._dataloaders is None:
            run = self.config.run_cfg
            train_split = self._train_split_name()
            train = self._train_datasets(train_split)
            if train:  # errors before any caching (evaluation-only configs may build no train split)
                resolve_ratios(run.get("train_dataset_ratios", None), list(train))
            if run.get("cache_vision_features", False):
                self._check_cacheable_train_data(train)
                cache_vision_features(self.datasets, self._place_model(), self.config)
                train = self._train_datasets(train_split)
            by_split = {}
            for name, splits in self.datasets.items():
                for split, dataset in splits.items():
                    if split != train_split:
                        by_split.setdefault(split, []).append(dataset)
            datasets = concat_datasets(by_split)
            loaders = {}
            for split, dataset in datasets.items():
                if is_iterable_dataset(dataset) or isinstance(dataset, (tuple, list)):
                    if split in list(self.valid_splits) + list(self.test_splits):
                        raise TypeError(f"split {split!r} holds an iterable dataset (webdataset); runner_evlgen_iter "
                                        "evaluates map-style datasets only (web datasets are for training)")
                    logger.info("split %r holds an iterable dataset and is not used: no loader", split)
                    continue
                loaders[split] = self._make_loader(split, dataset)
            if train:
                loaders[train_split] = build_train_stream(
                    train, run.get("train_dataset_ratios", None), self._make_map_stream,
                    self._make_iterable_stream, self.settings.seed)
                values = list(train.values())
                datasets[train_split] = values[0] if len(values) == 1 else tuple(values)
            self.datasets = datasets
            self._dataloaders = loaders
        return self._dataloaders

    def _train_split_name(self):
        splits = list(self.train_splits)
        if len(splits) > 1:
            raise ValueError(f"run.train_splits must name exactly one split to train on, got {splits}")
        return splits[0] if splits else None

    def _train_datasets(self, train_split):
        """``{builder name: dataset}`` of the datasets that have the train split, in config order."""
        if train_split is None:
            return {}
        return {name: splits[train_split] for name, splits in self.datasets.items() if train_split in splits}

    @staticmethod
    def _check_cacheable_train_data(train):
        for name, dataset in train.items():
            if is_iterable_dataset(dataset):
                raise ValueError(
                    f"run.cache_vision_features: train dataset {name!r} is an iterable (webdataset) stream, whose "
                    "samples cannot be enumerated and cached; set run.cache_vision_features=false (or use a "
                    f"map-style format for it, e.g. datasets.{name}.build_info.format: json where supported)"
                )

    def _make_map_stream(self, parts, name, seed):
        """A :class:`TrainStream` over the map-style datasets ``parts`` in LAVIS's (skip-aware) ConcatDataset,
        even a single one: its collater keeps the keys all samples share, as before."""
        run = self.config.run_cfg
        dataset = concat_datasets({"train": list(parts)})["train"]
        logger.info("train (%s): %d records", name, len(dataset))
        return TrainStream(dataset, run.batch_size_train, getattr(dataset, "collater", None),
                           num_workers=run.get("num_workers", 0), num_replicas=get_world_size(), rank=get_rank(),
                           seed=seed, pin_memory=self.device.type == "cuda", name=name)

    def _make_iterable_stream(self, dataset, name, seed):
        run = self.config.run_cfg
        logger.info("train (%s): iterable dataset (webdataset), %s shard(s)", name,
                    len(getattr(dataset, "shards", [])) or "?")
        return IterableStream(dataset, run.batch_size_train, getattr(dataset, "collater", None),
                              num_workers=run.get("num_workers", 0), rank=get_rank(), seed=seed,
                              pin_memory=self.device.type == "cuda", name=name)

    def _make_loader(self, split, dataset):
        run = self.config.run_cfg
        collate = getattr(dataset, "collater", None)
        pin = self.device.type == "cuda"
        logger.info("%s: %d records", split, len(dataset))
        return build_eval_loader(dataset, run.get("batch_size_eval", run.batch_size_train),
                                 run.get("num_workers", 0), collate, self.use_distributed,
                                 self.use_dist_eval_sampler, pin_memory=pin, seed=self.settings.seed)

    @property
    def train_loader(self):
        split = self._train_split_name()
        if split is None:
            raise ValueError("run.train_splits is empty: name the split to train on, e.g. [train]")
        if split not in self.dataloaders:
            raise ValueError(f"run.train_splits names {split!r} but the datasets have splits "
                             f"{sorted(self.dataloaders)}")
        return self.dataloaders[split]

    # -- training -------------------------------------------------------------------------------------

    def train(self):
        """Train from ``start_iters`` (0, or the resumed checkpoint's) to ``run.max_iters`` (or
        ``run.stop_after_iters``), validating each inner epoch; then test. With ``run.evaluate`` set,
        only evaluate."""
        start_time = time.time()
        self.log_config()
        if self.evaluate_only:
            return self.evaluate(skip_reload=True)
        stream = self._build_training_state()
        if self.resume_ckpt_path:
            self._resume(self.resume_ckpt_path)
        if self._resume_rng is not None:
            restore_rng_state(self._resume_rng)
        s = self.settings
        stop_at = min(self.max_iters, s.stop_after_iters or self.max_iters)
        it = self.start_iters
        logger.info("Training iterations %d..%d of %d (%d per inner epoch) on %s x %d", it, stop_at,
                    self.max_iters, self.iters_per_inner_epoch, self.device, get_world_size())
        progress = Progress(it, self.max_iters, is_main_process())
        try:
            while it < stop_at:
                ipe = self.iters_per_inner_epoch
                end = min((it // ipe + 1) * ipe, (it // s.save_every + 1) * s.save_every, stop_at)
                stats = self._train_span(it, end, stream, progress)
                it = end
                self.log_stats(stats, "train")
                self._check_skips("training")
                improved = False
                if (it % ipe == 0 or it == self.max_iters) and self.valid_splits:
                    improved = self._validate(it)
                if it % s.save_every == 0 or it == stop_at:
                    self._save_checkpoint(it)
                if improved:
                    self._save_checkpoint(it, is_best=True)
        finally:
            progress.close()
        if it < self.max_iters:
            logger.info("Stopped after %d iterations (run.stop_after_iters); resume with "
                        "run.resume_ckpt_path=%s", it, self.output_dir)
            return None
        test_logs = self._test(it)
        logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))
        return test_logs

    def _build_training_state(self):
        """Build model (DDP), optimizer, scheduler, stepper and loaders now, so that nothing that draws
        random numbers runs between restoring a checkpoint's RNG state and the first iteration."""
        stream = self.train_loader
        _ = self.lr_scheduler, self.stepper
        return stream

    def _train_span(self, start, end, stream, progress):
        """Iterations ``[start, end)``; returns the span's statistics (for log.txt)."""
        model = self.model
        model.train()
        totals = {"loss": 0.0, "samples": 0.0, "skipped": 0.0, "time": 0.0}
        per_dataset = {}  # batches per dataset of a mix (log.txt: train_batches_<name>)
        lr = None
        for it in range(start, end):
            tic = time.time()
            row = self._train_iteration(it, stream, model)
            dt = time.time() - tic
            lr = row["lr"]
            dataset = row.pop("dataset", None)
            if dataset is not None:
                per_dataset[dataset] = per_dataset.get(dataset, 0) + 1
            totals["time"] += dt
            totals["skipped"] += row["n_skipped"]
            if not row["nonfinite"]:
                totals["loss"] += row["loss"] * row["samples"]
                totals["samples"] += row["samples"]
            row["samples_per_s"] = row.pop("samples") / dt if dt > 0 else 0.0
            if is_main_process():
                self._csv().write(**row)
                progress.update(row["loss"], lr, row["samples_per_s"])
                if (it + 1) % self.settings.log_freq == 0:
                    logger.info("iter %d/%d loss %.4f lr %.3g %.1f samples/s%s", it + 1, self.max_iters,
                                row["loss"], lr, row["samples_per_s"], f" [{dataset}]" if dataset else "")
        mix = {f"batches_{name}": per_dataset.get(name, 0) for name in getattr(stream, "streams", {})}
        return {
            "iters": end,
            "loss": totals["loss"] / totals["samples"] if totals["samples"] else float("nan"),
            "lr": lr,
            "samples_per_s": totals["samples"] / totals["time"] if totals["time"] else 0.0,
            "n_skipped": int(totals["skipped"]),
            "n_skipped_total": self.skips.skipped,
            "n_seen_total": self.skips.seen,
            "nonfinite_skipped": self.nonfinite_skipped,
            **mix,
        }

    def _train_iteration(self, it, stream, model):
        """One iteration: fetch, forward, agree on the loss over ranks, backward, maybe step."""
        ipe, accum = self.iters_per_inner_epoch, self.settings.accum_grad_iters
        fetched = SkipCounter()
        batch = stream.next_nonempty(fetched, iteration=it)
        n = batch_size_of(batch)
        lr = self.lr_scheduler.step(it)
        samples = move_to_device(batch, self.device)
        samples.update({"epoch": it // ipe, "num_iters_per_epoch": ipe, "iters": it % ipe})
        last_micro = (it + 1) % accum == 0 or it + 1 == self.max_iters
        stepper = self.stepper
        with stepper.sync(last_micro):
            with stepper.autocast():
                loss = self.task.train_step(model=model, samples=samples)
            value = float(loss.detach().float())
            finite = math.isfinite(value)
            loss_sum, count, seen, skipped, n_bad = all_reduce_sum(
                [value * n if finite else 0.0, n, fetched.seen, fetched.skipped, 0.0 if finite else 1.0])
            self.skips.seen += int(seen)
            self.skips.skipped += int(skipped)
            bad = n_bad > 0
            if bad:
                self._on_nonfinite(it, value, int(n_bad))
            stepper.backward(loss, bad)
        grad_norm = stepper.finish_cycle() if last_micro else None
        mean = loss_sum / count if not bad else float("nan")
        return {"iter": it, "epoch": stream.epoch, "loss": mean, "lr": lr, "samples": count,
                "n_skipped": int(skipped), "grad_norm": grad_norm, "nonfinite": int(bad),
                "dataset": getattr(stream, "current", None)}

    def _on_nonfinite(self, it, value, n_ranks):
        if get_world_size() > 1:
            where = f" on {n_ranks} of {get_world_size()} ranks; this rank's loss = {value}"
        else:
            where = f": loss = {value}"
        if self.settings.nonfinite_loss == "stop":
            raise NonFiniteLossError(
                f"non-finite training loss at iteration {it} (0-based){where}. Stopped before its backward "
                f"pass, the weights are those after iteration {it - 1}. Lower run.init_lr, set "
                "run.max_grad_norm, check the data, or set run.nonfinite_loss=skip to skip such updates"
            )
        self.nonfinite_skipped += 1
        logger.warning("non-finite training loss %s at iteration %d: skipping this update (%d skipped so far)",
                       value, it, self.nonfinite_skipped)

    def _csv(self):
        if self._metrics_csv is None:
            self._metrics_csv = MetricsCSV(os.path.join(self.output_dir, "metrics.csv"))
        return self._metrics_csv

    def _check_skips(self, phase, counter=None):
        counter = self.skips if counter is None else counter
        if counter.skipped:
            logger.warning("%s: %d of %d samples were unreadable and skipped", phase, counter.skipped, counter.seen)
        try:
            counter.check(self.settings.max_skip_fraction)
        except TooManySkippedError as err:
            raise TooManySkippedError(f"{phase}: {err}") from None
