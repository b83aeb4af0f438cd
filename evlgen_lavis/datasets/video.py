"""Video captioning datasets and builders (local files, never downloaded).

Annotation entries (LAVIS's MSR-VTT / MSVD caption format): ``{"video": path relative to the videos
directory, "caption": str or [str], "image_id": optional (default: the video path)}``. Samples carry
``"video"`` (3, T, H, W) from the configured video processor (:mod:`evlgen_lavis.processors.video`).
A video the processor cannot read (:class:`~evlgen_lavis.processors.video.UnreadableVideoError`) gives
``None``: the collater drops it and counts it, as for images (:mod:`.skipping`). With
``run.cache_vision_features`` the frozen encoder's per-frame features replace the clips
(:mod:`.feature_cache`; the model decides whether its encoder is frozen).

Builders (config layout as ``local_caption``, with ``data_type: videos`` and ``build_info.videos.storage``):

- ``local_video_caption``: any local annotation files and videos directory;
- ``evlgen_msrvtt_caption`` / ``evlgen_msvd_caption``: MSR-VTT / MSVD with LAVIS's file layout as defaults
  (``msrvtt/annotations/cap_{train,val,test}.json`` and ``msrvtt/videos``, relative to the working
  directory or LAVIS's cache_root), so data prepared for LAVIS's ``msrvtt_caption`` / ``msvd_caption``
  works as is. Unlike those, they never download, skip and count unreadable videos, and fill
  ``image_id`` for the offline caption metrics;
- ``motion_shapes_caption``: the synthetic clips of :mod:`.motion_clips`, generated on first use.
"""
import logging
import os

import torch.distributed as dist
from lavis.common.dist_utils import is_dist_avail_and_initialized, is_main_process
from omegaconf import OmegaConf

from evlgen_lavis.common import config_path
from evlgen_lavis.datasets.base import as_list
from evlgen_lavis.datasets.builders import LocalBuilderBase, register_builder
from evlgen_lavis.datasets.caption import LocalCaptionDataset, LocalCaptionEvalDataset
from evlgen_lavis.datasets.motion_clips import prepare_motion_clips
from evlgen_lavis.processors.video import UnreadableVideoError

logger = logging.getLogger(__name__)


def video_id_of(ann):
    return ann.get("image_id", ann["video"])


class _VideoLoading:
    """Replaces image loading by video loading in our local datasets: ``image_key`` is the annotation's
    "video" path and samples carry "video" instead of "image"."""

    def image_key(self, index):
        return self.annotation[index]["video"]

    def load_image(self, index, vis_processor=None):
        """The processed clip of ``index`` (3, T, H, W), or ``None`` when the video is unreadable (logged)."""
        path = self.image_path(index)
        try:
            return (vis_processor or self.vis_processor)(path)
        except UnreadableVideoError as err:
            logger.warning("Skipping unreadable video %s (%s)", path, err)
            return None

    def __getitem__(self, index):
        video = self.load_image(index)
        if video is None:
            return None
        return {"video": video, **self.sample_fields(index)}


class LocalVideoCaptionDataset(_VideoLoading, LocalCaptionDataset):
    """Train split: one sample per (video, caption) pair: ``{"video", "text_input", "image_id",
    "instance_id"}``."""

    required_keys = ("video", "caption")

    def prepare_annotation(self, annotation):
        flat = []
        for ann in annotation:
            for caption in as_list(ann["caption"]):
                if not isinstance(caption, str):
                    raise ValueError(f"caption of {ann['video']!r} must be a string, got {caption!r}")
                flat.append({**ann, "caption": caption, "image_id": video_id_of(ann)})
        return flat

    def sample_fields(self, index):
        ann = self.annotation[index]
        return {"text_input": self.text_processor(ann["caption"]), "image_id": ann["image_id"],
                "instance_id": ann["instance_id"]}


class LocalVideoCaptionEvalDataset(_VideoLoading, LocalCaptionEvalDataset):
    """Val/test splits: one sample per video id, ``{"video", "image_id", "instance_id"}``; ``annotation``
    holds one ``{"video", "image_id", "caption": [references]}`` per video (the metrics' ground truth)."""

    required_keys = ("video",)

    def prepare_annotation(self, annotation):
        grouped = {}
        for ann in annotation:
            video_id = video_id_of(ann)
            entry = grouped.get(video_id)
            if entry is None:
                extra = {k: v for k, v in ann.items() if k not in ("video", "image_id", "caption")}
                entry = grouped[video_id] = {**extra, "video": ann["video"], "image_id": video_id, "caption": []}
            elif entry["video"] != ann["video"]:
                raise ValueError(f"image_id {video_id!r} names two different videos, {entry['video']!r} and "
                                 f"{ann['video']!r}, in {self.ann_paths}: ids must be unique per video")
            if "caption" in ann:
                entry["caption"].extend(as_list(ann["caption"]))
        return list(grouped.values())


class VideoBuilderBase(LocalBuilderBase):
    """``data_type: videos``; ``build_info.splits`` (optional) limits the splits built, e.g. ``[test]`` in an
    evaluation config whose defaults also name train and val files."""

    supported_data_types = ("videos",)
    train_dataset_cls = LocalVideoCaptionDataset
    eval_dataset_cls = LocalVideoCaptionEvalDataset

    def build(self):
        info = self.config.get("build_info") or {}
        splits = info.get("splits", None)
        annotations = info.get("annotations", None)
        if splits is not None and annotations is not None:
            keep = {s: annotations[s] for s in splits if s in annotations}
            OmegaConf.update(self.config, "build_info.annotations", keep, merge=False)
        return super().build()


@register_builder("local_video_caption")
class LocalVideoCaptionBuilder(VideoBuilderBase):
    """Video captioning from local annotation JSON files and a videos directory."""

    DATASET_CONFIG_DICT = {"default": config_path("datasets", "video_local", "defaults.yaml")}


@register_builder("evlgen_msrvtt_caption")
class MSRVTTCaptionBuilder(VideoBuilderBase):
    """MSR-VTT captions in LAVIS's layout (see the module docstring)."""

    DATASET_CONFIG_DICT = {"default": config_path("datasets", "video_msrvtt", "defaults_cap.yaml")}


@register_builder("evlgen_msvd_caption")
class MSVDCaptionBuilder(VideoBuilderBase):
    """MSVD captions in LAVIS's layout (see the module docstring)."""

    DATASET_CONFIG_DICT = {"default": config_path("datasets", "video_msvd", "defaults_cap.yaml")}


@register_builder("motion_shapes_caption")
class MotionShapesCaptionBuilder(VideoBuilderBase):
    """Synthetic moving-shape clips (:mod:`.motion_clips`), generated once under the cache.

    ``build_info`` keys: ``n_train``, ``n_val``, ``n_test``, ``n_frames`` (frames per file), ``size``
    (pixels), ``seed``, ``cache_dir`` (null: CACHE_ROOT/motion_shapes), ``splits``.
    """

    DATASET_CONFIG_DICT = {"default": config_path("datasets", "video_motion_shapes", "defaults.yaml")}

    def prepare_data(self):
        info = self.config.build_info
        kwargs = {k: info.get(k) for k in ("n_train", "n_val", "n_test", "n_frames", "size", "seed")
                  if info.get(k) is not None}
        kwargs["cache_dir"] = info.get("cache_dir", None)
        if is_main_process():
            prepare_motion_clips(**kwargs)
        if is_dist_avail_and_initialized():
            dist.barrier()
        directory = prepare_motion_clips(**kwargs)  # returns at once: the directory exists now
        splits = list(info.get("splits", ["train", "val", "test"]))
        annotations = {s: {"storage": os.path.join(directory, f"caption_{s}.json")} for s in splits}
        OmegaConf.update(self.config, "build_info.annotations", annotations, merge=False)
        OmegaConf.update(self.config, "build_info.videos", {"storage": os.path.join(directory, "videos")},
                         merge=False)
