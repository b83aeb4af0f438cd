"""Builders for EVLGen's pretraining corpora that LAVIS 1.0.2 lacks: ``laion115M`` and ``ccs14M``.

Both are BLIP's CapFilt data as the EVLGen authors used it: LAION-115M, and CC3M+CC12M+SBU ("ccs14M"),
stored as local webdataset tar shards whose samples hold an image (``jpg``/``jpeg``/``png``/``webp``)
and a caption (``json`` with a ``"caption"`` field, or ``txt``). ``ccs14M`` may instead be a LAVIS-style
annotation JSON list of ``{"image": path relative to the images root, "caption": str}``. Config
(``datasets.<name>.build_info``; defaults in ``configs/datasets/laion/`` and ``configs/datasets/ccs/``)::

    laion115M:
      build_info:
        storage: /data/laion115m/{00000..10488}.tar   # brace-expanded; a list of patterns also works
        resample: true              # endless stream, shards drawn at random per rank and worker (as
                                    # LAVIS's laion2B_multi); false: one pass, shards split over ranks/workers
        shuffle_buffer: 1000        # samples held for shuffling (0: none)
        allow_missing_shards: false # true: warn about missing shards and read the others
        caption_key: caption        # field of the json member holding the caption
    ccs14M:
      build_info:
        format: webdataset          # webdataset (keys as laion115M) | json (keys below)
        annotations: {train: {storage: /data/ccs14m/ccs_filtered.json}}   # format: json only
        images: {storage: /data/ccs14m/images/}                          # format: json only

Nothing is downloaded: remote URLs are refused, and a missing path raises
:class:`~evlgen_lavis.datasets.builders.MissingDataError` naming the config key. Relative paths resolve
against the working directory, then LAVIS's ``cache_root`` (as for ``local_caption``).

Unreadable samples (corrupt or truncated image, missing or empty caption, unreadable tar member) are
skipped with a logged warning and counted, see :class:`WebImageTextDataset`.
"""
import io
import json
import logging

import webdataset as wds
from webdataset.shardlists import expand_urls

from evlgen_lavis.common import config_path
from evlgen_lavis.datasets.builders import LocalBuilderBase, MissingDataError, register_builder, resolve_storage
from evlgen_lavis.datasets.caption import LocalCaptionDataset, LocalCaptionEvalDataset
from evlgen_lavis.datasets.skipping import open_image, skip_collate

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SKIP_KEY = "n_skipped_before"  # per-sample count of samples dropped just before it (see the collater)
_MAX_LISTED = 5


def shard_paths(storage, key, allow_missing=False):
    """Absolute paths of the local shards named by ``storage`` (a brace pattern such as
    ``dir/{00000..00099}.tar``, several joined by ``::``, or a list of such patterns).

    Raises :class:`MissingDataError` naming ``key`` when ``storage`` is unset, names a remote URL, or a
    shard does not exist (with ``allow_missing`` only when no shard exists; the others are warned about).
    """
    if storage is None or storage == "" or storage == []:
        raise MissingDataError(f"{key} is not set: set it to the local tar shards, "
                               "e.g. /data/shards/{00000..00099}.tar")
    patterns = [storage] if isinstance(storage, str) else [str(p) for p in storage]
    expanded = [path for pattern in patterns for path in expand_urls(str(pattern))]
    remote = [p for p in expanded if "://" in p or p.startswith("pipe:")]
    if remote:
        raise MissingDataError(
            f"{key}: {remote[0]!r} is not a local file. This builder never downloads: fetch the shards "
            "first (e.g. with img2dataset) and set the key to their local path pattern"
        )
    found, missing = [], []
    for path in expanded:
        try:
            found.append(resolve_storage(path, key, kind="file"))
        except MissingDataError:
            missing.append(path)
    if missing:
        listed = ", ".join(repr(p) for p in missing[:_MAX_LISTED]) + (" ..." if len(missing) > _MAX_LISTED else "")
        summary = f"{key}: {len(missing)} of {len(expanded)} shard(s) of {storage!r} not found ({listed})"
        if not found:
            raise MissingDataError(
                f"{summary}. Set {key} to existing local shards: absolute, or relative to the working "
                "directory or to LAVIS's cache_root. This builder never downloads data."
            )
        if not allow_missing:
            raise MissingDataError(
                f"{summary}. Fix the pattern, or set {key.rsplit('.', 1)[0]}.allow_missing_shards: true "
                "to train on the shards that exist"
            )
        logger.warning("%s; reading the %d that exist (allow_missing_shards)", summary, len(found))
    return found


class SkipTally:
    """Counts samples dropped in this process. ``total`` is the count so far; :meth:`take` returns the
    count not yet attached to a sample and resets it. Calling the tally is webdataset's handler protocol
    (as ``wds.warn_and_continue``, without its 0.5 s sleep): log, count, return True to continue."""

    def __init__(self):
        self.total = 0
        self.pending = 0

    def add(self, n=1):
        self.total += n
        self.pending += n

    def take(self):
        pending, self.pending = self.pending, 0
        return pending

    def __call__(self, exn):
        logger.warning("Skipping unreadable webdataset data (%s: %s)", type(exn).__name__, exn)
        self.add()
        return True


class _NamedBytes(io.BytesIO):
    """In-memory image file whose ``str()``/``repr()`` name its shard and sample (for skip warnings)."""

    def __init__(self, data, label):
        super().__init__(data)
        self._label = label

    def __str__(self):
        return self._label

    __repr__ = __str__


class WebImageTextDataset(wds.DataPipeline):
    """Image-caption pairs from local webdataset shards: ``{"image": vis_processor(image),
    "text_input": text_processor(caption)}``.

    A ``wds.DataPipeline`` (so LAVIS's ``concat_datasets`` and runners treat it as a web dataset), with
    LAVIS's laion2B_multi stages: shards (resampled, or one pass split over ranks and workers), tar
    members grouped into samples, a shuffle buffer, then decoding in :meth:`to_sample`. The caption is
    the json member's ``caption_key`` field, else the ``txt`` member.

    Skipping and counting: an undecodable image (images are opened with
    :func:`evlgen_lavis.datasets.skipping.open_image`, truncated files included), a missing or empty
    caption, or a tar read error drops the sample with a warning and counts it in ``self.skips`` (of the
    process that iterates: each DataLoader worker has its own). So the count reaches the main process,
    each yielded sample carries ``"n_skipped_before"``: the samples dropped just before it in its
    process. :meth:`collater` turns these into the batch's ``n_skipped`` (a 0-d long tensor, the
    contract of :mod:`evlgen_lavis.datasets.skipping`); with torch's default collate the key stays a
    (B,) tensor that models ignore. Samples dropped after the last yielded one of a finite pass
    (``resample=False``) reach no batch; ``self.skips`` still counts them. Exceptions raised by the
    processors are bugs and propagate.
    """

    def __init__(self, shards, vis_processor, text_processor=None, resample=True, shuffle_buffer=1000,
                 caption_key="caption"):
        if not shards:
            raise ValueError("WebImageTextDataset needs at least one shard")
        self.shards = list(shards)
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.caption_key = caption_key
        self.skips = SkipTally()
        if resample:
            stages = [wds.ResampledShards(self.shards)]
        else:
            stages = [wds.SimpleShardList(self.shards), wds.split_by_node, wds.split_by_worker]
        stages.append(wds.tarfile_to_samples(handler=self.skips))
        if shuffle_buffer and int(shuffle_buffer) > 0:
            stages.append(wds.shuffle(int(shuffle_buffer)))
        stages.append(wds.map(self.to_sample))
        super().__init__(*stages)

    @property
    def n_skipped(self):
        """Samples skipped so far by this process's iterators."""
        return self.skips.total

    def _skip(self, name, reason):
        logger.warning("Skipping webdataset sample %s: %s", name, reason)
        self.skips.add()
        return None

    def caption_of(self, raw, name):
        """The caption of a raw sample: the json member's ``caption_key`` field, else the txt member;
        None (the sample is skipped, with the reason logged) when neither gives a non-empty string."""
        problems = []
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (ValueError, UnicodeDecodeError) as err:
                meta = None
                problems.append(f"json member is not valid JSON ({err})")
            caption = meta.get(self.caption_key) if isinstance(meta, dict) else None
            if isinstance(caption, str) and caption.strip():
                return caption
        if "txt" in raw:
            try:
                caption = raw["txt"].decode("utf-8")
            except UnicodeDecodeError as err:
                caption = ""
                problems.append(f"txt member is not UTF-8 ({err})")
            if caption.strip():
                return caption
        problems.append(f"no caption: needs a json member with a non-empty {self.caption_key!r} field "
                        "or a non-empty txt member")
        return self._skip(name, "; ".join(problems))

    def to_sample(self, raw):
        """Decode one raw webdataset sample (dict of member bytes) into a training sample, or None."""
        name = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            members = sorted(k for k in raw if not k.startswith("__"))
            return self._skip(name, f"no image member (expected one of {list(IMAGE_EXTENSIONS)}, has {members})")
        caption = self.caption_of(raw, name)
        if caption is None:
            return None
        image = open_image(_NamedBytes(raw[ext], f"{name}.{ext}"))  # logs a warning when unreadable
        if image is None:
            self.skips.add()
            return None
        text = self.text_processor(caption) if self.text_processor is not None else caption.strip()
        return {"image": self.vis_processor(image), "text_input": text, SKIP_KEY: self.skips.take()}

    def collater(self, samples):
        """Collate like :func:`~evlgen_lavis.datasets.skipping.skip_collate`, with ``n_skipped`` also
        counting the samples the pipeline dropped before these."""
        before, clean = 0, []
        for sample in samples:
            if sample is not None:
                sample = dict(sample)
                before += int(sample.pop(SKIP_KEY, 0))
            clean.append(sample)
        batch = skip_collate(clean)
        batch["n_skipped"] = batch["n_skipped"] + before
        return batch


class WebDatasetBuilderBase(LocalBuilderBase):
    """Builds the train split of a pretraining corpus from ``build_info`` (see the module docstring).
    ``FORMATS`` lists the accepted ``build_info.format`` values, the first being the default."""

    FORMATS = ("webdataset",)

    def data_format(self):
        build_info = self.config.get("build_info") or {}
        fmt = str(build_info.get("format", None) or self.FORMATS[0]).lower()
        if fmt not in self.FORMATS:
            raise ValueError(f"{self._key('build_info', 'format')}={fmt!r} is not one of {list(self.FORMATS)}")
        return fmt

    def build(self):
        self.data_format()
        return {"train": self.build_webdataset()}

    def build_webdataset(self):
        """The train split as a :class:`WebImageTextDataset` over ``build_info.storage``."""
        if self.data_type != "images":
            raise ValueError(f"{self._key('data_type')} must be 'images', got {self.data_type!r}")
        vis_cfg = self.config.get("vis_processor") or {}
        if vis_cfg.get("train") is None:
            raise ValueError(f"{self._key('vis_processor', 'train')} is not set: web datasets need an image "
                             "processor that returns tensors, e.g. {name: evlgen_image_train, image_size: 224}")
        self.build_processors()
        build_info = self.config.get("build_info") or {}
        shards = shard_paths(build_info.get("storage", None), self._key("build_info", "storage"),
                             allow_missing=bool(build_info.get("allow_missing_shards", False)))
        logger.info("%s: %d shard(s)", self.builder_name, len(shards))
        return WebImageTextDataset(
            shards,
            vis_processor=self.vis_processors["train"],
            text_processor=self.text_processors.get("train"),
            resample=bool(build_info.get("resample", True)),
            shuffle_buffer=int(build_info.get("shuffle_buffer", 1000)),
            caption_key=str(build_info.get("caption_key", "caption")),
        )


@register_builder("laion115M")
class Laion115MBuilder(WebDatasetBuilderBase):
    """BLIP CapFilt LAION-115M as local webdataset shards (train split only)."""

    DATASET_CONFIG_DICT = {"default": config_path("datasets", "laion", "defaults_115M.yaml")}


@register_builder("ccs14M")
class CCS14MBuilder(WebDatasetBuilderBase):
    """BLIP CapFilt CC3M+CC12M+SBU (train split only): webdataset shards (``build_info.format:
    webdataset``, the default) or an annotation JSON with an images root (``format: json``, read by
    :class:`~evlgen_lavis.datasets.caption.LocalCaptionDataset`, which skips unreadable images)."""

    FORMATS = ("webdataset", "json")
    train_dataset_cls = LocalCaptionDataset
    eval_dataset_cls = LocalCaptionEvalDataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets", "ccs", "defaults_14M.yaml")}

    def build(self):
        if self.data_format() == "json":
            return LocalBuilderBase.build(self)
        return {"train": self.build_webdataset()}
