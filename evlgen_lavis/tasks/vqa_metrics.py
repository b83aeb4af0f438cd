"""VQA accuracy: the official VQAv2 evaluation (LAVIS's ``vqa_tools``) and a per-question path.

LAVIS 1.0.2 ships no ``EvalAIAnswerProcessor``; :func:`normalize_answer` is MMF's EvalAI answer
processor (the one the VQAv2 server uses), written on top of the tables of LAVIS's ``VQAEval``.
"""
import contextlib
import io
import logging
import os

from lavis.common.vqa_tools.vqa import VQA
from lavis.common.vqa_tools.vqa_eval import VQAEval

_TABLES = VQAEval()  # without arguments it only builds the normalisation tables


def normalize_answer(answer):
    """EvalAI answer normalisation: lowercase, strip "," and "?", VQAEval's punctuation rules, number
    words to digits ("two" -> "2"), articles removed, contractions restored ("dont" -> "don't")."""
    text = str(answer).replace("\n", " ").replace("\t", " ").strip().lower()
    text = text.replace(",", "").replace("?", "").replace("'s", " 's")
    text = _TABLES.processPunctuation(text)
    words = [_TABLES.manualMap.get(w, w) for w in text.split()]
    words = [_TABLES.contractions.get(w, w) for w in words if w not in _TABLES.articles]
    return " ".join(words)


def vqa_accuracy(pred, answers, leave_one_out=True):
    """Accuracy (0..1) of one predicted answer, both sides normalised with :func:`normalize_answer`.

    ``answers`` a string, or a list of one: exact match (GQA style). A list of several human answers
    (VQAv2 has 10): ``min(#humans who gave pred / 3, 1)``; with ``leave_one_out`` (the official VQAv2
    metric, as LAVIS's ``VQAEval``) that is averaged over the 10 subsets that leave one human out, so
    matching 2 of 10 answers scores (2 * 1/3 + 8 * 2/3) / 10 = 0.6 rather than 2/3.
    """
    if isinstance(answers, str):
        answers = [answers]
    answers = [normalize_answer(a) for a in answers]
    if not answers:
        raise ValueError("vqa_accuracy: empty list of reference answers")
    pred = normalize_answer(pred)
    if len(answers) == 1:
        return float(pred == answers[0])
    matches = sum(a == pred for a in answers)
    if not leave_one_out:
        return min(matches / 3.0, 1.0)
    return sum(min((matches - (a == pred)) / 3.0, 1.0) for a in answers) / len(answers)


def compute_vqa_accuracy(gts, res, leave_one_out=True):
    """Mean :func:`vqa_accuracy` in percent. ``gts``: question_id -> answer or list of answers;
    ``res``: question_id -> predicted answer (every id must be in ``gts``).
    Returns ``{"accuracy": percent, "num_questions": n}``."""
    if not res:
        raise ValueError("compute_vqa_accuracy: no predictions to score (res is empty)")
    unknown = [q for q in res if q not in gts]
    if unknown:
        raise KeyError(f"{len(unknown)} predicted question ids have no reference answers, e.g. "
                       f"{unknown[:5]!r}; results and annotations must use the same question_id")
    if len(gts) > len(res):
        logging.warning("%d of %d annotated questions have no prediction; scoring the %d predicted ones",
                        len(gts) - len(res), len(gts), len(res))
    accs = [vqa_accuracy(pred, gts[q], leave_one_out) for q, pred in res.items()]
    return {"accuracy": 100.0 * sum(accs) / len(accs), "num_questions": len(accs)}


def official_vqa_accuracy(res, ques_file, anno_file):
    """The official VQAv2 evaluation with LAVIS's ``VQA``/``VQAEval`` on local files.

    Args:
        res: question_id -> predicted answer. Ids are matched to the annotation file's ids through
            ``str()`` (so 5 and "5" match); every predicted id must be annotated. Unlike
            ``VQA.loadRes``, a subset of the questions may be scored.
        ques_file: VQAv2-format questions JSON (``{"questions": [{"question_id", "question", ...}]}``).
        anno_file: VQAv2-format annotations JSON (``{"annotations": [{"question_id", "answers":
            [{"answer": ...}], "answer_type", "question_type", ...}]}``); missing types become "unknown".

    Returns ``{"accuracy": percent, <answer_type>: percent, ..., "num_questions": n}``.
    """
    for what, path in (("question", ques_file), ("annotation", anno_file)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VQA {what} file not found: {path}")
    if not res:
        raise ValueError("official_vqa_accuracy: no predictions to score (res is empty)")
    with contextlib.redirect_stdout(io.StringIO()):  # the VQA tools print progress bars
        vqa = VQA(anno_file, ques_file)
    by_str = {str(q): q for q in vqa.qa}
    unknown = [q for q in res if str(q) not in by_str]
    if unknown:
        raise KeyError(f"{len(unknown)} predicted question ids are not in {anno_file}, e.g. {unknown[:5]!r}")
    for ann in vqa.qa.values():
        ann.setdefault("question_type", "unknown")
        ann.setdefault("answer_type", "unknown")
    vqa_res = VQA()
    vqa_res.qa = {by_str[str(q)]: {"question_id": by_str[str(q)], "answer": str(a)} for q, a in res.items()}
    scorer = VQAEval(vqa, vqa_res, n=2)
    with contextlib.redirect_stdout(io.StringIO()):
        scorer.evaluate(quesIds=list(vqa_res.qa))
    metrics = {"accuracy": scorer.accuracy["overall"]}
    metrics.update(scorer.accuracy["perAnswerType"])
    metrics["num_questions"] = len(vqa_res.qa)
    return metrics
