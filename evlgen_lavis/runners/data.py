"""Data loading for the iteration-based runner: a resumable, deterministic training stream and eval loaders.

What makes a resumed run see exactly the batches an uninterrupted one would:

* :class:`ResumableSampler` draws epoch ``e``'s order from ``seed + e`` alone (the same on every rank,
  then sharded like ``DistributedSampler``) and can start part-way through an epoch;
* :class:`SeededSampleDataset` makes the random augmentation of sample ``i`` in epoch ``e`` a function of
  ``(seed, e, i)`` alone: it seeds python/numpy/torch for that one ``__getitem__`` and restores the
  caller's generators afterwards, so data loading neither depends on nor disturbs the training RNG
  (dropout) and does not depend on worker count or on where a run was resumed;
* :class:`TrainStream` counts the batches consumed in the current epoch (``state_dict``) and skips
  them on resume; it creates each epoch's DataLoader with its own seeded generator, so the global RNG
  is not drawn from when an epoch starts. No 2 s sleep at the epoch switch (LAVIS's IterLoader).

Iterable (webdataset) train datasets go through :class:`IterableStream` instead: no sampler (the
dataset splits its shards over ranks and workers itself), a fresh pass when one ends, the same skip
counting, and only an *approximate* resume (see its docstring). Several train datasets mixed by
``run.train_dataset_ratios``: :mod:`evlgen_lavis.runners.mix`.

No ``PrefetchLoader`` (it creates a ``torch.cuda.Stream``): batches are moved with :func:`move_to_device`.
"""
import logging
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from evlgen_lavis.datasets.skipping import SkipCounter, TooManySkippedError, batch_size_of
from evlgen_lavis.runners.rng import seeded_rng

logger = logging.getLogger(__name__)

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant for mixing (seed, epoch, index) into one seed


def sample_seed(seed, epoch, index):
    """A 63-bit seed determined by ``(seed, epoch, index)``."""
    x = (int(seed) * _MIX + int(epoch)) * _MIX + int(index)
    return (x ^ (x >> 31)) % (2**63)


class SeededSampleDataset(Dataset):
    """Wraps a map-style dataset so that ``self[i]`` runs under :func:`seeded_rng` of
    ``sample_seed(seed, epoch, i)``; set ``epoch`` before creating each epoch's iterator. Other
    attributes (``collater``, ``annotation``, ...) are the wrapped dataset's."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with seeded_rng(sample_seed(self.seed, self.epoch, index)):
            return self.dataset[index]

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling in a worker): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableSampler(Sampler):
    """Indices of this rank's share of epoch ``epoch``: a permutation drawn from ``seed + epoch`` (or
    ``range(n)`` without shuffle), padded by wrapping to a multiple of ``num_replicas`` and strided by
    rank, as ``DistributedSampler``. ``set_start(k)`` skips the first ``k`` indices of the next pass."""

    def __init__(self, num_samples, num_replicas=1, rank=0, shuffle=True, seed=0):
        if num_samples <= 0:
            raise ValueError("the training dataset is empty")
        self.num_samples, self.num_replicas, self.rank = int(num_samples), int(num_replicas), int(rank)
        self.shuffle, self.seed = shuffle, int(seed)
        self.per_rank = -(-self.num_samples // self.num_replicas)  # ceil
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def set_start(self, start):
        self.start = int(start)

    def indices(self):
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.num_replicas
        order = (order * (-(-total // len(order))))[:total]  # pad by wrapping around
        return order[self.rank:total:self.num_replicas]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self):
        return max(0, self.per_rank - self.start)


class TrainStream:
    """An endless stream of training batches over epochs, with a resumable position.

    ``next(stream)`` returns the next collated batch (possibly an "empty" batch from the skip-aware
    collater; see :meth:`next_nonempty`). ``epoch`` is the data epoch, ``batches`` the number of batches
    of that epoch consumed so far; ``state_dict()``/``load_state_dict()`` save and restore both.
    Batches are full (``drop_last``) so every rank takes the same number of steps per epoch.
    """

    def __init__(self, dataset, batch_size, collate_fn, num_workers=0, num_replicas=1, rank=0, seed=0,
                 pin_memory=False, shuffle=True, name=None):
        self.name = name
        self.dataset = SeededSampleDataset(dataset, seed)
        self.batch_size, self.collate_fn = int(batch_size), collate_fn
        self.num_workers, self.pin_memory, self.seed = int(num_workers), pin_memory, int(seed)
        self.sampler = ResumableSampler(len(dataset), num_replicas, rank, shuffle=shuffle, seed=seed)
        self.batches_per_epoch = self.sampler.per_rank // self.batch_size
        if self.batches_per_epoch == 0:
            what = "the training set" if name is None else f"train dataset {name!r}"
            raise ValueError(
                f"{what} has {len(dataset)} samples, fewer than one batch per rank "
                f"(run.batch_size_train={batch_size} x {num_replicas} rank(s)): lower run.batch_size_train"
            )
        self.epoch, self.batches = 0, 0
        self._iterator = None

    def __iter__(self):
        return self

    def _start_epoch(self):
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.batches * self.batch_size)
        self.dataset.epoch = self.epoch
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)  # worker base seeds; keeps the global RNG untouched
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                            num_workers=self.num_workers, collate_fn=self.collate_fn, drop_last=True,
                            pin_memory=self.pin_memory, generator=generator)
        self._iterator = iter(loader)

    def __next__(self):
        if self._iterator is None:
            self._start_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.batches = self.epoch + 1, 0
            self._start_epoch()
            batch = next(self._iterator)
        self.batches += 1
        return batch

    def next_nonempty(self, counter: SkipCounter, iteration=None):
        """The next batch that has samples; every batch fetched is added to ``counter``. Raises
        :class:`TooManySkippedError` when a whole epoch's worth of consecutive batches was empty.
        (``iteration`` is unused here; mixed streams choose their dataset with it.)"""
        return first_nonempty(
            self, counter, self.batches_per_epoch + 1,
            f"{self.batches_per_epoch + 1} consecutive training batches had no readable sample: "
            "check the image directory (datasets.<name>.build_info.images.storage) and the annotation paths",
        )

    def state_dict(self):
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state):
        self._iterator = None
        if "mix" in state or state.get("kind", "map") != "map":
            logger.warning("the checkpoint's data position is of a different training-data setup (a dataset "
                           "mix or an iterable dataset): %s starts from the beginning of its data",
                           self.name or "the training set")
            self.epoch, self.batches = 0, 0
            return
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])


def is_iterable_dataset(dataset):
    """True for iterable-style datasets (webdataset ``DataPipeline``, ``ChainDataset``, any torch
    ``IterableDataset``, or anything without ``__getitem__``/``__len__``)."""
    return isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"))


class IterableStream:
    """An endless stream of training batches from an iterable (webdataset) dataset.

    ``DataLoader(dataset, batch_size, num_workers, collate_fn=dataset.collater)`` without a sampler: the
    dataset splits its shards over ranks and DataLoader workers as its builder configured them (see
    :class:`evlgen_lavis.datasets.paper.WebImageTextDataset`: ``resample: true`` draws shards at random per
    rank and worker, endlessly; ``resample: false`` is one pass with the shards split by node and worker).
    When a pass ends, a new one starts (``epoch`` counts the passes). Batches are not dropped at the end
    of a pass (LAVIS's web loaders do the same), so the last batch of a worker's share may be smaller.
    Unreadable samples are counted through the batches' ``n_skipped`` as for map-style datasets.

    Random numbers: with ``num_workers=0`` the pipeline (shuffle buffer, augmentation) runs in this process
    under its own python/numpy/torch generator states, seeded by ``(seed, rank)``, so it neither draws from
    nor depends on the training RNG (dropout); with workers, each pass's worker seeds come from a generator
    seeded by ``(seed, rank, pass)``. Webdataset itself seeds shard resampling and its shuffle buffer from
    the clock, so the sample order is not reproducible in any case.

    Resume is approximate: ``state_dict()`` records the pass and the batches taken from it, but a shard
    position cannot be replayed, so :meth:`load_state_dict` only restores the counters (and warns): the
    resumed run starts a fresh pass (``resample: false``: from the first shards again) or fresh random
    shard draws (``resample: true``, where this makes no statistical difference).
    """

    resume_is_exact = False
    MAX_CONSECUTIVE_EMPTY = 1000  # batches that are all unreadable before giving up

    def __init__(self, dataset, batch_size, collate_fn, num_workers=0, rank=0, seed=0, pin_memory=False,
                 name=None):
        self.dataset, self.name = dataset, name
        self.batch_size, self.collate_fn = int(batch_size), collate_fn
        self.num_workers, self.pin_memory = int(num_workers), pin_memory
        self.seed, self.rank = int(seed), int(rank)
        self.epoch, self.batches = 0, 0
        self._iterator = None
        self._rng = None  # this stream's generator states (num_workers=0)

    def __iter__(self):
        return self

    def _label(self):
        return "the iterable train dataset" if self.name is None else f"train dataset {self.name!r}"

    def _start_pass(self):
        generator = torch.Generator()
        generator.manual_seed(sample_seed(self.seed, self.rank, self.epoch))
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=self.collate_fn, pin_memory=self.pin_memory, generator=generator)
        self._iterator = iter(loader)

    def _fetch(self):
        if self.num_workers > 0:
            return next(self._iterator)
        outer = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        if self._rng is None:
            with seeded_rng(sample_seed(self.seed, self.rank, 0x5EED)):
                self._rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.setstate(self._rng[0])
        np.random.set_state(self._rng[1])
        torch.set_rng_state(self._rng[2])
        try:
            return next(self._iterator)
        finally:
            self._rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
            random.setstate(outer[0])
            np.random.set_state(outer[1])
            torch.set_rng_state(outer[2])

    def __next__(self):
        if self._iterator is None:
            self._start_pass()
        try:
            batch = self._fetch()
        except StopIteration:
            if self.batches == 0:
                raise self._no_batch_error() from None
            self.epoch, self.batches = self.epoch + 1, 0
            self._start_pass()
            try:
                batch = self._fetch()
            except StopIteration:
                raise self._no_batch_error() from None
        self.batches += 1
        return batch

    def _no_batch_error(self):
        skipped = getattr(self.dataset, "n_skipped", None)
        detail = f" ({skipped} samples were skipped as unreadable in this process)" if skipped else ""
        return TooManySkippedError(
            f"{self._label()} yielded no batch in a whole pass on rank {self.rank}{detail}: every sample "
            "was unreadable, or this rank/worker got no shard (with build_info.resample: false the shards "
            "are split over ranks x run.num_workers; give more shards, fewer workers, or resample: true)"
        )

    def next_nonempty(self, counter: SkipCounter, iteration=None):
        """The next batch that has samples; every batch fetched is added to ``counter``."""
        return first_nonempty(
            self, counter, self.MAX_CONSECUTIVE_EMPTY,
            f"{self.MAX_CONSECUTIVE_EMPTY} consecutive batches of {self._label()} had no readable sample: "
            "check its shards (datasets.<name>.build_info.storage)",
        )

    def state_dict(self):
        return {"kind": "iterable", "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state, warn=True):
        """Restore the counters only (see the class docstring); warns unless ``warn=False``."""
        self.epoch, self.batches = int(state.get("epoch", 0)), int(state.get("batches", 0))
        self._iterator = None
        if warn:
            warn_approximate_resume([self.name or "train"])


def warn_approximate_resume(names):
    """The one warning a resumed run gives for its iterable (webdataset) train datasets."""
    logger.warning(
        "Resuming with iterable (webdataset) train dataset(s) %s: their position in the shards cannot be "
        "replayed, so they continue with fresh shard draws / a fresh pass; the resumed run does not repeat "
        "the batches an uninterrupted run would have seen from them (map-style datasets resume exactly)",
        sorted(names))


def first_nonempty(stream, counter, limit, message):
    """The next batch of ``stream`` that has samples, adding every batch fetched to ``counter``; raises
    :class:`TooManySkippedError` with ``message`` after ``limit`` empty batches in a row."""
    for _ in range(limit):
        batch = next(stream)
        count_batch(counter, batch)
        if not batch.get("empty", False):
            return batch
    raise TooManySkippedError(message)


def count_batch(counter, batch):
    """Add a batch to a :class:`SkipCounter`; batches of datasets that do not report ``n_skipped``
    count as fully readable. Returns the batch's ``n_skipped``."""
    if "n_skipped" in batch:
        return counter.update(batch)
    try:
        counter.seen += batch_size_of(batch)
    except KeyError:
        pass
    return 0


class EvalBatches:
    """Iterates an eval DataLoader, dropping empty batches (counted in ``self.counter``) and moving the
    others to ``device``. Has ``__len__`` (LAVIS's MetricLogger needs it)."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device
        self.counter = SkipCounter()

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            count_batch(self.counter, batch)
            if batch.get("empty", False):
                continue
            yield move_to_device(batch, self.device)


def build_eval_loader(dataset, batch_size, num_workers, collate_fn, distributed, use_dist_sampler=True,
                      pin_memory=False, seed=0):
    """A DataLoader over an eval split, in order; sharded over ranks (padded, as LAVIS) when distributed."""
    sampler = None
    if distributed and use_dist_sampler:
        sampler = DistributedSampler(dataset, shuffle=False)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(dataset, batch_size=int(batch_size), sampler=sampler, shuffle=False,
                      num_workers=int(num_workers), collate_fn=collate_fn, drop_last=False,
                      pin_memory=pin_memory, generator=generator)


def move_to_device(sample, device, non_blocking=True):
    """Tensors in (nested dicts/lists/tuples of) ``sample`` moved to ``device``; other values kept."""
    if torch.is_tensor(sample):
        return sample.to(device, non_blocking=non_blocking and device.type == "cuda")
    if isinstance(sample, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in sample.items()}
    if isinstance(sample, (list, tuple)):
        moved = [move_to_device(v, device, non_blocking) for v in sample]
        return type(sample)(moved) if isinstance(sample, tuple) else moved
    return sample
