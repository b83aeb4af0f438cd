"""Dataset builders for local files: ``local_caption`` and ``local_vqa``.

They read the same config layout as LAVIS's builders::

    datasets:
      local_caption:
        data_type: images
        build_info:
          annotations:
            train: {storage: path/to/train.json}      # storage may also be a list of files
            val:   {storage: path/to/val.json}
            test:  {storage: path/to/test.json, max_samples: 1000}   # optional: the first N records
          images: {storage: path/to/images/}

but never download anything: LAVIS's base builder fetches ``url`` entries and copies files on rank 0;
ours checks that the files exist and raises :class:`MissingDataError` naming the config key and the
paths tried. A relative storage path is resolved against the current working directory first, then
against LAVIS's ``cache_root`` (``registry.get_path("cache_root")``, where LAVIS itself puts relative
storage paths). Absolute paths and ``~`` work as they are.
"""
import logging
import os

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from evlgen_lavis.common import config_path, registry_once
from evlgen_lavis.datasets.caption import LocalCaptionDataset, LocalCaptionEvalDataset
from evlgen_lavis.datasets.vqa import LocalVQADataset, LocalVQAEvalDataset

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class MissingDataError(FileNotFoundError):
    """A configured annotation file or image directory does not exist (the message names the key)."""


def register_builder(name):
    """``registry_once("builder", name)`` that also records the name on the class (for error messages)."""

    def wrap(cls):
        cls.builder_name = name
        return registry_once("builder", name)(cls)

    return wrap


def resolve_storage(path, key, kind="file"):
    """Absolute path of a configured ``storage`` entry, checked to exist.

    ``kind`` is "file" or "dir". A relative path is tried against the current working directory, then
    LAVIS's cache_root. Raises :class:`MissingDataError` naming ``key`` and every path tried.
    """
    path = os.path.expanduser(str(path))
    if os.path.isabs(path):
        candidates = [path]
    else:
        candidates = [os.path.abspath(path)]
        cache_root = registry.get_path("cache_root")
        if cache_root:
            candidates.append(os.path.join(os.path.expanduser(cache_root), path))
    exists = os.path.isfile if kind == "file" else os.path.isdir
    for candidate in candidates:
        if exists(candidate):
            return candidate
    what = "annotation file" if kind == "file" else "image directory"
    tried = " or ".join(repr(c) for c in candidates)
    raise MissingDataError(
        f"{key}: {what} {path!r} not found (looked for {tried}). Set {key} to an existing "
        f"{'file' if kind == 'file' else 'directory'}: absolute, or relative to the current working "
        "directory or to LAVIS's cache_root. This builder never downloads data."
    )


class LocalBuilderBase(BaseDatasetBuilder):
    """LAVIS builder over local files: no downloads, clear errors, our skip-aware datasets.

    Subclasses set ``train_dataset_cls``, ``eval_dataset_cls`` and ``DATASET_CONFIG_DICT`` and are
    registered with :func:`register_builder`. :meth:`prepare_data` is the hook for builders that
    generate their files (run on rank 0 only, the other ranks wait).
    """

    builder_name = None
    supported_data_types = ("images",)  # video builders: ("videos",); build_info.<data_type>.storage is the media dir

    def _key(self, *parts):
        return ".".join(("datasets", self.builder_name or type(self).__name__) + parts)

    def build_datasets(self):
        """Prepare data (if the builder generates any), then build ``{split: dataset}``."""
        self.prepare_data()
        logger.info("Building datasets for %s...", self.builder_name)
        return self.build()

    def prepare_data(self):
        """Hook: generate annotation files before :meth:`build`. The default does nothing."""

    def _download_data(self):
        """Never download (LAVIS's base builder would fetch ``url`` entries here)."""

    def build(self):
        if self.data_type not in self.supported_data_types:
            expected = " or ".join(repr(t) for t in self.supported_data_types)
            raise ValueError(f"{self._key('data_type')} must be {expected}, got {self.data_type!r}")
        self.build_processors()
        if self.config.get("vis_processor") is None:
            logger.warning(
                "%s is not set: images are returned as PIL images and cannot be batched",
                self._key("vis_processor"),
            )

        build_info = self.config.get("build_info") or {}
        ann_info = build_info.get("annotations") or {}
        splits = [s for s in SPLITS if s in ann_info]
        if not splits:
            raise MissingDataError(
                f"{self._key('build_info', 'annotations')} has no train/val/test entry: set e.g. "
                f"{self._key('build_info', 'annotations', 'train', 'storage')} to an annotation JSON file"
            )
        images_key = self._key("build_info", self.data_type, "storage")
        images_info = build_info.get(self.data_type) or {}
        if images_info.get("storage") is None:
            raise MissingDataError(f"{images_key} is not set: set it to the directory holding the images")
        vis_root = resolve_storage(images_info["storage"], images_key, kind="dir")

        datasets = {}
        for split in splits:
            is_train = split == "train"
            ann_paths = self._annotation_paths(ann_info, split)
            dataset_cls = self.train_dataset_cls if is_train else self.eval_dataset_cls
            datasets[split] = dataset_cls(
                vis_processor=self.vis_processors["train" if is_train else "eval"],
                text_processor=self.text_processors["train" if is_train else "eval"],
                vis_root=vis_root,
                ann_paths=ann_paths,
            )
            max_samples = (ann_info[split] or {}).get("max_samples")
            if max_samples:
                datasets[split].limit(int(max_samples))
        return datasets

    def _annotation_paths(self, ann_info, split):
        key = self._key("build_info", "annotations", split, "storage")
        storage = (ann_info[split] or {}).get("storage")
        if storage is None:
            raise MissingDataError(f"{key} is not set: set it to an annotation JSON file (or a list of them)")
        if isinstance(storage, str):
            return [resolve_storage(storage, key)]
        return [resolve_storage(p, f"{key}[{i}]") for i, p in enumerate(storage)]


@register_builder("local_caption")
class LocalCaptionBuilder(LocalBuilderBase):
    """Image captioning from a local annotation JSON (see :mod:`evlgen_lavis.datasets.caption`)."""

    train_dataset_cls = LocalCaptionDataset
    eval_dataset_cls = LocalCaptionEvalDataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets", "local_caption", "defaults.yaml")}


@register_builder("local_vqa")
class LocalVQABuilder(LocalBuilderBase):
    """VQA from a local annotation JSON (see :mod:`evlgen_lavis.datasets.vqa`)."""

    train_dataset_cls = LocalVQADataset
    eval_dataset_cls = LocalVQAEvalDataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets", "local_vqa", "defaults.yaml")}
