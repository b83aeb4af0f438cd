"""Training on several datasets: ``run.train_dataset_ratios`` and the training stream of a run.

``run.train_dataset_ratios`` weights the train datasets (the names are the ``datasets:`` section's
builder names), as in the paper's pretraining configs::

    run:
      train_dataset_ratios: {laion115M: 15, ccs14M: 4, local_caption: 1}
      # or LAVIS's list form, in the order of the datasets section: [15, 4, 1]

Every training iteration draws ONE dataset with these weights (as LAVIS's ``MultiIterLoader``) and
takes that iteration's batch from it. Unlike LAVIS, the draw is a pure function of ``(run.seed,
iteration)`` (:class:`MixSchedule`): every DDP rank draws the same dataset without communicating (so the
ranks step the same data source together), and a resumed run makes the same draws as an uninterrupted
one. Each dataset keeps its own stream and position: a map-style dataset its resumable
:class:`~evlgen_lavis.runners.data.TrainStream` (exact resume), an iterable (webdataset) one its
:class:`~evlgen_lavis.runners.data.IterableStream` (approximate resume). The checkpoint stores
``{"mix": {name: position}, "weights": ..., "used": {name: batches so far}}``. ``log.txt`` gets the
batches each dataset gave per logged span (``train_batches_<name>``), the periodic log line names the
dataset, and ``metrics.csv``'s ``epoch`` is the data epoch of the dataset drawn for that iteration.
Each dataset has its own DataLoader (and its own ``run.num_workers`` worker processes).

Every train dataset needs a weight and every weight a train dataset (errors name
``run.train_dataset_ratios.<name>``); a weight of 0 leaves that dataset out. Without ratios the
map-style train datasets are concatenated into one stream (LAVIS's behaviour; the checkpoint format of
a single stream), and iterable datasets, if any, are mixed with it with equal weights (LAVIS samples its
(concatenated, chained) pair evenly).
"""
import bisect
import logging
import math
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence

from omegaconf import OmegaConf

from evlgen_lavis.runners.data import sample_seed, warn_approximate_resume

logger = logging.getLogger(__name__)

KEY = "run.train_dataset_ratios"
_M64 = (1 << 64) - 1


def normalize_ratios(value):
    """The config value as a plain ``dict`` (mapping form) or ``list`` (list form) of non-negative
    finite numbers, or None when unset. Format errors name the key; names are checked by
    :func:`resolve_ratios`."""
    if value is None:
        return None
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        items = [(f"{KEY}.{k}", k, v) for k, v in value.items()]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = [(f"{KEY}[{i}]", i, v) for i, v in enumerate(value)]
    else:
        raise ValueError(f"{KEY} must be a mapping {{dataset name: weight}} or a list of weights in the order "
                         f"of the datasets section, got {value!r}")
    if not items:
        raise ValueError(f"{KEY} is empty: give each train dataset a weight, or remove the key")
    weights = {}
    for key, k, v in items:
        try:
            w = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number, got {v!r}") from None
        if not math.isfinite(w) or w < 0 or isinstance(v, bool):
            raise ValueError(f"{key} must be a non-negative number, got {v!r}")
        weights[k] = w
    if sum(weights.values()) <= 0:
        raise ValueError(f"{KEY}: the weights sum to 0; at least one dataset needs a positive weight")
    return weights if isinstance(value, Mapping) else [weights[i] for i in range(len(items))]


def resolve_ratios(value, names):
    """``{name: weight}`` for the train dataset ``names`` (in config order) from the config value (see
    :func:`normalize_ratios`), or None when unset. Unknown and missing names raise ``ValueError`` naming
    ``run.train_dataset_ratios.<name>`` and the train datasets there are."""
    ratios = normalize_ratios(value)
    if ratios is None:
        return None
    names = list(names)
    if isinstance(ratios, list):
        if len(ratios) != len(names):
            raise ValueError(
                f"{KEY} lists {len(ratios)} weight(s) but there are {len(names)} train dataset(s) {names} (the "
                f"list is in the order of the datasets section); or give a mapping {{name: weight}}"
            )
        return dict(zip(names, ratios))
    unknown = [k for k in ratios if k not in names]
    if unknown:
        raise ValueError(
            f"{KEY}.{unknown[0]}: there is no train dataset named {unknown[0]!r}; the train datasets are "
            f"{names} (builder names of the datasets section that have a split in run.train_splits)"
        )
    missing = [n for n in names if n not in ratios]
    if missing:
        raise ValueError(
            f"{KEY} gives no weight to the train dataset(s) {missing}: set {KEY}.{missing[0]} (0 leaves it "
            "out), or remove it from the datasets section"
        )
    return {n: ratios[n] for n in names}


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix_uniform(seed, iteration):
    """A number in [0, 1) that depends on ``(seed, iteration)`` only (splitmix64; the same on every
    machine, Python version and rank)."""
    return (_splitmix64((_splitmix64(int(seed) & _M64) + int(iteration)) & _M64) >> 11) / float(1 << 53)


class MixSchedule:
    """Which dataset iteration ``it`` trains on: ``choose(it)``, a pure function of ``(seed, it)`` and the
    weights. Datasets with weight 0 are never chosen. The order used for the draw is the sorted names,
    so reordering the datasets section changes nothing."""

    def __init__(self, weights, seed):
        self.names = sorted(n for n, w in weights.items() if w > 0)
        if not self.names:
            raise ValueError(f"{KEY}: at least one dataset needs a positive weight")
        total = sum(float(weights[n]) for n in self.names)
        self.probabilities = {n: float(weights[n]) / total for n in self.names}
        self._cumulative, acc = [], 0.0
        for n in self.names:
            acc += self.probabilities[n]
            self._cumulative.append(acc)
        self.seed = int(seed)

    def choose(self, iteration):
        i = bisect.bisect_right(self._cumulative, mix_uniform(self.seed, iteration))
        return self.names[min(i, len(self.names) - 1)]


def stream_seed(seed, name):
    """The data seed of dataset ``name`` in a mix: distinct per dataset, stable under reordering."""
    return sample_seed(seed, zlib.crc32(str(name).encode()), 0)


class MixedStream:
    """Training batches drawn from several streams by a :class:`MixSchedule` (see the module docstring).

    Same interface as :class:`~evlgen_lavis.runners.data.TrainStream` for the runner:
    ``next_nonempty(counter, iteration)``, ``epoch`` (the data epoch of the stream used last),
    ``state_dict()`` / ``load_state_dict()``; plus ``current`` (the dataset of the last batch) and
    ``used`` (batches taken per dataset since the run began, resumes included).
    """

    def __init__(self, streams, weights, seed):
        self.streams = dict(streams)
        self.weights = {n: float(w) for n, w in weights.items()}
        self.schedule = MixSchedule(self.weights, seed)
        missing = [n for n in self.schedule.names if n not in self.streams]
        if missing:
            raise ValueError(f"no stream for the weighted dataset(s) {missing}")
        self.current = None
        self.used = Counter()

    @property
    def epoch(self):
        return self.streams[self.current].epoch if self.current is not None else 0

    def next_nonempty(self, counter, iteration):
        """The batch of iteration ``iteration`` (the next non-empty one of the dataset drawn for it)."""
        name = self.schedule.choose(iteration)
        batch = self.streams[name].next_nonempty(counter)
        self.current = name
        self.used[name] += 1
        return batch

    def state_dict(self):
        return {"mix": {n: s.state_dict() for n, s in self.streams.items()}, "weights": dict(self.weights),
                "used": dict(self.used)}

    def load_state_dict(self, state):
        if "mix" not in state:
            logger.warning("the checkpoint holds the data position of a single training stream, this run mixes "
                           "%s (%s): every dataset starts from its beginning", sorted(self.streams), KEY)
            return
        saved = state["mix"]
        for name in sorted(set(saved) - set(self.streams)):
            logger.warning("the checkpoint has a data position for %r, which this run does not train on", name)
        approximate = []
        for name, stream in self.streams.items():
            if name not in saved:
                logger.warning("the checkpoint has no data position for %r: it starts from its beginning", name)
                continue
            if getattr(stream, "resume_is_exact", True):
                stream.load_state_dict(saved[name])
            else:
                stream.load_state_dict(saved[name], warn=False)
                approximate.append(name)
        if approximate:
            warn_approximate_resume(approximate)
        old = state.get("weights")
        if old is not None and {k: float(v) for k, v in old.items()} != self.weights:
            logger.warning("resuming with %s=%s, the checkpoint was written with %s: the datasets drawn per "
                           "iteration differ from the interrupted run's", KEY, self.weights, old)
        self.used = Counter({k: int(v) for k, v in (state.get("used") or {}).items()})


def build_train_stream(datasets, ratios, make_map_stream, make_iterable_stream, seed):
    """The training stream for the train datasets ``{name: dataset}`` (config order).

    ``make_map_stream(list of map-style datasets, name, seed)`` builds the stream of their concatenation
    (one or more datasets); ``make_iterable_stream(dataset, name, seed)`` that of one iterable dataset. With
    ``ratios`` (the config value): a :class:`MixedStream` over the datasets with a positive weight (one
    dataset: its stream alone). Without: the map-style datasets concatenated (seed unchanged: the single
    stream of earlier versions), mixed evenly with the iterable ones if there are any.
    """
    from evlgen_lavis.runners.data import is_iterable_dataset

    names = list(datasets)
    if not names:
        raise ValueError("no dataset has the split named in run.train_splits")
    weights = resolve_ratios(ratios, names)

    def make(name, sub_seed):
        ds = datasets[name]
        if is_iterable_dataset(ds):
            return make_iterable_stream(ds, name, sub_seed)
        return make_map_stream([ds], name, sub_seed)

    if weights is not None:
        used = [n for n in names if weights[n] > 0]
        for n in names:
            if weights[n] <= 0:
                logger.info("%s.%s = 0: %s is not trained on", KEY, n, n)
        if len(used) == 1:
            return make(used[0], seed)
        streams = {n: make(n, stream_seed(seed, n)) for n in used}
        logger.info("Mixing train datasets per iteration with probabilities %s",
                    {n: round(p, 4) for n, p in MixSchedule(weights, seed).probabilities.items()})
        return MixedStream(streams, {n: weights[n] for n in used}, seed)

    map_names = [n for n in names if not is_iterable_dataset(datasets[n])]
    iter_names = [n for n in names if is_iterable_dataset(datasets[n])]
    streams = {}
    if map_names:
        if len(map_names) > 1:
            logger.info("%s is not set: the map-style train datasets %s are concatenated", KEY, map_names)
        joined = "+".join(map_names)
        streams[joined] = make_map_stream([datasets[n] for n in map_names], joined, seed)
    for n in iter_names:
        streams[n] = make_iterable_stream(datasets[n], n, seed if len(names) == 1 else stream_seed(seed, n))
    if len(streams) == 1:
        return next(iter(streams.values()))
    logger.info("%s is not set: drawing evenly per iteration from %s (as LAVIS samples its concatenated and "
                "chained train sets evenly)", KEY, sorted(streams))
    return MixedStream(streams, {n: 1.0 for n in streams}, seed)
