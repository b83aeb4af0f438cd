"""Skip unreadable samples instead of crashing, and count them.

The contract, end to end:

1. A dataset's ``__getitem__`` returns ``None`` when its image cannot be read (missing file, corrupt or
   truncated image); :func:`open_image` does the reading and logs a warning with the path.
2. :func:`skip_collate` (what our datasets' ``collater`` calls) drops the ``None`` items and adds
   ``batch["n_skipped"]``, a 0-d ``torch.long`` tensor (a tensor, so it survives DataLoader workers and
   ``prepare_sample``'s move to the device). A batch whose items are all unreadable becomes
   ``{"n_skipped": tensor(k), "empty": True}``: consumers must test ``batch.get("empty", False)`` and skip
   the step. Non-empty batches carry no "empty" key.
3. :class:`SkipCounter` sums ``n_skipped`` and the number of samples seen across iterations (and ranks,
   with :meth:`SkipCounter.synchronize`) and :meth:`SkipCounter.check` raises :class:`TooManySkippedError`
   when the fraction passes ``run.max_skip_fraction``.

LAVIS always wraps the train split in its ``ConcatDataset``, whose collater reads ``s.keys()`` and so
breaks on ``None`` items: build the runner's datasets with :func:`concat_datasets` (a drop-in for
``lavis.datasets.data_utils.concat_datasets``) which uses :class:`SkipAwareConcatDataset` instead.
"""
import contextlib
import logging

import torch
from lavis.datasets.data_utils import concat_datasets as lavis_concat_datasets
from lavis.datasets.datasets.base_dataset import ConcatDataset as LavisConcatDataset
from PIL import Image, ImageFile
from torch.utils.data.dataloader import default_collate

logger = logging.getLogger(__name__)

# What reading a bad image file raises: OSError covers FileNotFoundError, PIL's UnidentifiedImageError
# and "image file is truncated"; PIL raises SyntaxError/ValueError on some broken headers/chunks, and
# DecompressionBombError on absurd sizes.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@contextlib.contextmanager
def _strict_truncation():
    """Make PIL raise on truncated files while reading one image.

    ``import lavis`` sets the process-global ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` (in
    coco_caption_datasets.py), which silently pads truncated images with grey. We restore whatever value
    was set afterwards. (Data loading is single-threaded per process, so the toggle is not racy there.)
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def open_image(path, allow_truncated=False):
    """Open ``path`` as an RGB PIL image, or return ``None`` (with a warning naming the path) when it is
    missing, corrupt or truncated. ``allow_truncated=True`` keeps LAVIS's behaviour of padding
    truncated images instead of skipping them."""
    guard = contextlib.nullcontext() if allow_truncated else _strict_truncation()
    try:
        with guard, Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the full decode inside the guard
    except UNREADABLE_IMAGE_ERRORS as err:
        logger.warning("Skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
        return None


def skip_collate(samples, collate_fn=default_collate):
    """Collate the non-``None`` samples with ``collate_fn`` and add ``n_skipped`` (0-d long tensor).

    When every sample is ``None`` the result is ``{"n_skipped": tensor(len(samples)), "empty": True}``.
    """
    good = [s for s in samples if s is not None]
    n_skipped = torch.tensor(len(samples) - len(good), dtype=torch.long)
    if not good:
        return {"n_skipped": n_skipped, "empty": True}
    batch = collate_fn(good)
    batch["n_skipped"] = n_skipped
    return batch


class SkipAwareConcatDataset(LavisConcatDataset):
    """LAVIS's ConcatDataset whose collater tolerates ``None`` samples (see module docstring)."""

    def collater(self, samples):
        good = [s for s in samples if s is not None]
        if not good:
            return skip_collate(samples)
        batch = super().collater(good)  # LAVIS: keep the keys all samples share, then datasets[0].collater
        batch["n_skipped"] = torch.tensor(len(samples) - len(good), dtype=torch.long)
        return batch


def concat_datasets(datasets):
    """``lavis.datasets.data_utils.concat_datasets`` with the train split's map-style ConcatDataset
    replaced by :class:`SkipAwareConcatDataset`. Same input (``{split: [datasets]}``) and output."""
    datasets = lavis_concat_datasets(datasets)

    def rewrap(d):
        if isinstance(d, LavisConcatDataset) and not isinstance(d, SkipAwareConcatDataset):
            return SkipAwareConcatDataset(d.datasets)
        return d

    train = datasets.get("train")
    if isinstance(train, tuple):
        datasets["train"] = tuple(rewrap(d) for d in train)
    elif train is not None:
        datasets["train"] = rewrap(train)
    return datasets


def batch_size_of(batch):
    """Number of (readable) samples in a collated batch: 0 for an empty batch, else the length of the
    first of image / image_embeds / text_input / question_id / instance_id / image_id found."""
    if batch.get("empty", False):
        return 0
    for key in ("image", "image_embeds", "text_input", "question_id", "instance_id", "image_id"):
        if key in batch:
            return len(batch[key])
    raise KeyError(f"cannot tell the batch size of a batch with keys {sorted(batch)}")


class TooManySkippedError(RuntimeError):
    """Raised by :meth:`SkipCounter.check` when too large a fraction of samples was unreadable."""


class SkipCounter:
    """Counts samples seen and skipped across batches.

    Usage in a runner::

        counter = SkipCounter()
        for batch in loader:
            counter.update(batch)
            if batch.get("empty", False):
                continue
            ...
        counter.synchronize()                      # sums over DDP ranks (no-op when not distributed)
        counter.check(cfg.run_cfg.get("max_skip_fraction", 0.01))
    """

    def __init__(self):
        self.seen = 0  # samples requested, readable or not
        self.skipped = 0

    def update(self, batch):
        """Add one collated batch (a dict from :func:`skip_collate`); returns the batch's ``n_skipped``."""
        n_skipped = int(batch.get("n_skipped", 0))
        self.skipped += n_skipped
        self.seen += n_skipped + batch_size_of(batch)
        return n_skipped

    @property
    def fraction(self):
        return self.skipped / self.seen if self.seen else 0.0

    def synchronize(self):
        """Replace the local counts by their sum over all ranks (when torch.distributed is initialised).
        Every rank must call it."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        counts = torch.tensor([self.seen, self.skipped], dtype=torch.long, device=device)
        torch.distributed.all_reduce(counts)
        self.seen, self.skipped = (int(v) for v in counts.tolist())
        return self

    def check(self, max_fraction):
        """Raise :class:`TooManySkippedError` if more than ``max_fraction`` of the samples seen were
        skipped (``max_fraction`` of 0 allows none; 1 allows all)."""
        if self.skipped and self.fraction > max_fraction:
            raise TooManySkippedError(
                f"{self.skipped} of {self.seen} samples ({self.fraction:.2%}) were unreadable and skipped, "
                f"more than run.max_skip_fraction={max_fraction}. The warnings logged by "
                f"{__name__} name each unreadable file: fix or remove them from the annotation file, "
                "or raise run.max_skip_fraction in the run config."
            )

    def __repr__(self):
        return f"SkipCounter(seen={self.seen}, skipped={self.skipped})"
