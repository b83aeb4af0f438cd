"""``evlgen_vqa``: zero-shot VQA by open-ended generation, scored offline.

Two scoring paths, chosen per split:

* official VQAv2 evaluation (LAVIS's ``VQA``/``VQAEval``) when a VQAv2-format questions file and
  annotations file are known for the split: from the dataset config keys
  ``build_info.annotations.<split>.ques_file`` / ``anno_file``, else from the dataset attributes
  ``coco_fmt_qust_file`` / ``coco_fmt_anno_file`` that LAVIS's VQA datasets set from the 3rd and 4th
  ``storage`` entries (read by ``VQATask.build_datasets``);
* otherwise per-question accuracy (:func:`compute_vqa_accuracy`) against the split's annotation list
  of ``{"question_id", "question", "answer": str or [str]}``: exact match after normalisation for one
  answer, VQAv2's ``min(#humans/3, 1)`` for several.

Run config keys (``run:``): ``prompt`` ("Question: {} Short answer:"), ``num_beams`` (5), ``max_len``
(10), ``min_len`` (1), ``evaluate``, ``report_metric`` (true), ``leave_one_out`` (true).
Accuracies are percentages (0..100), as in LAVIS; ``agg_metrics`` = ``accuracy``.
"""
import os

from lavis.common.dist_utils import is_main_process
from lavis.tasks.vqa import VQATask

from evlgen_lavis.common import registry_once
from evlgen_lavis.tasks.base import OfflineEvalMixin
from evlgen_lavis.tasks.ground_truth import resolve_path, to_python_id, vqa_references
from evlgen_lavis.tasks.reporting import datasets_cfg_of, gather_results, run_cfg_of, write_metrics
from evlgen_lavis.tasks.vqa_metrics import compute_vqa_accuracy, official_vqa_accuracy

DEFAULT_VQA_PROMPT = "Question: {} Short answer:"


@registry_once("task", "evlgen_vqa")
class EvlgenVQATask(OfflineEvalMixin, VQATask):
    """Open-ended VQA. Eval samples must carry ``question_id`` (and whatever the model's
    ``predict_answers`` reads, e.g. ``image`` and ``text_input``)."""

    def __init__(self, num_beams=5, max_len=10, min_len=1, evaluate=False, prompt=DEFAULT_VQA_PROMPT,
                 report_metric=True, leave_one_out=True, datasets_cfg=None):
        super().__init__(num_beams=num_beams, max_len=max_len, min_len=min_len, evaluate=evaluate,
                         num_ans_candidates=0, inference_method="generate", prompt=prompt)
        self.report_metric = report_metric
        self.leave_one_out = leave_one_out
        self._init_sources(datasets_cfg)

    @classmethod
    def setup_task(cls, cfg):
        """``cfg``: a LAVIS Config, or any config with ``run`` (and optionally ``datasets``) sections."""
        run = run_cfg_of(cfg)
        return cls(
            num_beams=run.get("num_beams", 5),
            max_len=run.get("max_len", 10),
            min_len=run.get("min_len", 1),
            evaluate=run.get("evaluate", False),
            prompt=run.get("prompt", DEFAULT_VQA_PROMPT),
            report_metric=run.get("report_metric", True),
            leave_one_out=bool(run.get("leave_one_out", True)),
            datasets_cfg=datasets_cfg_of(cfg),
        )

    def valid_step(self, model, samples):
        """Generated answers for a batch -> ``[{"question_id", "answer"}]``."""
        if "question_id" not in samples:
            raise KeyError("evlgen_vqa needs 'question_id' in every eval sample (the dataset's "
                           "__getitem__ must return it)")
        answers = model.predict_answers(
            samples=samples,
            num_beams=self.num_beams,
            inference_method="generate",
            max_len=self.max_len,
            min_len=self.min_len,
            prompt=self.prompt,
        )
        return [{"question_id": to_python_id(qid), "answer": answer}
                for answer, qid in zip(answers, samples["question_id"])]

    def official_files(self, split_name):
        """``(ques_file, anno_file)`` for the official VQAv2 evaluation of a split, or None."""
        candidates = []
        for name, split_cfg in self.sources.split_configs(split_name):
            ques, anno = split_cfg.get("ques_file"), split_cfg.get("anno_file")
            if ques or anno:
                if not (ques and anno):
                    raise ValueError(f"datasets.{name}.build_info.annotations.{split_name} sets only one "
                                     "of ques_file / anno_file; the VQAv2 evaluation needs both")
                candidates.append((f"datasets.{name}.build_info.annotations.{split_name}",
                                   resolve_path(ques), resolve_path(anno)))
        if split_name in self.ques_files:
            candidates.append(("the dataset's coco_fmt_qust_file/coco_fmt_anno_file",
                               self.ques_files[split_name], self.anno_files[split_name]))
        current = self.sources.current
        if getattr(current, "coco_fmt_qust_file", None):
            candidates.append(("the evaluated dataset's coco_fmt_qust_file/coco_fmt_anno_file",
                               current.coco_fmt_qust_file, current.coco_fmt_anno_file))
        if not candidates:
            return None
        where, ques, anno = candidates[0]
        for path in (ques, anno):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"VQAv2 evaluation file {path} (from {where}) does not exist; "
                                        "fix the path, or remove it to score against the annotation list")
        return ques, anno

    def score_answers(self, results, split_name):
        """VQA metrics of merged ``results`` (official VQAv2 evaluation when files are known)."""
        res = {r["question_id"]: r["answer"] for r in results}
        files = self.official_files(split_name)
        if files is not None:
            metrics = official_vqa_accuracy(res, *files)
        else:
            gts = {str(q): a for q, a in vqa_references(self.sources.annotations(split_name)).items()}
            metrics = compute_vqa_accuracy(gts, {str(q): a for q, a in res.items()}, self.leave_one_out)
        metrics["agg_metrics"] = metrics["accuracy"]
        return metrics

    def after_evaluation(self, val_result, split_name, **kwargs):
        """Merge results into ``<result_dir>/<split>_vqa_result.json``; on the main process score
        them, write ``<split>_metrics.json`` and ``evaluate.txt``, return the metrics."""
        results = gather_results(val_result, f"{split_name}_vqa_result", dedup_key="question_id")
        if not is_main_process():
            return None
        if not self.report_metric:
            return {"agg_metrics": 0.0}
        metrics = self.score_answers(results, split_name)
        write_metrics(split_name, metrics)
        return metrics
