"""``run.cache_vision_features: true``: replace images by precomputed frozen-encoder features.

The vision encoder is frozen, so its output for an image is fixed once the image processing is
deterministic. Before training, every split of every dataset is encoded once with
``model.encode_image`` and replaced by a :class:`~evlgen_lavis.datasets.CachedFeatureDataset`; the
training steps then skip the vision forward pass entirely.

All splits, the train split included, are encoded with the dataset's *eval* processor
(``datasets.<name>.vis_processor.eval``), whose class must declare ``deterministic = True``. So with
caching on, training sees no random augmentation (a warning says so). Without an eval processor, or
with a non-deterministic one, the run stops with an error naming the key.

Cache files: ``<run.feature_cache_dir or CACHE_ROOT/features>/<dataset>_<split>_<key>.pt``, where the
key hashes ``model.vision_cache_key()``, the dataset class, the annotation files (path, size, mtime),
the image directory and the processor config: change any of them and a new cache is built. Rank 0
builds missing caches while the other ranks wait; then every rank loads them (memory-mapped).

Run config keys: ``cache_vision_features`` (false), ``feature_cache_dir`` (CACHE_ROOT/features),
``feature_cache_batch_size`` (run.batch_size_eval).
"""
import hashlib
import json
import logging
import os

from lavis.common.registry import registry
from omegaconf import OmegaConf

from evlgen_lavis.common import CACHE_ROOT
from evlgen_lavis.datasets import CachedFeatureDataset, build_feature_cache
from evlgen_lavis.runners.distributed import barrier, run_on_main

logger = logging.getLogger(__name__)


def _container(cfg):
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def eval_processor(name, dataset_cfg):
    """Build ``datasets.<name>.vis_processor.eval`` and check it is deterministic; returns
    ``(processor, its config as a dict)``."""
    key = f"datasets.{name}.vis_processor.eval"
    proc_cfg = (dataset_cfg.get("vis_processor", None) or {}).get("eval", None)
    if proc_cfg is None or not proc_cfg.get("name", None):
        raise ValueError(f"run.cache_vision_features needs {key} (a deterministic eval processor); it is not set")
    cls = registry.get_processor_class(proc_cfg.name)
    if cls is None:
        raise ValueError(f"{key}.name={proc_cfg.name!r} is not a registered processor")
    if getattr(cls, "deterministic", False) is not True:
        raise ValueError(
            f"run.cache_vision_features: {key}.name={proc_cfg.name!r} does not declare `deterministic = True`, "
            "so its output cannot be cached; use a deterministic processor (e.g. evlgen_image_eval) or set "
            "run.cache_vision_features=false"
        )
    return cls.from_config(proc_cfg), _container(proc_cfg)


def cache_key(model, dataset, proc_cfg):
    """Hex digest identifying the features of ``dataset`` under ``model``'s encoder and ``proc_cfg``."""
    files = []
    for path in getattr(dataset, "ann_paths", []):
        st = os.stat(path)
        files.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    ident = {
        "vision": model.vision_cache_key(),
        "dataset": type(dataset).__qualname__,
        "annotations": files,
        "vis_root": os.path.abspath(str(getattr(dataset, "vis_root", ""))),
        "processor": proc_cfg,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_cacheable(name, split, dataset):
    for attr in ("image_key", "load_image", "sample_fields"):
        if not hasattr(dataset, attr):
            raise TypeError(
                f"run.cache_vision_features: dataset {name!r} split {split!r} ({type(dataset).__name__}) has no "
                f"{attr}(); only EVLGen's local datasets (local_caption, local_vqa, easy_vqa_*) can be cached"
            )


def cache_vision_features(datasets, model, cfg):
    """Replace every ``datasets[name][split]`` by its cached-feature version (see module docstring).

    ``model`` must already be on its device. Every rank must call this. Returns ``datasets``.
    """
    run = cfg.run_cfg
    cache_dir = os.path.expanduser(str(run.get("feature_cache_dir", None) or os.path.join(CACHE_ROOT, "features")))
    batch_size = int(run.get("feature_cache_batch_size", None) or run.get("batch_size_eval", 64))
    num_workers = int(run.get("num_workers", 0))
    for name, splits in datasets.items():
        processor, proc_cfg = eval_processor(name, cfg.datasets_cfg[name])
        for split, dataset in list(splits.items()):
            _check_cacheable(name, split, dataset)
            path = os.path.join(cache_dir, f"{name}_{split}_{cache_key(model, dataset, proc_cfg)}.pt")
            if split in run.get("train_splits", []):
                logger.warning("Caching %s/%s with the eval processor: training sees no image augmentation",
                               name, split)

            def build(dataset=dataset, path=path):
                if not os.path.exists(path):
                    logger.info("Encoding %d samples of %s/%s into %s", len(dataset), name, split, path)
                return build_feature_cache(dataset, model.encode_image, path, batch_size=batch_size,
                                           vis_processor=processor, num_workers=num_workers)

            run_on_main(build, f"caching vision features of {name}/{split}")
            barrier()
            splits[split] = CachedFeatureDataset(dataset, path)
            logger.info("%s/%s: using cached vision features %s", name, split, path)
    return datasets
