"""Precomputed frozen-encoder features in place of images.

With a frozen vision encoder, its output for an image never changes (given a deterministic eval
processor), so it can be computed once:

    build_feature_cache(dataset, model.encode_image, "feats.pt", vis_processor=eval_processor)
    cached = CachedFeatureDataset(dataset, "feats.pt")   # samples carry "image_embeds" (N, C), no "image"

File format (``torch.save``; loaded memory-mapped): ``{"format": 1, "features": (M, N, C) tensor, one row
per unique image; "valid": (M,) bool, False for unreadable images; "keys": [M image paths as in the
annotation]; "index": (len(dataset),) long, dataset index -> row}``. Images shared by several samples
(several captions per image) are encoded once.
"""
import logging
import os

import torch
from torch.utils.data import DataLoader, Dataset

from evlgen_lavis.common import atomic_save

logger = logging.getLogger(__name__)

FORMAT = 1


class _UniqueImages(Dataset):
    """The processed image of each unique image key (``None`` if unreadable), in first-appearance order."""

    def __init__(self, dataset, first_index, vis_processor):
        self.dataset, self.first_index, self.vis_processor = dataset, first_index, vis_processor

    def __len__(self):
        return len(self.first_index)

    def __getitem__(self, row):
        return row, self.dataset.load_image(self.first_index[row], vis_processor=self.vis_processor)


def _collate_rows(items):
    rows = [r for r, image in items if image is not None]
    images = [image for _, image in items if image is not None]
    return rows, (torch.stack(images) if images else None)


def build_feature_cache(
    dataset, encode_fn, path, batch_size=64, vis_processor=None, num_workers=0, dtype=None, overwrite=False
):
    """Encode every unique image of ``dataset`` in order and save the features atomically to ``path``.

    dataset: one of our datasets (needs ``image_key(i)`` and ``load_image(i, vis_processor)``).
    encode_fn: ``images (B,3,H,W) float CPU tensor -> features (B,N,C)``; it moves data to its device.
        Called under ``torch.no_grad()``; outputs are moved to the CPU (and cast to ``dtype`` if given).
    vis_processor: the processor to use (pass the builder's eval processor for a train split, so that
        no augmentation is baked into the cache); None uses the dataset's own.
    Unreadable images are logged, marked invalid and skipped later by :class:`CachedFeatureDataset`.
    Returns ``path``; an existing file is kept unless ``overwrite``. Call it on one rank only.
    """
    if os.path.exists(path) and not overwrite:
        logger.info("Feature cache %s exists; not rebuilding", path)
        return path
    keys = [dataset.image_key(i) for i in range(len(dataset))]
    first_index = {}
    for i, key in enumerate(keys):
        first_index.setdefault(key, i)
    unique = list(first_index)
    row_of = {key: row for row, key in enumerate(unique)}

    loader = DataLoader(
        _UniqueImages(dataset, list(first_index.values()), vis_processor),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_rows,
    )
    features, valid = None, torch.zeros(len(unique), dtype=torch.bool)
    with torch.no_grad():
        for rows, images in loader:
            if images is None:
                continue
            out = encode_fn(images).detach().cpu()  # (B, N, C)
            out = out.to(dtype) if dtype is not None else out
            if features is None:
                features = out.new_zeros((len(unique),) + tuple(out.shape[1:]))  # (M, N, C)
            features[rows] = out
            valid[rows] = True
    if features is None:
        raise RuntimeError(f"no readable image in the dataset: nothing to cache at {path}")

    payload = {
        "format": FORMAT,
        "features": features,
        "valid": valid,
        "keys": unique,
        "index": torch.tensor([row_of[k] for k in keys], dtype=torch.long),
    }
    atomic_save(payload, path)
    logger.info("Cached features of %d images (%d unreadable) to %s", len(unique), int((~valid).sum()), path)
    return path


class CachedFeatureDataset(Dataset):
    """Wraps one of our datasets: sample ``i`` is ``dataset``'s sample ``i`` with "image" replaced by
    "image_embeds" ``(N, C)`` from a cache written by :func:`build_feature_cache`. Images marked
    unreadable in the cache give ``None`` (dropped and counted by the collater). Other attributes
    (``annotation``, ``collater``, ``answer_list``, ...) are the wrapped dataset's.
    """

    def __init__(self, dataset, features_path):
        self.dataset = dataset
        self.features_path = features_path
        cache = torch.load(features_path, map_location="cpu", mmap=True, weights_only=True)
        if cache.get("format") != FORMAT:
            raise ValueError(f"{features_path}: unknown feature cache format {cache.get('format')!r}")
        self.features, self.valid, self.index = cache["features"], cache["valid"], cache["index"]
        keys = cache["keys"]
        stale = len(self.index) != len(dataset) or any(
            keys[row] != dataset.image_key(i) for i, row in enumerate(self.index.tolist())
        )
        if stale:
            raise ValueError(
                f"feature cache {features_path} was built for a different dataset ({len(self.index)} "
                f"entries vs {len(dataset)}, or other images): delete it and rebuild with build_feature_cache"
            )

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        row = int(self.index[index])
        if not self.valid[row]:
            path = self.dataset.image_path(index)
            logger.warning("Skipping %s: it was unreadable when its features were cached", path)
            return None
        return {"image_embeds": self.features[row], **self.dataset.sample_fields(index)}

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (e.g. while unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
