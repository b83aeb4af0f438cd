"""Runner, training entry points and their parts (registered on import: ``runner_evlgen_iter`` and the
LR schedules ``evlgen_warmup_cosine_iter`` and ``constant_lr``).

Modules, one concern each: :mod:`.distributed` (process group on CPU/GPU), :mod:`.config` (validated
LAVIS config), :mod:`.settings` (the runner's run-config keys), :mod:`.optim` (optimizer, LR schedules),
:mod:`.data` (resumable training stream, eval loaders), :mod:`.rng`, :mod:`.checkpoint`, :mod:`.step`
(AMP, accumulation, clipping, non-finite losses), :mod:`.vision_cache`, :mod:`.metrics_log`,
:mod:`.runner_iter` (the runner, with :mod:`.runner_eval` and :mod:`.runner_ckpt`) and :mod:`.cli`
(what train.py / evaluate.py run).
"""
from evlgen_lavis.runners.config import ConfigError, EvlgenConfig, load_config  # noqa: F401
from evlgen_lavis.runners.optim import ConstantIterLR, WarmupCosineIterLR  # noqa: F401
from evlgen_lavis.runners.runner_iter import RunnerEvlgenIter  # noqa: F401
from evlgen_lavis.runners.step import NonFiniteLossError  # noqa: F401
