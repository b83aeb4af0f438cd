"""``evlgen_captioning``: caption generation scored offline against the dataset's own annotations.

LAVIS's ``captioning`` task downloads the COCO Karpathy ground truth and runs ``COCOEvalCap``, whose
SPICE downloads Stanford CoreNLP: both fail offline and neither works for other datasets. This task
keeps LAVIS's interface (``valid_step`` -> ``after_evaluation``, results JSON in ``result_dir``,
``evaluate.txt`` in ``output_dir``) and scores with :func:`compute_caption_metrics`.

Run config keys (``run:``): ``num_beams`` (5), ``max_len`` (30), ``min_len`` (1), ``evaluate``,
``report_metric`` (true), ``caption_metrics`` (list, default bleu/meteor/rouge/cider/exact_match),
``spice`` (false).
"""
from lavis.common.dist_utils import is_main_process
from lavis.tasks.captioning import CaptionTask

from evlgen_lavis.common import registry_once
from evlgen_lavis.tasks.base import OfflineEvalMixin
from evlgen_lavis.tasks.caption_metrics import DEFAULT_METRICS, compute_caption_metrics
from evlgen_lavis.tasks.ground_truth import caption_references, to_python_id
from evlgen_lavis.tasks.reporting import datasets_cfg_of, gather_results, run_cfg_of, write_metrics


def caption_agg_metric(metrics):
    """LAVIS's model-selection score: CIDEr + Bleu_4; exact_match when neither was computed."""
    if "CIDEr" in metrics or "Bleu_4" in metrics:
        return metrics.get("CIDEr", 0.0) + metrics.get("Bleu_4", 0.0)
    return metrics.get("exact_match", 0.0)


@registry_once("task", "evlgen_captioning")
class EvlgenCaptionTask(OfflineEvalMixin, CaptionTask):
    """Captioning evaluation. Eval samples must carry ``image_id`` (int or str) matching the
    annotations' ``image_id`` (or ``image`` path when the annotation has no ``image_id``)."""

    def __init__(self, num_beams=5, max_len=30, min_len=1, evaluate=False, report_metric=True,
                 caption_metrics=DEFAULT_METRICS, use_spice=False, datasets_cfg=None):
        super().__init__(num_beams=num_beams, max_len=max_len, min_len=min_len, evaluate=evaluate,
                         report_metric=report_metric)
        self.caption_metrics = tuple(caption_metrics)
        self.use_spice = use_spice
        self._init_sources(datasets_cfg)

    @staticmethod
    def caption_kwargs(run_cfg):
        """Constructor arguments read from the run config (shared with subclasses)."""
        metrics = run_cfg.get("caption_metrics", None)
        return dict(
            num_beams=run_cfg.get("num_beams", 5),
            max_len=run_cfg.get("max_len", 30),
            min_len=run_cfg.get("min_len", 1),
            evaluate=run_cfg.get("evaluate", False),
            report_metric=run_cfg.get("report_metric", True),
            caption_metrics=DEFAULT_METRICS if metrics is None else tuple(metrics),
            use_spice=bool(run_cfg.get("spice", False)),
        )

    @classmethod
    def setup_task(cls, cfg):
        """``cfg``: a LAVIS Config, or any config with ``run`` (and optionally ``datasets``) sections."""
        return cls(**cls.caption_kwargs(run_cfg_of(cfg)), datasets_cfg=datasets_cfg_of(cfg))

    def valid_step(self, model, samples):
        """Greedy/beam captions for a batch -> ``[{"caption", "image_id"}]``."""
        if "image_id" not in samples:
            raise KeyError("evlgen_captioning needs 'image_id' in every eval sample (the dataset's "
                           "__getitem__ must return it)")
        captions = model.generate(
            samples,
            use_nucleus_sampling=False,
            num_beams=self.num_beams,
            max_length=self.max_len,
            min_length=self.min_len,
        )
        return [{"caption": caption, "image_id": to_python_id(img_id)}
                for caption, img_id in zip(captions, samples["image_id"])]

    def score_captions(self, results, split_name):
        """Caption metrics of merged ``results`` against the split's annotations, plus agg_metrics.
        Ids are matched as strings, so an int id in the results matches "5" in a JSON file and back."""
        gts = {}
        for img_id, refs in caption_references(self.sources.annotations(split_name)).items():
            gts.setdefault(str(img_id), []).extend(refs)
        res = {str(r["image_id"]): r["caption"] for r in results}
        metrics = compute_caption_metrics(gts, res, use_spice=self.use_spice,
                                          metrics=self.caption_metrics)
        metrics["agg_metrics"] = caption_agg_metric(metrics)
        return metrics

    def after_evaluation(self, val_result, split_name, epoch="", **kwargs):
        """Merge results over ranks into ``<result_dir>/<split>_epoch<epoch>.json``; on the main
        process score them, write ``<split>_metrics.json`` and ``evaluate.txt`` and return the metrics
        (None on other ranks, as LAVIS's tasks)."""
        results = gather_results(val_result, f"{split_name}_epoch{epoch}", dedup_key="image_id")
        if not is_main_process():
            return None
        if not self.report_metric:
            return {"agg_metrics": 0.0}
        metrics = self.score_captions(results, split_name)
        write_metrics(split_name, metrics)
        return metrics
