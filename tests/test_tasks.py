"""Tests of EVLGen's evaluation tasks and metric functions (evlgen_lavis/tasks).

Expected metric values are worked out by hand in the comments, from the definitions pycocoevalcap
implements: corpus BLEU with the "closest" reference length, and CIDEr-D (tf-idf with df over the
references of the scored images, n = 1..4 averaged, clipped cosine, Gaussian length penalty sigma = 6
on the difference of bigram counts, x10).
"""
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lavis.common.registry import registry  # noqa: E402

from evlgen_lavis.tasks import caption_metrics as cm  # noqa: E402
from evlgen_lavis.tasks.caption_metrics import (  # noqa: E402
    compute_caption_metrics,
    normalize_caption,
    simple_ptb_tokenize,
    tokenize_captions,
)
from evlgen_lavis.tasks.captioning import EvlgenCaptionTask  # noqa: E402
from evlgen_lavis.tasks.pretrain import EvlgenPretrainTask  # noqa: E402
from evlgen_lavis.tasks.vqa import EvlgenVQATask  # noqa: E402
from evlgen_lavis.tasks.vqa_metrics import (  # noqa: E402
    compute_vqa_accuracy,
    normalize_answer,
    official_vqa_accuracy,
    vqa_accuracy,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_java = pytest.mark.skipif(not cm.java_available(), reason="java not installed")

# ---------------------------------------------------------------- a toy corpus with hand-computed scores
# Three images, one reference each. N = 3 images; df counts the images whose references hold an n-gram:
# df(red) = 2 (A, B), every other reference n-gram 1; "green" is in no reference: df 0 -> max(1, 0) = 1.
# idf = log N - log df: red -> log 3 - log 2 = log 1.5; all other n-grams -> log 3.
TOY_GTS = {"A": ["red circle"], "B": ["red square"], "C": ["blue triangle"]}
TOY_RES = {"A": "red square", "B": "red square", "C": "green triangle"}
# CIDEr per image = 10 * mean over n = 1..4 of cos_n (lengths equal: no length penalty; no 3-/4-grams: 0)
#  A: n=1 hyp {red: l1.5, square: l3}, ref {red: l1.5, circle: l3} -> a / (a + b), a = log(1.5)^2,
#     b = log(3)^2; n=2 "red square" vs "red circle" -> 0.            A = 10/4 * a / (a + b)
#  B: identical, cos_1 = cos_2 = 1                                     B = 10 * 2/4 = 5
#  C: n=1 {green, triangle} vs {blue, triangle}, equal weights -> 1/2;  C = 10/4 * 1/2 = 1.25
_A, _B = math.log(1.5) ** 2, math.log(3) ** 2
TOY_CIDER = (10 / 4 * _A / (_A + _B) + 5 + 1.25) / 3  # = 2.18324
# BLEU (corpus): unigram matches 1 + 2 + 1 of 6, bigram 0 + 1 + 0 of 3, lengths 6 vs 6 (no penalty).
TOY_BLEU_1 = 4 / 6
TOY_BLEU_2 = math.sqrt(4 / 6 * 1 / 3)


@pytest.fixture
def lavis_paths(tmp_path):
    """Point LAVIS's registry paths result_dir/output_dir at a temp dir, restoring them afterwards
    (registry.register_path refuses to overwrite, so the mapping is edited directly)."""
    paths = registry.mapping["paths"]
    saved = {k: paths.get(k) for k in ("result_dir", "output_dir")}
    out = tmp_path / "output"
    paths["output_dir"], paths["result_dir"] = str(out), str(out / "result")
    os.makedirs(out / "result")
    yield out
    for k, v in saved.items():
        if v is None:
            paths.pop(k, None)
        else:
            paths[k] = v


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


# ------------------------------------------------------------------------------------- caption metrics
def test_bleu_identical_caption_is_one():
    m = compute_caption_metrics({1: ["a man riding a horse"]}, {1: "a man riding a horse"},
                                metrics=["bleu"], tokenizer="python")
    for n in range(1, 5):
        assert m[f"Bleu_{n}"] == pytest.approx(1.0, rel=1e-6)


def test_bleu_with_brevity_penalty_by_hand():
    # Image 1: ref "a man riding a horse on the beach" (8 tokens), cand "a man on a brown horse" (6).
    #   unigrams: a (2, clipped to the ref's 2), man, on, horse match, brown does not -> 5 of 6;
    #   bigrams: "a man" only of (a man, man on, on a, a brown, brown horse)       -> 1 of 5.
    # Alone: BP = exp(1 - 8/6); Bleu_1 = 5/6 * BP = 0.597109; Bleu_2 = sqrt(5/6 * 1/5) * BP = 0.292523.
    gts = {1: ["a man riding a horse on the beach"]}
    res = {1: "a man on a brown horse"}
    m = compute_caption_metrics(gts, res, metrics=["bleu"], tokenizer="python")
    bp = math.exp(1 - 8 / 6)
    assert m["Bleu_1"] == pytest.approx(5 / 6 * bp, rel=1e-6)
    assert m["Bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 1 / 5) * bp, rel=1e-6)
    # Add image 2, ref "a dog" = cand "a dog": BLEU pools counts over the corpus (not a mean of images):
    #   unigrams 7/8, bigrams 2/6, lengths 8 vs 10 -> BP = exp(1 - 10/8).
    gts[2], res[2] = ["a dog"], "a dog"
    m = compute_caption_metrics(gts, res, metrics=["bleu"], tokenizer="python")
    bp = math.exp(1 - 10 / 8)
    assert m["Bleu_1"] == pytest.approx(7 / 8 * bp, rel=1e-6)  # 0.681451
    assert m["Bleu_2"] == pytest.approx(math.sqrt(7 / 8 * 2 / 6) * bp, rel=1e-6)  # 0.420600


def test_cider_by_hand_toy_corpus():
    m = compute_caption_metrics(TOY_GTS, TOY_RES, metrics=["bleu", "cider"], tokenizer="python")
    assert m["CIDEr"] == pytest.approx(TOY_CIDER, rel=1e-6)
    assert m["Bleu_1"] == pytest.approx(TOY_BLEU_1, rel=1e-6)
    assert m["Bleu_2"] == pytest.approx(TOY_BLEU_2, rel=1e-6)


def test_cider_length_penalty_by_hand():
    # N = 2, every n-gram has df <= 1, so all weights are log 2 and cancel in the cosines.
    # Image 1: ref "a b", cand "a b c d".  n=1: dot 2, |hyp| 2, |ref| sqrt2 -> 1/sqrt2;
    #   n=2: {ab, bc, cd} vs {ab} -> 1/sqrt3; n=3,4: the ref has none -> 0.
    #   Length = number of bigrams (a quirk of pycocoevalcap): 3 vs 1 -> penalty exp(-2^2 / (2 * 6^2)).
    # Image 2: identical 2-word captions -> 10 * 2/4 = 5.
    m = compute_caption_metrics({1: ["a b"], 2: ["x y"]}, {1: "a b c d", 2: "x y"},
                                metrics=["cider"], tokenizer="python")
    img1 = 10 / 4 * (1 / math.sqrt(2) + 1 / math.sqrt(3)) * math.exp(-4 / 72)
    assert m["CIDEr"] == pytest.approx((img1 + 5) / 2, rel=1e-6)  # 4.018805


def test_cider_zero_without_overlap_and_single_image():
    m = compute_caption_metrics({1: ["red circle"], 2: ["blue square"]},
                                {1: "green triangle", 2: "yellow star"},
                                metrics=["bleu", "cider", "rouge"], tokenizer="python")
    assert m["CIDEr"] == 0.0 and m["ROUGE_L"] == 0.0 and m["Bleu_1"] < 1e-6
    # One image: idf = log(1) - log(1) = 0 for every n-gram, so CIDEr is 0 even when identical.
    m = compute_caption_metrics({1: ["red circle"]}, {1: "red circle"}, metrics=["cider"],
                                tokenizer="python")
    assert m["CIDEr"] == 0.0


def test_multiple_references_and_rouge():
    # ROUGE-L takes the best precision and best recall over the references: cand "a red circle" vs
    # "a red circle on white" (lcs 3, P 1, R 3/5) and "red circle" (lcs 2, P 2/3, R 1) -> P = R = 1.
    m = compute_caption_metrics({0: ["a red circle on white", "red circle"]}, {0: "a red circle"},
                                metrics=["rouge"], tokenizer="python")
    assert m["ROUGE_L"] == pytest.approx(1.0)


def test_exact_match_normalisation_and_extra_metric_hook():
    assert normalize_caption("  A Blue,  circle! ") == "a blue circle"
    gts = {1: ["a blue circle"], 2: ["a red square", "red square"], 3: ["a green triangle"]}
    res = {1: "A blue circle.", 2: "Red square", 3: "a green circle"}
    def mentions_colour(g, r):
        return sum(any(c in v.lower() for c in ("red", "blue")) for v in r.values()) / len(r)

    m = compute_caption_metrics(gts, res, metrics=["exact_match"],
                                extra_metrics={"mentions_colour": mentions_colour})
    assert m == {"exact_match": pytest.approx(2 / 3), "mentions_colour": pytest.approx(2 / 3)}


def test_caption_metrics_input_errors():
    with pytest.raises(KeyError, match="no reference captions"):
        compute_caption_metrics({1: ["a"]}, {"1": "a"}, metrics=["bleu"], tokenizer="python")
    with pytest.raises(ValueError, match="unknown caption metrics"):
        compute_caption_metrics({1: ["a"]}, {1: "a"}, metrics=["bleu5"])
    with pytest.raises(ValueError, match="no predictions"):
        compute_caption_metrics({1: ["a"]}, {}, metrics=["bleu"])


def test_without_java_meteor_is_skipped_and_python_tokenizer_used(monkeypatch, caplog):
    monkeypatch.setattr(cm, "java_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        m = compute_caption_metrics(TOY_GTS, TOY_RES)  # defaults include METEOR
    assert "METEOR" not in m and "java not found" in caplog.text
    assert m["CIDEr"] == pytest.approx(TOY_CIDER, rel=1e-6)
    with pytest.raises(RuntimeError, match="needs Java"):
        tokenize_captions({1: ["a"]}, tokenizer="ptb")


def test_spice_skipped_with_warning_when_unavailable(monkeypatch, caplog):
    monkeypatch.setattr(cm, "spice_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        m = compute_caption_metrics(TOY_GTS, TOY_RES, use_spice=True, metrics=["cider"],
                                    tokenizer="python")
    assert "SPICE" not in m and "SPICE skipped" in caplog.text and "CIDEr" in m


def test_simple_tokenizer_rules():
    assert simple_ptb_tokenize("A dog's toy, (red)!") == "a dog 's toy -lrb- red -rrb-"
    assert simple_ptb_tokenize("It costs $2.50, don't go...") == "it costs $ 2.50 do n't go"


@needs_java
@pytest.mark.slow
def test_python_tokenizer_matches_ptb_on_typical_captions():
    sentences = ["A man riding a wave on top of a surfboard.", "Two dogs' toys, (red) and blue!",
                 "I'm sure they'll go; we've seen it -- twice...", "It costs $2.50, or 1,000 yen?",
                 "Mr. Smith drives U.S. cars.", "a \"quoted\" word", "A 3-year-old boy: eating pizza"]
    caps = {i: [s] for i, s in enumerate(sentences)}
    assert tokenize_captions(caps, "python") == tokenize_captions(caps, "ptb")


@needs_java
@pytest.mark.slow
def test_full_default_metrics_with_java():
    gts = dict(TOY_GTS, D=["a man riding a horse on the beach"])
    res = dict(TOY_RES, D="A man riding a horse on the beach.")  # PTB lowercases, drops the period
    m = compute_caption_metrics(gts, res)
    assert set(m) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "exact_match"}
    assert m["exact_match"] == pytest.approx(2 / 4)
    # Unigram matches 4 + 8 of 6 + 8, lengths equal: the hand computation with image D added.
    assert m["Bleu_1"] == pytest.approx(12 / 14, rel=1e-6)
    assert 0.2 < m["METEOR"] < 1  # one Java start (about 10 s): METEOR is only checked for sanity


# ----------------------------------------------------------------------------------------- VQA metrics
def test_vqa_accuracy_by_hand():
    ten = ["two", "2"] + ["3"] * 8  # "two" normalises to "2": 2 of 10 humans said 2
    assert vqa_accuracy("2", ten, leave_one_out=False) == pytest.approx(2 / 3)
    # Official VQAv2: mean over the 10 leave-one-out subsets: the 2 matching humans left out -> 1/3,
    # the 8 others -> 2/3: (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert vqa_accuracy("2", ten) == pytest.approx(0.6)
    assert vqa_accuracy("3", ten) == 1.0
    assert vqa_accuracy("Three", ["3"] * 3 + ["4"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("5", ten) == 0.0
    assert vqa_accuracy("The Dog.", "dog") == 1.0  # one answer: exact match after normalisation
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    assert normalize_answer("Two dogs, dont they?") == "2 dogs don't they"


def _vqa_toy(tmp_path):
    """Three questions in VQAv2 format and as a LAVIS annotation list. Expected accuracies:
    q1 "yes" vs 10 x yes -> 1; q2 "two" vs 2 x "2" + 8 x "3" -> 0.6; q3 "red" vs 10 x blue -> 0."""
    qs = [(1, "Is it a circle?", ["yes"] * 10, "yes/no"), (2, "How many?", ["2"] * 2 + ["3"] * 8, "number"),
          (3, "What colour?", ["blue"] * 10, "other")]
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "toy", "data_subtype": "val",
                 "license": {}, "questions": [{"question_id": q, "image_id": 7, "question": t}
                                              for q, t, _, _ in qs]}
    annotations = {"annotations": [
        {"question_id": q, "image_id": 7, "answer_type": at, "question_type": "what",
         "multiple_choice_answer": a[0],
         "answers": [{"answer": x, "answer_id": i + 1} for i, x in enumerate(a)]}
        for q, _, a, at in qs]}
    entries = [{"question_id": q, "question": t, "answer": a, "image": "x.png"} for q, t, a, _ in qs]
    return (write_json(tmp_path / "questions.json", questions),
            write_json(tmp_path / "annotations.json", annotations),
            write_json(tmp_path / "vqa_val.json", entries))


def test_official_and_simple_vqa_paths_agree(tmp_path):
    ques, anno, _ = _vqa_toy(tmp_path)
    res = {1: "Yes", 2: "two", "3": "red"}  # ids matched through str()
    m = official_vqa_accuracy(res, ques, anno)
    assert m["accuracy"] == pytest.approx(160 / 3, abs=0.01)  # VQAEval rounds to 2 decimals
    assert (m["yes/no"], m["number"], m["other"]) == (100.0, 60.0, 0.0)
    gts = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, "3": ["blue"] * 10}
    assert compute_vqa_accuracy(gts, res)["accuracy"] == pytest.approx(160 / 3)
    with pytest.raises(KeyError, match="not in"):
        official_vqa_accuracy({99: "x"}, ques, anno)
    with pytest.raises(FileNotFoundError, match="question file"):
        official_vqa_accuracy(res, str(tmp_path / "nope.json"), anno)


# --------------------------------------------------------------------------------------- fake models
class FakeCaptioner:
    """generate() answers from a table keyed by image id; remembers the generation kwargs."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def generate(self, samples, **kwargs):
        self.calls.append(kwargs)
        return [self.table[i.item() if torch.is_tensor(i) else i] for i in samples["image_id"]]

    def __call__(self, samples):  # forward: the loss the pretrain task validates
        return {"loss": torch.tensor(samples["loss"])}


class FakeAnswerer:
    def __init__(self, table):
        self.table, self.calls = table, []

    def predict_answers(self, samples, **kwargs):
        self.calls.append(kwargs)
        return [self.table[q.item() if torch.is_tensor(q) else q] for q in samples["question_id"]]


def caption_config(ann_path, **run):
    return OmegaConf.create({
        "run": {"task": "evlgen_captioning", "num_beams": 3, "max_len": 20, "min_len": 2, **run},
        "datasets": {"local_caption": {"build_info": {
            "annotations": {"val": {"storage": ann_path}}, "images": {"storage": "/nonexistent"}}}},
    })


# Toy annotations: image A has an int image_id, B is identified by its path, C has one entry per caption.
TOY_ANNOTATIONS = [
    {"image": "a.png", "image_id": 0, "caption": ["red circle"]},
    {"image": "b.png", "caption": "red square"},
    {"image": "c.png", "image_id": "c", "caption": "blue triangle"},
    {"image": "c.png", "image_id": "c", "caption": "a blue triangle"},
]
TOY_PREDICTIONS = {0: "red square", "b.png": "red square", "c": "green triangle"}
# CIDEr changes with C's second reference, so the end-to-end test compares with the pure function.
TOY_ID_GTS = {"0": ["red circle"], "b.png": ["red square"], "c": ["blue triangle", "a blue triangle"]}


# -------------------------------------------------------------------------------- tasks, end to end
def test_caption_task_end_to_end_from_config(tmp_path, lavis_paths):
    ann = write_json(tmp_path / "val.json", TOY_ANNOTATIONS)
    cfg = caption_config(ann, caption_metrics=["bleu", "rouge", "cider", "exact_match"])
    task = EvlgenCaptionTask.setup_task(cfg)
    model = FakeCaptioner(TOY_PREDICTIONS)
    batches = [{"image_id": torch.tensor([0])}, {"image_id": ["b.png", "c"]},
               {"image_id": torch.tensor([0])}]  # a repeat, as DistributedSampler pads
    results = task.evaluation(model, batches, cuda_enabled=False)  # LAVIS's loop over valid_step
    assert model.calls[0] == {"use_nucleus_sampling": False, "num_beams": 3, "max_length": 20,
                              "min_length": 2}
    metrics = task.after_evaluation(val_result=results, split_name="val", epoch=0)

    saved = json.loads((lavis_paths / "result" / "val_epoch0.json").read_text())
    assert saved == [{"caption": "red square", "image_id": 0}, {"caption": "red square", "image_id": "b.png"},
                     {"caption": "green triangle", "image_id": "c"}]  # ids keep their types, deduplicated
    expected = compute_caption_metrics(TOY_ID_GTS, {str(k): v for k, v in TOY_PREDICTIONS.items()},
                                       metrics=["bleu", "rouge", "cider"])
    assert set(metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "exact_match",
                            "agg_metrics"}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value)
    # BLEU-1 by hand: matches 1 + 2 + 1 of 6 candidate words; C's closest reference has 2 words.
    assert metrics["Bleu_1"] == pytest.approx(4 / 6, rel=1e-6)
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["agg_metrics"] == pytest.approx(metrics["CIDEr"] + metrics["Bleu_4"])
    assert json.loads((lavis_paths / "val_metrics.json").read_text()) == pytest.approx(metrics)
    line = (lavis_paths / "evaluate.txt").read_text().strip().splitlines()[-1]
    assert json.loads(line)["val"]["CIDEr"] == pytest.approx(metrics["CIDEr"])


def test_caption_task_ground_truth_from_evaluated_dataset(lavis_paths):
    # No datasets config: the annotations come from the dataset LAVIS passes to before_evaluation.
    task = EvlgenCaptionTask.setup_task(OmegaConf.create(
        {"run": {"task": "evlgen_captioning", "caption_metrics": ["bleu", "cider"]}}))
    dataset = SimpleNamespace(annotation=[{"image": "a", "caption": "red circle"},
                                          {"image": "b", "caption": "red square"},
                                          {"image": "c", "caption": "blue triangle"}])
    model = FakeCaptioner({"a": "red square", "b": "red square", "c": "green triangle"})
    task.before_evaluation(model, dataset)
    results = task.valid_step(model, {"image_id": ["a", "b", "c"]})
    metrics = task.after_evaluation(val_result=results, split_name="test", epoch="best")
    assert metrics["CIDEr"] == pytest.approx(TOY_CIDER, rel=1e-6)  # the hand-computed toy corpus
    assert metrics["Bleu_2"] == pytest.approx(TOY_BLEU_2, rel=1e-6)
    assert (lavis_paths / "result" / "test_epochbest.json").exists()


def test_caption_task_errors(tmp_path, lavis_paths):
    task = EvlgenCaptionTask.setup_task(caption_config(str(tmp_path / "missing.json")))
    model = FakeCaptioner({0: "x"})
    with pytest.raises(FileNotFoundError, match=r"datasets\.local_caption\.build_info\.annotations\.val"):
        task.after_evaluation(val_result=task.valid_step(model, {"image_id": [0]}), split_name="val", epoch=0)
    with pytest.raises(RuntimeError, match="no ground truth for split 'test'"):
        task.after_evaluation(val_result=[{"caption": "x", "image_id": 0}], split_name="test", epoch=0)
    with pytest.raises(KeyError, match="image_id"):
        task.valid_step(model, {"image": torch.zeros(1)})


def test_tasks_registered_and_built_by_lavis_setup_task(tmp_path):
    from lavis.tasks import setup_task

    for name, cls in (("evlgen_captioning", EvlgenCaptionTask), ("evlgen_vqa", EvlgenVQATask),
                      ("evlgen_pretrain", EvlgenPretrainTask)):
        assert registry.get_task_class(name) is cls
        lavis_cfg = SimpleNamespace(run_cfg=OmegaConf.create({"task": name}), datasets_cfg=None)
        assert type(setup_task(lavis_cfg)) is cls  # the LAVIS Config path: cfg.run_cfg


def test_vqa_task_simple_accuracy_end_to_end(tmp_path, lavis_paths):
    _, _, entries = _vqa_toy(tmp_path)
    cfg = OmegaConf.create({"run": {"task": "evlgen_vqa"}, "datasets": {"local_vqa": {"build_info": {
        "annotations": {"val": {"storage": [entries]}}}}}})
    task = EvlgenVQATask.setup_task(cfg)
    model = FakeAnswerer({1: "Yes.", 2: "two", 3: "red"})
    # cuda_enabled left to the task: the model has no CUDA parameters, so batches stay on the CPU
    batches = [{"question_id": torch.tensor([1, 2])}, {"question_id": torch.tensor([3])}]
    results = task.evaluation(model, batches)
    assert model.calls[0] == {"num_beams": 5, "inference_method": "generate", "max_len": 10, "min_len": 1,
                              "prompt": "Question: {} Short answer:"}
    metrics = task.after_evaluation(val_result=results, split_name="val")
    assert metrics == {"accuracy": pytest.approx(160 / 3), "num_questions": 3,
                       "agg_metrics": pytest.approx(160 / 3)}
    assert len(json.loads((lavis_paths / "result" / "val_vqa_result.json").read_text())) == 3
    assert json.loads((lavis_paths / "val_metrics.json").read_text())["accuracy"] == pytest.approx(160 / 3)


def test_vqa_task_official_files_and_prompt(tmp_path, lavis_paths):
    ques, anno, _ = _vqa_toy(tmp_path)
    cfg = OmegaConf.create({"run": {"task": "evlgen_vqa", "prompt": "Q: {} A:", "num_beams": 1},
                            "datasets": {"coco_vqa": {"build_info": {"annotations": {"val": {
                                "storage": [], "ques_file": ques, "anno_file": anno}}}}}})
    task = EvlgenVQATask.setup_task(cfg)
    model = FakeAnswerer({1: "yes", 2: "2", 3: "blue"})
    metrics = task.after_evaluation(
        val_result=task.valid_step(model, {"question_id": torch.tensor([1, 2, 3])}), split_name="val")
    assert model.calls[0]["prompt"] == "Q: {} A:" and model.calls[0]["num_beams"] == 1
    assert metrics["accuracy"] == pytest.approx(100 * (1 + 0.6 + 1) / 3, abs=0.01)
    assert metrics["number"] == 60.0 and metrics["agg_metrics"] == metrics["accuracy"]
    cfg.datasets.coco_vqa.build_info.annotations.val.anno_file = str(tmp_path / "gone.json")
    with pytest.raises(FileNotFoundError, match="gone.json"):
        EvlgenVQATask.setup_task(cfg).after_evaluation(val_result=[], split_name="val")


def test_pretrain_task_validation_loss_and_caption_metrics(tmp_path, lavis_paths):
    ann = write_json(tmp_path / "val.json", TOY_ANNOTATIONS)
    batches = [{"image": torch.zeros(2, 3, 4, 4), "text_input": ["x", "y"], "image_id": [0, "b.png"],
                "loss": 1.0},
               {"image": torch.zeros(1, 3, 4, 4), "text_input": ["z"], "image_id": ["c"], "loss": 4.0}]
    model = FakeCaptioner(TOY_PREDICTIONS)

    task = EvlgenPretrainTask.setup_task(caption_config(ann))
    assert task.train_step(model, batches[0]).item() == 1.0  # LAVIS's default: model(samples)["loss"]
    metrics = task.after_evaluation(val_result=task.evaluation(model, batches, cuda_enabled=False),
                                    split_name="val", epoch=1)
    # Sample-weighted mean: (2 * 1.0 + 1 * 4.0) / 3 = 2.0; LAVIS keeps the highest agg_metrics.
    assert metrics == {"loss": pytest.approx(2.0), "agg_metrics": pytest.approx(-2.0)}
    assert not model.calls  # no generation unless asked

    task = EvlgenPretrainTask.setup_task(caption_config(ann, val_caption_metrics=True,
                                                        caption_metrics=["bleu", "cider"]))
    metrics = task.after_evaluation(val_result=task.evaluation(model, batches, cuda_enabled=False),
                                    split_name="val", epoch=2)
    assert metrics["loss"] == pytest.approx(2.0)
    assert metrics["Bleu_1"] == pytest.approx(4 / 6, rel=1e-6)
    assert metrics["agg_metrics"] == pytest.approx(metrics["CIDEr"] + metrics["Bleu_4"])

    # A caption eval dataset gives no captions: the loss cannot be computed, and the error says so.
    eval_batch = {"image": torch.zeros(2, 3, 4, 4), "image_id": ["b.png", "c"]}
    with pytest.raises(KeyError, match="run.val_loss: false"):
        task.valid_step(model, eval_batch)
    task = EvlgenPretrainTask.setup_task(caption_config(ann, val_loss=False, val_caption_metrics=True,
                                                        caption_metrics=["exact_match"]))
    metrics = task.after_evaluation(val_result=task.valid_step(model, eval_batch), split_name="val", epoch=3)
    # b.png's caption is its reference, c's is not; without CIDEr/BLEU agg_metrics is exact_match.
    assert metrics == {"exact_match": 0.5, "agg_metrics": 0.5}
    with pytest.raises(ValueError, match="measure nothing"):
        EvlgenPretrainTask.setup_task(caption_config(ann, val_loss=False))


DIST_WORKER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from lavis.common.registry import registry
    from evlgen_lavis.tasks.captioning import EvlgenCaptionTask
    from omegaconf import OmegaConf

    out, ann = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    registry.mapping["paths"]["output_dir"] = out
    registry.mapping["paths"]["result_dir"] = os.path.join(out, "result")
    cfg = OmegaConf.create({"run": {"caption_metrics": ["bleu", "cider"]}, "datasets": {"d": {
        "build_info": {"annotations": {"val": {"storage": ann}}}}}})
    task = EvlgenCaptionTask.setup_task(cfg)

    class Model:
        def generate(self, samples, **kw):
            table = {0: "red square", "b.png": "red square", "c": "green triangle"}
            return [table[i] for i in samples["image_id"]]

    shard = [[0, "b.png"], ["c", 0]][rank]  # rank 1's 0 is a padding repeat
    metrics = task.after_evaluation(task.valid_step(Model(), {"image_id": shard}), "val", epoch=0)
    with open(os.path.join(out, f"metrics_rank{rank}.json"), "w") as f:
        json.dump(metrics, f)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_caption_task_under_torch_distributed(tmp_path):
    ann = write_json(tmp_path / "val.json", TOY_ANNOTATIONS)
    out = tmp_path / "out"
    os.makedirs(out / "result")
    script = tmp_path / "worker.py"
    script.write_text(DIST_WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000),
               WORLD_SIZE="2", PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(script), str(out), ann],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    logs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    main = json.loads((out / "metrics_rank0.json").read_text())
    assert json.loads((out / "metrics_rank1.json").read_text()) is None  # only rank 0 scores
    assert len(json.loads((out / "result" / "val_epoch0.json").read_text())) == 3
    assert main["Bleu_1"] == pytest.approx(4 / 6, rel=1e-6)
    assert main["agg_metrics"] == pytest.approx(main["CIDEr"] + main["Bleu_4"])
