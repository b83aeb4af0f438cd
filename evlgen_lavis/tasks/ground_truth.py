"""Ground truth for evaluation, read from the datasets' own annotations (no downloads).

Annotations are LAVIS-style lists of dicts. Captions: ``{"image": relpath, "caption": str or [str],
"image_id": optional}`` with ``image_id = ann.get("image_id", ann["image"])`` (the rule the
``local_caption`` builder uses). VQA: ``{"question_id", "question", "answer": str or [str]}`` (also
accepted: ``"answers"``, as strings or VQAv2 ``{"answer": ...}`` dicts).
"""
import json
import logging
import os

import torch
from lavis.common.registry import registry


def to_python_id(value):
    """An id from a collated batch as a JSON-serialisable Python value: a tensor or numpy scalar
    becomes its ``.item()``; strings and ints are kept as they are (never forced to int)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()  # numpy scalar
    return value


def resolve_path(path):
    """An annotation path as LAVIS's builders resolve it: absolute, else under registry's
    ``cache_root``; a relative path that exists from the working directory is also accepted."""
    path = os.path.expanduser(str(path))
    if os.path.isabs(path):
        return path
    cache_root = registry.get_path("cache_root")
    candidates = ([os.path.join(os.path.expanduser(cache_root), path)] if cache_root else []) + [
        os.path.abspath(path)]
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    return candidates[0]


def load_annotation_files(paths, where=""):
    """Concatenate the entries of LAVIS-style annotation JSON files (lists of dicts). Files holding
    something else (an answer list, a VQAv2 questions/annotations dict) are skipped."""
    entries = []
    for path in paths:
        full = resolve_path(path)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"annotation file {full} (from {where or 'the dataset config'}) "
                                    "does not exist; fix the path or build the annotations first")
        with open(full) as f:
            data = json.load(f)
        if isinstance(data, list) and all(isinstance(d, dict) for d in data):
            entries.extend(data)
        else:
            logging.info("%s is not a list of annotation dicts; not used as ground truth", full)
    return entries


def dataset_annotations(dataset):
    """The ``annotation`` list of a LAVIS dataset (also inside a ConcatDataset), or None."""
    if dataset is None:
        return None
    if isinstance(getattr(dataset, "annotation", None), list):
        return dataset.annotation
    parts = getattr(dataset, "datasets", None)
    if parts:
        found = [dataset_annotations(d) for d in parts]
        if all(a is not None for a in found):
            return [ann for a in found for ann in a]
    return None


def caption_references(annotations):
    """``{image_id: [caption, ...]}``: captions of every entry grouped by
    ``ann.get("image_id", ann["image"])`` (one entry per caption or a list per entry both work)."""
    refs = {}
    for ann in annotations:
        if "caption" not in ann:
            raise KeyError(f"annotation entry without 'caption': {ann!r}; a split without captions "
                           "(e.g. a test server split) cannot be scored: set run.report_metric: false")
        if "image_id" not in ann and "image" not in ann:
            raise KeyError(f"annotation entry without 'image_id' or 'image': {ann!r}")
        img_id = ann.get("image_id", ann.get("image"))
        caps = ann["caption"] if isinstance(ann["caption"], (list, tuple)) else [ann["caption"]]
        refs.setdefault(img_id, []).extend(str(c) for c in caps)
    return refs


def vqa_references(annotations):
    """``{question_id: answer or [answers]}`` from VQA annotation entries."""
    refs = {}
    for ann in annotations:
        answer = ann.get("answer", ann.get("answers"))
        if "question_id" not in ann or answer is None:
            raise KeyError(f"VQA annotation entry needs 'question_id' and 'answer' (or 'answers'): "
                           f"{ann!r}; a split without answers cannot be scored: set run.report_metric: false")
        if isinstance(answer, (list, tuple)):
            answer = [a["answer"] if isinstance(a, dict) else str(a) for a in answer]
        refs[ann["question_id"]] = answer
    return refs


def _get(node, key):
    return node.get(key) if node is not None and hasattr(node, "get") else None


class AnnotationSources:
    """Where a task finds the annotations of an evaluation split, in this order:

    1. the datasets handed to :meth:`add_datasets` (the task's ``build_datasets``) for that split;
    2. the dataset last passed to the task's ``before_evaluation`` (LAVIS calls it right before
       evaluating a split, with that split's dataset);
    3. the files named in the dataset config, ``build_info.annotations.<split>.storage``.
    """

    def __init__(self, datasets_cfg=None):
        self.datasets_cfg = datasets_cfg
        self.by_split = {}
        self.current = None

    def add_datasets(self, datasets):
        """``datasets``: ``{name: {split: Dataset}}`` as returned by ``BaseTask.build_datasets``."""
        for splits in datasets.values():
            for split, dataset in splits.items():
                self.by_split.setdefault(split, []).append(dataset)

    def split_configs(self, split):
        """``[(dataset_name, build_info.annotations.<split>)]`` from the dataset config."""
        out = []
        for name in (self.datasets_cfg or {}):
            split_cfg = _get(_get(_get(self.datasets_cfg[name], "build_info"), "annotations"), split)
            if split_cfg is not None:
                out.append((name, split_cfg))
        return out

    def annotations(self, split):
        """The annotation entries of ``split``; raises with what was tried when there are none."""
        for datasets in (self.by_split.get(split, []), [self.current]):
            found = [dataset_annotations(d) for d in datasets if d is not None]
            if found and all(a is not None for a in found):
                return [ann for a in found for ann in a]
        entries = []
        configs = self.split_configs(split)
        for name, split_cfg in configs:
            storage = _get(split_cfg, "storage")
            paths = [storage] if isinstance(storage, str) else list(storage or [])
            key = f"datasets.{name}.build_info.annotations.{split}.storage"
            entries.extend(load_annotation_files(paths, where=key))
        if not configs or not entries:
            raise RuntimeError(
                f"no ground truth for split '{split}': no dataset with an `annotation` list was built "
                f"for it, and no annotation file is configured under "
                f"datasets.<name>.build_info.annotations.{split}.storage")
        return entries
