"""EVLGen's LAVIS tasks, registered on import: ``evlgen_captioning``, ``evlgen_vqa``, ``evlgen_pretrain``.

They evaluate offline against the datasets' own annotation files; the metric functions they use are
plain functions (:func:`compute_caption_metrics`, :func:`vqa_accuracy`, ...) for tests and benchmarks.
"""
from evlgen_lavis.tasks.caption_metrics import compute_caption_metrics, normalize_caption
from evlgen_lavis.tasks.captioning import EvlgenCaptionTask
from evlgen_lavis.tasks.pretrain import EvlgenPretrainTask
from evlgen_lavis.tasks.vqa import EvlgenVQATask
from evlgen_lavis.tasks.vqa_metrics import (
    compute_vqa_accuracy,
    normalize_answer,
    official_vqa_accuracy,
    vqa_accuracy,
)

__all__ = [
    "EvlgenCaptionTask",
    "EvlgenPretrainTask",
    "EvlgenVQATask",
    "compute_caption_metrics",
    "compute_vqa_accuracy",
    "normalize_answer",
    "normalize_caption",
    "official_vqa_accuracy",
    "vqa_accuracy",
]
