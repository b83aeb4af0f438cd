"""Image-caption datasets over a LAVIS-style annotation list.

Annotation entries: ``{"image": path relative to vis_root, "caption": str or list of str,
"image_id": optional}``. The image id is ``ann.get("image_id", ann["image"])`` everywhere.
"""
from evlgen_lavis.datasets.base import LocalImageDataset, as_list, image_id_of


class LocalCaptionDataset(LocalImageDataset):
    """Train split: one sample per (image, caption) pair; an entry with a caption list yields one entry
    per caption. Samples: ``{"image", "text_input", "image_id", "instance_id"}`` where image_id is the raw
    id from the rule above (str or int, not remapped to an index as LAVIS's CaptionDataset does)."""

    required_keys = ("image", "caption")

    def prepare_annotation(self, annotation):
        flat = []
        for ann in annotation:
            for caption in as_list(ann["caption"]):
                if not isinstance(caption, str):
                    raise ValueError(f"caption of {ann['image']!r} must be a string, got {caption!r}")
                flat.append({**ann, "caption": caption})
        return flat

    def sample_fields(self, index):
        ann = self.annotation[index]
        return {
            "text_input": self.text_processor(ann["caption"]),
            "image_id": image_id_of(ann),
            "instance_id": ann["instance_id"],
        }


class LocalCaptionEvalDataset(LocalImageDataset):
    """Val/test splits: one sample per unique image id, ``{"image", "image_id", "instance_id"}``.

    Accepts eval-format files (one entry per image, "caption" a list) and train-format files (one entry
    per caption): entries are grouped by image id, in order of first appearance. ``self.annotation`` is
    the grouped list, one ``{"image", "image_id", "caption": [all reference captions], "instance_id"}``
    per image: the ground truth for captioning metrics. "caption" may be absent (no references).
    """

    def prepare_annotation(self, annotation):
        grouped = {}
        for ann in annotation:
            image_id = image_id_of(ann)
            entry = grouped.get(image_id)
            if entry is None:
                entry = grouped[image_id] = {"image": ann["image"], "image_id": image_id, "caption": []}
            elif entry["image"] != ann["image"]:
                raise ValueError(
                    f"image_id {image_id!r} names two different images, {entry['image']!r} and "
                    f"{ann['image']!r}, in {self.ann_paths}: image ids must be unique per image"
                )
            if "caption" in ann:
                entry["caption"].extend(as_list(ann["caption"]))
        return list(grouped.values())

    def sample_fields(self, index):
        ann = self.annotation[index]
        return {"image_id": ann["image_id"], "instance_id": ann["instance_id"]}
