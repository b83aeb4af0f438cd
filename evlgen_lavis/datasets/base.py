"""The base of our local image datasets: annotation loading with validation, image loading that skips
unreadable files, and a skip-aware collater.

Subclasses implement :meth:`LocalImageDataset.sample_fields` (every field of a sample except the image),
so that :class:`evlgen_lavis.datasets.feature_cache.CachedFeatureDataset` can build samples without
opening images.
"""
import json
import os

from lavis.datasets.datasets.base_dataset import BaseDataset
from torch.utils.data.dataloader import default_collate

from evlgen_lavis.datasets.skipping import open_image, skip_collate


def load_annotations(ann_paths, required=("image",)):
    """Concatenate the JSON lists in ``ann_paths``; check every entry is an object with ``required`` keys.

    Errors name the file and the entry index.
    """
    annotation = []
    for path in ann_paths:
        try:
            with open(path, "r", encoding="utf-8") as f:
                entries = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"annotation file {path} is not valid JSON: {err}") from err
        if not isinstance(entries, list):
            raise ValueError(
                f"annotation file {path} must hold a JSON list of objects, got {type(entries).__name__}"
            )
        for i, ann in enumerate(entries):
            missing = [k for k in required if not isinstance(ann, dict) or k not in ann]
            if missing:
                raise ValueError(
                    f"annotation file {path}, entry {i}: missing key(s) {missing} "
                    f"(each entry must be an object with keys {list(required)}); got {ann!r:.200}"
                )
        annotation.extend(entries)
    return annotation


def image_id_of(ann):
    """The image id rule shared with the evaluation tasks: ``ann.get("image_id", ann["image"])``."""
    return ann.get("image_id", ann["image"])


def as_list(value):
    """``"a"`` -> ``["a"]``; a list stays a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


class LocalImageDataset(BaseDataset):
    """Map-style dataset over ``self.annotation`` (a list of dicts with an "image" path relative to
    ``vis_root``). Same constructor as LAVIS's datasets: ``(vis_processor, text_processor, vis_root,
    ann_paths)``.

    ``__getitem__`` returns ``None`` for an unreadable image (see :mod:`evlgen_lavis.datasets.skipping`);
    :meth:`collater` drops those and reports ``n_skipped``.
    """

    required_keys = ("image",)
    allow_truncated = False  # set True to keep LAVIS's grey padding of truncated images

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths):
        # BaseDataset.__init__ is not called: it reads JSON without validation; we set the same fields.
        self.vis_root = vis_root
        self.ann_paths = list(ann_paths)
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.annotation = self.prepare_annotation(load_annotations(self.ann_paths, self.required_keys))
        self._add_instance_ids()

    def limit(self, max_samples):
        """Keep only the first ``max_samples`` records (``build_info.annotations.<split>.max_samples``):
        for quick evaluations on a fixed subset. The evaluation tasks read ``annotation``, so the ground
        truth shrinks with it."""
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.annotation = self.annotation[: int(max_samples)]
        return self

    def prepare_annotation(self, annotation):
        """Hook to normalise/regroup the loaded annotation; returns the list stored as ``annotation``."""
        return annotation

    def image_key(self, index):
        """The annotation's image path (relative to ``vis_root``): identifies the image of ``index``."""
        return self.annotation[index]["image"]

    def image_path(self, index):
        return os.path.join(self.vis_root, self.image_key(index))

    def load_image(self, index, vis_processor=None):
        """The processed image of ``index``, or ``None`` when the file is unreadable (logged).

        Errors raised by the processor itself are bugs and propagate.
        """
        image = open_image(self.image_path(index), allow_truncated=self.allow_truncated)
        if image is None:
            return None
        return (vis_processor or self.vis_processor)(image)

    def sample_fields(self, index):
        """Every field of sample ``index`` except "image"."""
        raise NotImplementedError

    def __getitem__(self, index):
        image = self.load_image(index)
        if image is None:
            return None
        return {"image": image, **self.sample_fields(index)}

    def collate(self, samples):
        """Collate readable samples (no ``None``); subclasses override for custom layouts."""
        return default_collate(samples)

    def collater(self, samples):
        return skip_collate(samples, self.collate)
