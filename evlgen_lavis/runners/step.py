"""One optimisation step: autocast, loss scaling, gradient accumulation, clipping, non-finite losses.

:class:`Stepper` does not know about data or logging. The runner calls, per iteration::

    with stepper.sync(last_micro_step):            # DDP no_sync on accumulation micro-steps
        with stepper.autocast():
            loss = task.train_step(model, samples)
        ... reduce stats over ranks, decide `bad` (any rank's loss NaN/inf) ...
        stepper.backward(loss, bad)
    if last_micro_step:
        grad_norm = stepper.finish_cycle()          # optimizer step, or discard on a bad loss

All ranks take the same decisions (``bad`` is agreed over ranks before backward), so DDP never waits
for a rank that skipped its backward.
"""
import contextlib
import logging

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or infinite and ``run.nonfinite_loss`` is "stop"."""


class Stepper:
    def __init__(self, model, params, optimizer, device, accum_grad_iters=1, max_grad_norm=None,
                 amp=False, amp_dtype="bf16"):
        self.model, self.params, self.optimizer = model, list(params), optimizer
        self.accum = int(accum_grad_iters)
        self.max_grad_norm = max_grad_norm
        self.amp_dtype = None
        if amp and device.type == "cuda":
            self.amp_dtype = AMP_DTYPES[amp_dtype]
        elif amp:
            logger.warning("run.amp is set but the device is %s: training in float32", device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.cycle_bad = False  # a micro-step of the current accumulation cycle had a bad loss

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def sync(self, last_micro_step):
        """DDP's ``no_sync()`` for accumulation micro-steps (gradients are all-reduced on the last one)."""
        if isinstance(self.model, DDP) and not last_micro_step:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss, bad):
        """Backward of ``loss / accum_grad_iters``; for a bad loss (agreed over ranks) a zero-gradient
        backward under DDP, so that the reducer completes, and the cycle is marked for discarding."""
        if bad:
            self.cycle_bad = True
            if isinstance(self.model, DDP):
                sum(p.sum() * 0.0 for p in self.params).backward()
            return
        loss = loss / self.accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def finish_cycle(self):
        """Apply the accumulated gradients (unscale, clip, step) and zero them; returns the gradient norm
        before clipping, or None when the cycle is discarded because of a bad loss."""
        if self.cycle_bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.cycle_bad = False
            return None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)
