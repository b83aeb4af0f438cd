"""easy-VQA (the ``easy-vqa`` PyPI package: 4,000 train / 1,000 test 64x64 PNGs of one coloured shape)
as captioning and VQA datasets, prepared on first use.

Two builders share one prepared directory:

- ``easy_vqa_caption``: captions "a {colour} {shape}" derived from each image's questions
  (:func:`derive_captions`); images whose colour or shape cannot be derived are left out
  (3,542 of 4,000 train and 880 of 1,000 test images keep one). Datasets as ``local_caption``.
- ``easy_vqa_vqa``: every question with its single answer. Datasets as ``local_vqa``.

Splits: train = easy-VQA train minus the val images; test = easy-VQA test; val = ``val_size`` train
images held out at random (``val_from: train``, seeded by ``val_seed``) or the first ``val_size`` test
images by id (``val_from: test``; ``val_size: null`` = all of them). Both builders hold out the same
images. Images are not copied: ``images.storage`` is the package's own data directory.

Preparation writes JSON under ``<cache_dir>/<tag>/`` (``cache_dir`` defaults to
``evlgen_lavis.common.CACHE_ROOT/easy_vqa``; ``tag`` encodes the version and val settings) into a
temporary directory renamed into place, so readers never see partial files and concurrent preparers do
not clash. Under torch.distributed only rank 0 prepares; the other ranks wait at a barrier.
"""
import collections
import json
import os
import random
import re

import torch.distributed as dist
from lavis.common.dist_utils import is_dist_avail_and_initialized, is_main_process
from omegaconf import OmegaConf

from evlgen_lavis.common import CACHE_ROOT, atomic_dir, config_path
from evlgen_lavis.datasets.builders import LocalBuilderBase, register_builder
from evlgen_lavis.datasets.caption import LocalCaptionDataset, LocalCaptionEvalDataset
from evlgen_lavis.datasets.vqa import LocalVQADataset, LocalVQAEvalDataset

FORMAT_VERSION = 1
COLOURS = frozenset({"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"})
SHAPES = frozenset({"circle", "rectangle", "triangle"})
_NEGATIONS = frozenset({"not", "no"})


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as err:
        raise ImportError(
            "the easy_vqa_* builders need the easy-vqa package: pip install easy-vqa==1.0"
        ) from err
    return easy_vqa


def derive_captions(questions, answers, image_ids):
    """``{image_id: "a {colour} {shape}"}`` for the images whose colour and shape are both known.

    Evidence per question: an open question's answer ("what color is the shape?" -> "blue"); the
    colour/shape words an open question presupposes ("what is the blue shape?" -> blue); and the words a
    yes/no question asserts when its effective answer is yes (answer "yes" without negation, or "no" with
    "not"/"no": "is there not a red shape?" -> "no" means red). An image whose evidence names exactly one
    colour and one shape gets a caption; contradictory evidence (none in easy-VQA 1.0) excludes it.
    """
    colours, shapes = collections.defaultdict(set), collections.defaultdict(set)
    for question, answer, image_id in zip(questions, answers, image_ids):
        words = re.findall(r"[a-z]+", question.lower())
        mentioned = [w for w in words if w in COLOURS or w in SHAPES]
        if answer in ("yes", "no"):
            asserted = mentioned if (answer == "yes") != bool(_NEGATIONS.intersection(words)) else []
        else:
            asserted = mentioned + [answer]
        for word in asserted:
            (colours if word in COLOURS else shapes)[image_id].add(word)
    return {
        i: f"a {next(iter(colours[i]))} {next(iter(shapes[i]))}"
        for i in sorted(set(colours) | set(shapes))
        if len(colours[i]) == 1 and len(shapes[i]) == 1
    }


def images_root():
    """The easy-vqa package's data directory: the ``images.storage`` of both builders."""
    return os.path.join(os.path.dirname(os.path.abspath(_easy_vqa().__file__)), "data")


def _load_split(split):
    """(questions, answers, image_ids, {image_id: path relative to images_root()}) of "train"/"test"."""
    ev = _easy_vqa()
    questions, answers, image_ids = getattr(ev, f"get_{split}_questions")()
    root = images_root()
    paths = {i: os.path.relpath(p, root) for i, p in getattr(ev, f"get_{split}_image_paths")().items()}
    unknown = set(answers) - COLOURS - SHAPES - {"yes", "no"}
    if unknown:
        raise ValueError(f"easy-vqa {split} has answers {sorted(unknown)} this builder does not know")
    return questions, answers, image_ids, paths


def split_tag(val_from, val_size, val_seed):
    return f"v{FORMAT_VERSION}_val-{val_from}-{val_size}-seed{val_seed}"


def _split_image_ids(train_ids, test_ids, val_from, val_size, val_seed):
    """{split: (source, image ids)} with source "train"/"test" (which easy-VQA split the ids are from)."""
    if val_from == "train":
        if not isinstance(val_size, int) or not 0 < val_size < len(train_ids):
            raise ValueError(f"val_size must be an int in [1, {len(train_ids) - 1}] with val_from: train")
        val = sorted(random.Random(val_seed).sample(sorted(train_ids), val_size))
        return {
            "train": ("train", sorted(set(train_ids) - set(val))),
            "val": ("train", val),
            "test": ("test", sorted(test_ids)),
        }
    if val_from == "test":
        test = sorted(test_ids)
        return {
            "train": ("train", sorted(train_ids)),
            "val": ("test", test if val_size is None else test[:val_size]),
            "test": ("test", test),
        }
    raise ValueError(f"val_from must be 'train' or 'test', got {val_from!r}")


def _annotations(sources, ids_by_split):
    """{file name: annotation list} for the caption and VQA variants of every split."""
    files = {}
    for split, (source, ids) in ids_by_split.items():
        questions, answers, image_ids, paths = sources[source]
        captions = derive_captions(questions, answers, image_ids)
        is_train = split == "train"
        files[f"caption_{split}.json"] = [
            {"image": paths[i], "caption": captions[i] if is_train else [captions[i]], "image_id": i}
            for i in ids
            if i in captions
        ]
        keep = set(ids)
        files[f"vqa_{split}.json"] = [
            {"image": paths[i], "question": q, "answer": a, "question_id": qid, "image_id": i}
            for qid, (q, a, i) in enumerate(zip(questions, answers, image_ids))
            if i in keep
        ]
    return files


def prepare_easy_vqa(cache_dir=None, val_from="train", val_size=200, val_seed=0):
    """Write the easy-VQA annotation files (if not there yet) and return their directory.

    The directory holds ``caption_{train,val,test}.json`` and ``vqa_{train,val,test}.json``; image paths
    in them are relative to :func:`images_root`. Safe to call from several processes at once.
    """
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or os.path.join(CACHE_ROOT, "easy_vqa")))
    final = os.path.join(cache_dir, split_tag(val_from, val_size, val_seed))
    if os.path.isdir(final):
        return final
    sources = {s: _load_split(s) for s in ("train", "test")}
    ids_by_split = _split_image_ids(
        set(sources["train"][3]), set(sources["test"][3]), val_from, val_size, val_seed
    )
    def fill(tmp):
        for name, entries in _annotations(sources, ids_by_split).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(entries, f)

    return atomic_dir(final, fill)


class _EasyVQABuilder(LocalBuilderBase):
    """Fills ``build_info.annotations`` and ``build_info.images`` from :func:`prepare_easy_vqa`.

    Config keys under ``build_info``: ``val_from`` ("train"/"test"), ``val_size``, ``val_seed``,
    ``cache_dir`` (null = CACHE_ROOT/easy_vqa), ``splits`` (which of train/val/test to build),
    ``max_samples`` ({split: N}: keep the first N records of a split).
    """

    variant = None  # file prefix: "caption" or "vqa"

    def prepare_data(self):
        info = self.config.build_info
        kwargs = dict(
            cache_dir=info.get("cache_dir"),
            val_from=info.get("val_from", "train"),
            val_size=info.get("val_size", 200),
            val_seed=info.get("val_seed", 0),
        )
        if is_main_process():
            prepare_easy_vqa(**kwargs)
        if is_dist_avail_and_initialized():
            dist.barrier()
        directory = prepare_easy_vqa(**kwargs)  # returns at once: the directory exists now
        splits = list(info.get("splits", ["train", "val", "test"]))
        unknown = [s for s in splits if s not in ("train", "val", "test")]
        if unknown:
            raise ValueError(f"{self._key('build_info', 'splits')} may hold train/val/test, got {unknown}")
        limits = info.get("max_samples") or {}  # {split: N}: evaluate on the first N records only
        annotations = {s: {"storage": os.path.join(directory, f"{self.variant}_{s}.json"),
                           "max_samples": limits.get(s)} for s in splits}
        OmegaConf.update(self.config, "build_info.annotations", annotations, merge=False)
        OmegaConf.update(self.config, "build_info.images", {"storage": images_root()}, merge=False)


@register_builder("easy_vqa_caption")
class EasyVQACaptionBuilder(_EasyVQABuilder):
    """easy-VQA captions ("a blue rectangle"); datasets as ``local_caption``."""

    variant = "caption"
    train_dataset_cls = LocalCaptionDataset
    eval_dataset_cls = LocalCaptionEvalDataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets", "easy_vqa", "defaults_caption.yaml")}


@register_builder("easy_vqa_vqa")
class EasyVQAVQABuilder(_EasyVQABuilder):
    """easy-VQA questions with their single answer; datasets as ``local_vqa``."""

    variant = "vqa"
    train_dataset_cls = LocalVQADataset
    eval_dataset_cls = LocalVQAEvalDataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets", "easy_vqa", "defaults_vqa.yaml")}
