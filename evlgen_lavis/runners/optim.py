"""Optimizer over the trainable parameters, and learning-rate schedules driven by the iteration count.

LAVIS's schedulers (``linear_warmup_cosine_lr``, ``linear_warmup_step_lr``) are epoch-based:
``step(cur_epoch, cur_step)`` warms up during epoch 0 and then decays once per epoch. They are
registered only when ``lavis.common.optims`` is imported, which this module does. For an
iteration-based run, :class:`IterationLR` maps iteration ``i`` to LAVIS's ``(epoch, step) = divmod(i,
iters_per_inner_epoch)``, and this module registers two schedules computed from the iteration itself:

* ``evlgen_warmup_cosine_iter`` (the default): linear warmup from ``warmup_lr`` to ``init_lr`` over
  ``warmup_steps`` iterations, then cosine decay to ``min_lr`` at ``max_iters``;
* ``constant_lr``: the same warmup, then ``init_lr``.

Run config keys: ``init_lr`` (required), ``min_lr`` (0), ``warmup_lr`` (-1: start warmup at init_lr),
``warmup_steps`` (0), ``lr_sched`` ("evlgen_warmup_cosine_iter"), ``lr_decay_rate`` (step schedule only),
``weight_decay`` (0.05), ``beta2`` (0.999).
"""
import logging
import math

import lavis.common.optims  # noqa: F401  (registers LAVIS's LR schedulers)
import torch
from lavis.common.registry import registry

logger = logging.getLogger(__name__)

DEFAULT_LR_SCHED = "evlgen_warmup_cosine_iter"


def register_lr_scheduler_once(name):
    """``registry.register_lr_scheduler(name)`` that tolerates the same class being registered twice."""

    def wrap(cls):
        existing = registry.mapping["lr_scheduler_name_mapping"].get(name)
        if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise KeyError(f"lr scheduler name '{name}' is already registered by {existing!r}")
        registry.mapping["lr_scheduler_name_mapping"][name] = cls
        return cls

    return wrap


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


class _IterSchedule:
    """Base of the iteration-driven schedules: ``lr_at(iteration)``; ``step_iter(iteration)`` applies it.
    Accepts (and ignores) LAVIS's epoch-based constructor arguments, so it builds like LAVIS's."""

    iteration_based = True

    def __init__(self, optimizer, init_lr, max_iters, min_lr=0.0, warmup_steps=0, warmup_start_lr=-1, **kwargs):
        if max_iters is None or int(max_iters) <= 0:
            raise ValueError(f"{type(self).__name__} needs max_iters > 0 (run.max_iters), got {max_iters!r}")
        self.optimizer = optimizer
        self.init_lr, self.min_lr = float(init_lr), float(min_lr)
        self.max_iters, self.warmup_steps = int(max_iters), int(warmup_steps or 0)
        self.warmup_start_lr = float(warmup_start_lr) if float(warmup_start_lr) >= 0 else self.init_lr

    def warmup_lr(self, iteration):
        return self.warmup_start_lr + (self.init_lr - self.warmup_start_lr) * iteration / self.warmup_steps

    def lr_at(self, iteration):
        raise NotImplementedError

    def step_iter(self, iteration):
        lr = self.lr_at(iteration)
        set_lr(self.optimizer, lr)
        return lr


@register_lr_scheduler_once("evlgen_warmup_cosine_iter")
class WarmupCosineIterLR(_IterSchedule):
    """Linear warmup for ``warmup_steps`` iterations, then cosine from ``init_lr`` (at the end of warmup)
    to ``min_lr`` (at ``max_iters``)."""

    def lr_at(self, iteration):
        if iteration < self.warmup_steps:
            return self.warmup_lr(iteration)
        span = max(1, self.max_iters - self.warmup_steps)
        progress = min(1.0, (iteration - self.warmup_steps) / span)
        return self.min_lr + (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@register_lr_scheduler_once("constant_lr")
class ConstantIterLR(_IterSchedule):
    """Linear warmup for ``warmup_steps`` iterations, then ``init_lr``."""

    def lr_at(self, iteration):
        return self.warmup_lr(iteration) if iteration < self.warmup_steps else self.init_lr


class IterationLR:
    """One interface for both kinds of schedule: ``step(iteration)`` sets the learning rate of
    ``iteration`` (0-based). Stateless apart from the last iteration, so resuming only needs the
    iteration count; ``state_dict`` records it for inspection."""

    def __init__(self, scheduler, name, iters_per_inner_epoch):
        self.scheduler, self.name = scheduler, name
        self.iters_per_inner_epoch = int(iters_per_inner_epoch)
        self.last_iteration = -1

    def step(self, iteration):
        if getattr(self.scheduler, "iteration_based", False):
            self.scheduler.step_iter(iteration)
        else:  # LAVIS: warmup in (inner) epoch 0 by step, then per-epoch decay
            epoch, step = divmod(iteration, self.iters_per_inner_epoch)
            self.scheduler.step(cur_epoch=epoch, cur_step=step)
        self.last_iteration = iteration
        return self.scheduler.optimizer.param_groups[0]["lr"]

    def state_dict(self):
        return {"name": self.name, "last_iteration": self.last_iteration}

    def load_state_dict(self, state):
        self.last_iteration = int(state.get("last_iteration", -1))


def build_lr_scheduler(run_cfg, optimizer, max_iters, iters_per_inner_epoch):
    """The schedule named by ``run.lr_sched`` (see the module docstring), wrapped in :class:`IterationLR`."""
    name = run_cfg.get("lr_sched", DEFAULT_LR_SCHED)
    cls = registry.get_lr_scheduler_class(name)
    if cls is None:
        known = sorted(registry.mapping["lr_scheduler_name_mapping"])
        raise ValueError(f"run.lr_sched={name!r} is not a registered LR scheduler; registered: {known}")
    kwargs = dict(
        optimizer=optimizer,
        max_epoch=max(1, int(max_iters) // int(iters_per_inner_epoch)),
        min_lr=float(run_cfg.get("min_lr", 0.0)),
        init_lr=float(run_cfg.init_lr),
        warmup_start_lr=float(run_cfg.get("warmup_lr", -1)),
        warmup_steps=int(run_cfg.get("warmup_steps", 0)),
    )
    if run_cfg.get("lr_decay_rate", None) is not None:
        kwargs["decay_rate"] = float(run_cfg.lr_decay_rate)
    if getattr(cls, "iteration_based", False):
        kwargs["max_iters"] = int(max_iters)
    return IterationLR(cls(**kwargs), name, iters_per_inner_epoch)


def trainable_parameters(model):
    """``[(name, parameter)]`` of the parameters that require gradients, in registration order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model, run_cfg):
    """AdamW over the trainable parameters only, with LAVIS's grouping: no weight decay for biases,
    1-d parameters (norms, scales) and names containing "ln"/"bn"."""
    if run_cfg.get("init_lr", None) is None:
        raise ValueError("run.init_lr is not set: give the peak learning rate, e.g. run.init_lr=1e-4")
    decay, no_decay = [], []
    for name, p in trainable_parameters(model):
        (no_decay if p.ndim < 2 or "bias" in name or "ln" in name or "bn" in name else decay).append(p)
    count = sum(p.numel() for p in decay + no_decay)
    if count == 0:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    logger.info("number of trainable parameters: %d", count)
    weight_decay = float(run_cfg.get("weight_decay", 0.05))
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=float(run_cfg.init_lr),
        weight_decay=weight_decay,
        betas=(0.9, float(run_cfg.get("beta2", 0.999))),
    )
