"""The run-config keys of ``runner_evlgen_iter``, read once, with defaults and checks that name the key.

=========================  ==============  =====================================================================
key                        default         meaning
=========================  ==============  =====================================================================
max_iters                  (required)      iterations to train (one iteration = one batch per rank);
                                           optional with run.evaluate (evaluate.py)
iters_per_inner_epoch      max_iters       validation / train-stats / default checkpoint interval
accum_grad_iters           1               gradient accumulation (the loss is divided by it)
max_grad_norm              null            clip the global gradient norm (null or 0: no clipping)
amp                        false           autocast on CUDA (ignored, with a warning, on CPU)
amp_dtype                  bf16            "bf16" or "fp16" (fp16 also uses a GradScaler)
nonfinite_loss             stop            NaN/inf loss: "stop" (raise, weights untouched) or "skip" the update
max_skip_fraction          0.05            stop when more unreadable samples than this were skipped
save_every                 inner epoch     checkpoint every this many iterations (and at the end)
keep_last_ckpts            2               numbered checkpoints kept (checkpoint_best.pth is extra); <=0 all
stop_after_iters           null            stop cleanly after this many iterations (resumable; the schedule
                                           still spans max_iters): for time-sliced jobs and resume tests
resume_ckpt_path           null            checkpoint file, or a run directory (its newest checkpoint)
find_unused_parameters     false           passed to DistributedDataParallel
test_checkpoint            best            test with "best" (needs valid_splits) or "last" weights
output_dir                 output          relative paths resolve against the working directory
log_freq                   50              log a training line every this many iterations
train_dataset_ratios       null            {dataset name: weight} (or a list in the order of the datasets
                                           section): each iteration trains on ONE train dataset drawn with
                                           these weights, the draw a function of (seed, iteration): the same
                                           on every rank and after a resume (:mod:`.mix`); 0 leaves a dataset
                                           out. null: map-style train datasets are concatenated (iterable
                                           ones are drawn evenly beside them)
=========================  ==============  =====================================================================

Iterable (webdataset) train datasets (``laion115M``, ``ccs14M`` in the webdataset format): streamed with
``run.batch_size_train`` and ``run.num_workers``, shards split over ranks/workers as their
``build_info.resample`` says; resuming restores map-style datasets exactly but cannot replay a shard
position (a warning says so; see :class:`~evlgen_lavis.runners.data.IterableStream`), and
``run.cache_vision_features`` refuses them.

Also read elsewhere: seed (42), device / dist_backend (:mod:`.distributed`), init_lr ... (:mod:`.optim`),
cache_vision_features ... (:mod:`.vision_cache`), batch_size_train, batch_size_eval, num_workers,
train_splits, valid_splits, test_splits, use_dist_eval_sampler (LAVIS's meanings).
"""
from dataclasses import dataclass
from typing import Optional

from evlgen_lavis.runners.mix import normalize_ratios


def _positive_int(run, key, default=None):
    value = run.get(key, default)
    if value is None:
        raise ValueError(f"run.{key} is not set: give a positive integer")
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"run.{key} must be a positive integer, got {value!r}") from None
    if value <= 0:
        raise ValueError(f"run.{key} must be a positive integer, got {value}")
    return value


def _choice(run, key, default, choices):
    value = str(run.get(key, default)).lower()
    if value not in choices:
        raise ValueError(f"run.{key}={value!r} is not one of {list(choices)}")
    return value


@dataclass
class RunSettings:
    max_iters: int
    iters_per_inner_epoch: int
    accum_grad_iters: int = 1
    max_grad_norm: Optional[float] = None
    amp: bool = False
    amp_dtype: str = "bf16"
    nonfinite_loss: str = "stop"
    max_skip_fraction: float = 0.05
    save_every: int = 0
    keep_last_ckpts: int = 2
    stop_after_iters: Optional[int] = None
    find_unused_parameters: bool = False
    test_checkpoint: str = "best"
    log_freq: int = 50
    seed: int = 42
    train_dataset_ratios: Optional[object] = None  # dict or list, checked for format (names: .mix)

    @classmethod
    def from_run_cfg(cls, run):
        if run.get("evaluate", False) and run.get("max_iters", None) is None:
            max_iters = 1  # evaluation-only configs need no training schedule
        else:
            max_iters = _positive_int(run, "max_iters")
        ipe = _positive_int(run, "iters_per_inner_epoch", max_iters)
        accum = _positive_int(run, "accum_grad_iters", 1)
        save_every = _positive_int(run, "save_every", ipe)
        stop_after = run.get("stop_after_iters", None)
        stop_after = None if stop_after is None else _positive_int(run, "stop_after_iters")
        aligned = (("iters_per_inner_epoch", ipe), ("save_every", save_every), ("stop_after_iters", stop_after))
        for key, value in aligned:
            if value is not None and value % accum:
                raise ValueError(
                    f"run.{key}={value} is not a multiple of run.accum_grad_iters={accum}: checkpoints and "
                    "validation must fall on optimizer steps"
                )
        max_grad_norm = run.get("max_grad_norm", None)
        max_grad_norm = float(max_grad_norm) if max_grad_norm else None
        fraction = float(run.get("max_skip_fraction", 0.05))
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"run.max_skip_fraction must be between 0 and 1, got {fraction}")
        return cls(
            max_iters=max_iters,
            iters_per_inner_epoch=ipe,
            accum_grad_iters=accum,
            max_grad_norm=max_grad_norm,
            amp=bool(run.get("amp", False)),
            amp_dtype=_choice(run, "amp_dtype", "bf16", ("bf16", "fp16")),
            nonfinite_loss=_choice(run, "nonfinite_loss", "stop", ("stop", "skip")),
            max_skip_fraction=fraction,
            save_every=save_every,
            keep_last_ckpts=int(run.get("keep_last_ckpts", 2)),
            stop_after_iters=stop_after,
            find_unused_parameters=bool(run.get("find_unused_parameters", False)),
            test_checkpoint=_choice(run, "test_checkpoint", "best", ("best", "last")),
            log_freq=_positive_int(run, "log_freq", 50),
            seed=int(run.get("seed", 42)),
            train_dataset_ratios=normalize_ratios(run.get("train_dataset_ratios", None)),
        )
