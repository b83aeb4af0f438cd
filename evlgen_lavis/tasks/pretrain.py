"""``evlgen_pretrain``: EVLGen's one-stage training task.

Training is LAVIS's default step (``model(samples)["loss"]``). Validation reports the language-model
loss on the validation split (``run.val_loss``, default true; ``agg_metrics = -loss``, since LAVIS keeps
the checkpoint with the highest agg_metrics) and, with ``run.val_caption_metrics: true``, generates
captions and reports the caption metrics of :class:`EvlgenCaptionTask` (then
``agg_metrics = CIDEr + Bleu_4``). The loss needs captions in the validation samples (``text_input``):
a caption *eval* dataset (one sample per image, no caption) only supports the caption metrics.

Run config keys: those of ``evlgen_captioning`` plus ``val_loss`` (true), ``val_caption_metrics`` (false).
"""
import torch
from lavis.common.dist_utils import is_main_process

from evlgen_lavis.common import registry_once
from evlgen_lavis.tasks.captioning import EvlgenCaptionTask
from evlgen_lavis.tasks.reporting import datasets_cfg_of, gather_results, run_cfg_of, write_metrics


def batch_size(samples):
    """Number of samples in a collated batch (first of image, video, text_input, image_id)."""
    for key in ("image", "video", "text_input", "image_id"):
        if key in samples:
            return len(samples[key])
    raise KeyError(f"cannot tell the batch size: samples have none of image/video/text_input/image_id "
                   f"(keys: {sorted(samples)})")


@registry_once("task", "evlgen_pretrain")
class EvlgenPretrainTask(EvlgenCaptionTask):
    """Training task; validation = LM loss (+ caption metrics when ``val_caption_metrics``)."""

    def __init__(self, val_loss=True, val_caption_metrics=False, **kwargs):
        super().__init__(**kwargs)
        if not (val_loss or val_caption_metrics):
            raise ValueError("evlgen_pretrain: run.val_loss and run.val_caption_metrics are both false, so "
                             "validation would measure nothing; enable one (or set no valid_splits)")
        self.val_loss = val_loss
        self.val_caption_metrics = val_caption_metrics

    @classmethod
    def setup_task(cls, cfg):
        run = run_cfg_of(cfg)
        return cls(val_loss=bool(run.get("val_loss", True)),
                   val_caption_metrics=bool(run.get("val_caption_metrics", False)),
                   **cls.caption_kwargs(run), datasets_cfg=datasets_cfg_of(cfg))

    def valid_step(self, model, samples):
        """``[{"loss", "n"}]`` for the batch (when ``val_loss``), then caption records (when
        ``val_caption_metrics``)."""
        records = []
        if self.val_loss:
            if "text_input" not in samples:
                raise KeyError("evlgen_pretrain validation loss needs captions ('text_input') in the val "
                               "samples, but this dataset gives none (a caption eval dataset yields one "
                               "sample per image): set run.val_loss: false and run.val_caption_metrics: "
                               "true, or validate on a dataset that yields (image, caption) pairs")
            with torch.no_grad():
                loss = model(samples)["loss"]
            records.append({"loss": float(loss.detach().float().mean()), "n": batch_size(samples)})
        if self.val_caption_metrics:
            records += super().valid_step(model, samples)
        return records

    def after_evaluation(self, val_result, split_name, epoch="", **kwargs):
        """Sample-weighted mean validation loss over all ranks (``loss``), caption metrics if enabled;
        written to ``<split>_metrics.json`` / ``evaluate.txt`` on the main process."""
        losses = None
        if self.val_loss:
            losses = gather_results([r for r in val_result if "loss" in r],
                                    f"{split_name}_epoch{epoch}_loss")
        captions = None
        if self.val_caption_metrics:
            captions = gather_results([r for r in val_result if "caption" in r],
                                      f"{split_name}_epoch{epoch}", dedup_key="image_id")
        if not is_main_process():
            return None
        metrics = {}
        if losses is not None:
            total = sum(r["n"] for r in losses)
            if total == 0:
                raise RuntimeError(f"no validation batches were evaluated on split '{split_name}'")
            metrics["loss"] = sum(r["loss"] * r["n"] for r in losses) / total
            metrics["agg_metrics"] = -metrics["loss"]
        if captions is not None and self.report_metric:
            metrics.update(self.score_captions(captions, split_name))  # agg_metrics: CIDEr + Bleu_4
        if not metrics:
            return {"agg_metrics": 0.0}
        write_metrics(split_name, metrics)
        return metrics
