"""VQA datasets over a local annotation list.

Annotation entries: ``{"image": path relative to vis_root, "question": str, "answer": str or list of str,
"question_id": optional}``. On load, ``answer`` is normalised to a list of str and a missing
``question_id`` becomes the entry's index in the (concatenated) annotation list, so ``self.annotation``
is the ground truth for the evaluation task: ``{question_id: answers}``. LAVIS's own ``vqa`` task calls
``int(question_id)``: give integer ids when using it.
"""
import torch

from evlgen_lavis.datasets.base import LocalImageDataset, as_list


class _VQAAnnotationMixin:
    required_keys = ("image", "question", "answer")

    def prepare_annotation(self, annotation):
        out = []
        for i, ann in enumerate(annotation):
            answers = as_list(ann["answer"])
            if not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(
                    f"answer of question {ann.get('question_id', i)!r} must be a non-empty str or list "
                    f"of str, got {ann['answer']!r}"
                )
            out.append({**ann, "answer": answers, "question_id": ann.get("question_id", i)})
        return out


class LocalVQADataset(_VQAAnnotationMixin, LocalImageDataset):
    """Train split. Samples: ``{"image", "text_input" (processed question), "answers" (unique answers),
    "weights" (each answer's share of the answer list)}``, like LAVIS's COCOVQADataset. The collater
    matches LAVIS's VQADataset.collater: ``{"image" (B,3,H,W), "text_input" [B], "answer" [sum n],
    "weight" (sum n,), "n_answers" (B,), "n_skipped"}``; with cached features "image_embeds"
    replaces "image"."""

    def sample_fields(self, index):
        ann = self.annotation[index]
        answers = ann["answer"]
        weight = {}
        for answer in answers:
            weight[answer] = weight.get(answer, 0.0) + 1.0 / len(answers)
        return {
            "text_input": self.text_processor(ann["question"]),
            "answers": list(weight),
            "weights": list(weight.values()),
        }

    def collate(self, samples):
        visual_key = "image" if "image" in samples[0] else "image_embeds"
        return {
            visual_key: torch.stack([s[visual_key] for s in samples], dim=0),
            "text_input": [s["text_input"] for s in samples],
            "answer": [a for s in samples for a in s["answers"]],
            "weight": torch.tensor([w for s in samples for w in s["weights"]], dtype=torch.float),
            "n_answers": torch.tensor([len(s["answers"]) for s in samples], dtype=torch.long),
        }


class LocalVQAEvalDataset(_VQAAnnotationMixin, LocalImageDataset):
    """Val/test splits. Samples: ``{"image", "text_input" (processed question), "question_id",
    "instance_id"}``. ``answer_list`` (sorted unique answers of this split) is the candidate list that
    LAVIS's vqa task reads for ``inference_method: rank``."""

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths)
        self.answer_list = sorted({a for ann in self.annotation for a in ann["answer"]})

    def sample_fields(self, index):
        ann = self.annotation[index]
        return {
            "text_input": self.text_processor(ann["question"]),
            "question_id": ann["question_id"],
            "instance_id": ann["instance_id"],
        }
