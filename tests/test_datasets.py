"""Dataset builders: local_caption, local_vqa, easy_vqa_caption / easy_vqa_vqa, skipping of unreadable
samples, and the feature cache. Images are generated PNGs; the processors are LAVIS's blip_image_eval
(resize + normalise) and blip_caption / blip_question, so the tests do not depend on ours."""
import json
import logging
import os
import re

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

import evlgen_lavis.datasets  # noqa: F401  (registers the builders)
from lavis.common.config import Config
from lavis.common.registry import registry
from evlgen_lavis.datasets import (
    CachedFeatureDataset,
    MissingDataError,
    SkipAwareConcatDataset,
    SkipCounter,
    TooManySkippedError,
    build_feature_cache,
    concat_datasets,
    derive_captions,
    prepare_easy_vqa,
)

SIZE = 16
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "gray": (128, 128, 128)}


def processors(text="blip_caption"):
    image = {"name": "blip_image_eval", "image_size": SIZE}
    return {
        "vis_processor": {"train": image, "eval": image},
        "text_processor": {"train": {"name": text}, "eval": {"name": text}},
    }


def builder_cfg(build_info, text="blip_caption"):
    return OmegaConf.create({"data_type": "images", "build_info": build_info, **processors(text)})


def build(name, build_info, text="blip_caption"):
    return registry.get_builder_class(name)(builder_cfg(build_info, text)).build_datasets()


def build_train(ann_path, caption_data):
    build_info = {"annotations": {"train": {"storage": ann_path}}, "images": caption_data["images"]}
    return build("local_caption", build_info)["train"]


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture
def caption_data(tmp_path):
    """images/{red,green,blue,gray}.png and train/val/test annotation files."""
    images = tmp_path / "images"
    images.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (24, 20), rgb).save(images / f"{name}.png")
    train = [
        {"image": "red.png", "caption": "A Red Square."},
        {"image": "green.png", "caption": ["a green square", "green!"], "image_id": 7},
        {"image": "blue.png", "caption": "a blue square"},
    ]
    val = [  # train format: one entry per caption, grouped by image for evaluation
        {"image": "blue.png", "caption": "a blue square"},
        {"image": "gray.png", "caption": "a gray square", "image_id": "g"},
        {"image": "blue.png", "caption": "blue"},
    ]
    test = [{"image": "red.png", "caption": ["a red square", "red"]}]
    return {
        "root": tmp_path,
        "annotations": {
            split: {"storage": write_json(tmp_path / f"{split}.json", anns)}
            for split, anns in (("train", train), ("val", val), ("test", test))
        },
        "images": {"storage": str(images)},
    }


def test_local_caption_splits_and_samples(caption_data):
    build_info = {"annotations": caption_data["annotations"], "images": caption_data["images"]}
    ds = build("local_caption", build_info)
    assert set(ds) == {"train", "val", "test"}

    train = ds["train"]
    assert len(train) == 4  # the caption list of green.png gives two entries
    sample = train[0]
    assert set(sample) == {"image", "text_input", "image_id", "instance_id"}
    assert sample["image"].shape == (3, SIZE, SIZE)
    assert sample["text_input"] == "a red square"  # blip_caption: lower case, punctuation removed
    assert sample["image_id"] == "red.png"  # no image_id: the image path
    assert [train[i]["image_id"] for i in (1, 2)] == [7, 7]
    batch = next(iter(DataLoader(train, batch_size=4, collate_fn=train.collater)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE)
    assert batch["n_skipped"].item() == 0 and "empty" not in batch

    val = ds["val"]
    assert len(val) == 2  # unique images
    assert set(val[0]) == {"image", "image_id", "instance_id"}
    assert [a["image_id"] for a in val.annotation] == ["blue.png", "g"]
    assert val.annotation[0]["caption"] == ["a blue square", "blue"]
    assert [ann["caption"] for ann in ds["test"].annotation] == [["a red square", "red"]]


def test_defaults_merge_through_lavis_config(caption_data):
    """LAVIS's Config merges the builder's default yaml under the run config's datasets section."""
    user = {"build_info": {"images": caption_data["images"]}}
    run = OmegaConf.create({"datasets": {"local_caption": user}})
    cfg = Config.build_dataset_config(run).datasets.local_caption
    assert cfg.data_type == "images"
    assert cfg.vis_processor.train.name == "evlgen_image_train"
    assert cfg.text_processor.eval.name == "blip_caption"
    assert cfg.build_info.images.storage == caption_data["images"]["storage"]
    for name in ("local_vqa", "easy_vqa_caption", "easy_vqa_vqa"):
        cfg = Config.build_dataset_config(OmegaConf.create({"datasets": {name: {}}})).datasets[name]
        assert cfg.data_type == "images"


def test_relative_storage_resolves_against_cwd_then_cache_root(caption_data, tmp_path, monkeypatch):
    cache_root = tmp_path / "lavis_cache"
    (cache_root / "anns").mkdir(parents=True)
    (cache_root / "anns" / "train.json").write_text(
        (caption_data["root"] / "train.json").read_text()
    )
    monkeypatch.setitem(registry.mapping["paths"], "cache_root", str(cache_root))
    monkeypatch.chdir(caption_data["root"])
    build_info = {
        "annotations": {"train": {"storage": "anns/train.json"}},  # found under cache_root
        "images": {"storage": "images"},  # found under the working directory
    }
    ds = build("local_caption", build_info)
    assert ds["train"].vis_root == str(caption_data["root"] / "images")
    assert ds["train"].ann_paths == [str(cache_root / "anns" / "train.json")]


KEY = "datasets.local_caption.build_info."


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda bi: bi["annotations"]["train"].update(storage="nope/train.json"),
         KEY + "annotations.train.storage: annotation file 'nope/train.json' not found"),
        (lambda bi: bi["images"].update(storage="/no/such/images"),
         KEY + "images.storage: image directory '/no/such/images' not found"),
        (lambda bi: bi.pop("annotations"), KEY + "annotations has no train/val/test entry"),
    ],
    ids=["annotation-file", "image-dir", "no-annotations"],
)
def test_missing_data_errors_name_the_config_key(caption_data, change, message):
    build_info = {"annotations": caption_data["annotations"], "images": caption_data["images"]}
    change(build_info)
    with pytest.raises(MissingDataError, match=re.escape(message)):
        build("local_caption", build_info)


def test_unreadable_images_are_skipped_logged_and_counted(caption_data, caplog):
    images = caption_data["root"] / "images"
    (images / "corrupt.png").write_bytes(b"this is not a png" * 10)
    Image.new("RGB", (64, 64)).save(images / "big.png")
    big = (images / "big.png").read_bytes()
    (images / "truncated.png").write_bytes(big[: len(big) // 2])
    anns = [{"image": n, "caption": "x"} for n in ("red.png", "corrupt.png", "missing.png", "truncated.png")]
    path = write_json(caption_data["root"] / "bad.json", anns)
    train = build_train(path, caption_data)

    with caplog.at_level(logging.WARNING):
        items = [train[i] for i in range(4)]
    assert items[0] is not None and items[1:] == [None, None, None]
    for name in ("corrupt.png", "missing.png", "truncated.png"):
        assert name in caplog.text

    # through DataLoader workers: n_skipped is a tensor, so it survives the worker process
    loader = DataLoader(train, batch_size=4, num_workers=1, collate_fn=train.collater)
    batch = next(iter(loader))
    assert batch["n_skipped"].item() == 3 and batch["image"].shape[0] == 1

    empty = train.collater([None, None])
    assert empty["empty"] is True and empty["n_skipped"].item() == 2 and set(empty) == {"n_skipped", "empty"}

    counter = SkipCounter()
    counter.update(batch)
    counter.update(empty)
    assert (counter.seen, counter.skipped) == (6, 5)
    counter.check(0.9)
    with pytest.raises(TooManySkippedError, match=r"5 of 6 samples.*run\.max_skip_fraction=0\.5"):
        counter.check(0.5)

    # LAVIS concatenates the train split; our drop-in keeps the skip handling
    train_split = concat_datasets({"train": [train]})["train"]
    assert isinstance(train_split, SkipAwareConcatDataset)
    batch = train_split.collater([train_split[i] for i in range(4)])
    assert batch["n_skipped"].item() == 3 and len(batch["text_input"]) == 1


def test_local_vqa_samples_and_collater(caption_data):
    root = caption_data["root"]
    train = [
        {"image": "red.png", "question": "What colour is it?", "answer": ["red", "red", "orange"]},
        {"image": "blue.png", "question": "Is it blue?", "answer": "yes"},
    ]
    val = [
        {"image": "green.png", "question": "What colour?", "answer": "green", "question_id": 11},
        {"image": "gray.png", "question": "Is it red?", "answer": ["no"]},
    ]
    ds = build(
        "local_vqa",
        {"annotations": {"train": {"storage": write_json(root / "vqa_train.json", train)},
                         "val": {"storage": write_json(root / "vqa_val.json", val)}},
         "images": caption_data["images"]},
        text="blip_question",
    )
    s = ds["train"][0]
    assert set(s) == {"image", "text_input", "answers", "weights"}
    assert s["text_input"] == "what colour is it?"
    assert s["answers"] == ["red", "orange"] and s["weights"] == pytest.approx([2 / 3, 1 / 3])
    batch = ds["train"].collater([ds["train"][0], None, ds["train"][1]])
    assert batch["image"].shape == (2, 3, SIZE, SIZE)
    assert batch["answer"] == ["red", "orange", "yes"]
    assert batch["n_answers"].tolist() == [2, 1] and batch["weight"].shape == (3,)
    assert batch["n_skipped"].item() == 1

    ev = ds["val"]
    assert set(ev[0]) == {"image", "text_input", "question_id", "instance_id"}
    assert [ev[i]["question_id"] for i in range(2)] == [11, 1]  # missing question_id: its index
    assert [a["answer"] for a in ev.annotation] == [["green"], ["no"]]  # ground truth, as lists
    assert ev.answer_list == ["green", "no"]
    assert ev.collater([ev[0], ev[1]])["question_id"].tolist() == [11, 1]


@pytest.fixture(scope="module")
def easy_vqa_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("easy_vqa_cache"))


def test_easy_vqa_caption_derivation_counts():
    import easy_vqa

    train = derive_captions(*easy_vqa.get_train_questions())
    test = derive_captions(*easy_vqa.get_test_questions())
    assert (len(train), len(test)) == (3542, 880)  # FACTS.md
    caption = re.compile(r"a (red|green|blue|black|gray|teal|brown|yellow) (circle|rectangle|triangle)")
    assert all(caption.fullmatch(c) for c in list(train.values()) + list(test.values()))
    # contradictions exclude an image; a negated yes/no question asserts its words when answered "no"
    colour_twice = ["what color is the shape?"] * 2
    assert derive_captions(colour_twice, ["red", "blue"], [0, 0]) == {}
    negated = ["is there not a red shape?", "what shape is present?"]
    assert derive_captions(negated, ["no", "circle"], [3, 3]) == {3: "a red circle"}


def test_easy_vqa_caption_builder(easy_vqa_dir):
    ds = build("easy_vqa_caption", {"cache_dir": easy_vqa_dir, "val_from": "train", "val_size": 200})
    train, val, test = ds["train"], ds["val"], ds["test"]
    assert len(train) + len(val) == 3542 and len(test) == 880
    assert 100 < len(val) < 200  # 200 held-out images, of which those with a caption
    assert not {a["image"] for a in train.annotation} & {a["image"] for a in val.annotation}
    sample = train[0]
    assert set(sample) == {"image", "text_input", "image_id", "instance_id"}
    assert sample["image"].shape == (3, SIZE, SIZE)
    assert re.fullmatch(r"a \w+ (circle|rectangle|triangle)", sample["text_input"])
    assert set(test[0]) == {"image", "image_id", "instance_id"}
    assert len(test.annotation[0]["caption"]) == 1
    # prepared once: the files are reused
    directory = prepare_easy_vqa(easy_vqa_dir, "train", 200, 0)
    assert os.path.dirname(train.ann_paths[0]) == directory
    assert sorted(os.listdir(easy_vqa_dir)) == [os.path.basename(directory)]  # no temp dir left behind

    build_info = {"cache_dir": easy_vqa_dir, "val_from": "test", "val_size": None, "splits": ["train", "val"]}
    test_as_val = build("easy_vqa_caption", build_info)
    assert (len(test_as_val["train"]), len(test_as_val["val"])) == (3542, 880)


def test_max_samples_keeps_the_first_records(caption_data, easy_vqa_dir):
    annotations = dict(caption_data["annotations"])
    annotations["val"] = {**annotations["val"], "max_samples": 1}
    ds = build("local_caption", {"annotations": annotations, "images": caption_data["images"]})
    assert len(ds["val"]) == 1 and [a["image_id"] for a in ds["val"].annotation] == ["blue.png"]
    assert len(ds["train"]) == 4  # other splits untouched
    build_info = {"cache_dir": easy_vqa_dir, "val_size": 200, "splits": ["test"], "max_samples": {"test": 50}}
    test = build("easy_vqa_vqa", build_info, text="blip_question")["test"]
    assert len(test) == len(test.annotation) == 50


def test_easy_vqa_vqa_builder(easy_vqa_dir):
    build_info = {"cache_dir": easy_vqa_dir, "val_from": "train", "val_size": 200}
    ds = build("easy_vqa_vqa", build_info, text="blip_question")
    train, val, test = ds["train"], ds["val"], ds["test"]
    assert len(train) + len(val) == 38575 and len(test) == 9673
    s = train[0]
    assert set(s) == {"image", "text_input", "answers", "weights"}
    assert len(s["answers"]) == 1 and s["weights"] == [1.0]
    e = test[0]
    assert set(e) == {"image", "text_input", "question_id", "instance_id"}
    assert e["image"].shape == (3, SIZE, SIZE)
    assert len(test.answer_list) == 13
    assert len({a["question_id"] for a in test.annotation}) == len(test)


def test_feature_cache_round_trip(caption_data, tmp_path):
    images = caption_data["root"] / "images"
    (images / "corrupt.png").write_bytes(b"\x89PNG broken")
    anns = [
        {"image": "red.png", "caption": ["one", "two"]},
        {"image": "blue.png", "caption": "three"},
        {"image": "corrupt.png", "caption": "four"},
    ]
    path = write_json(caption_data["root"] / "fc.json", anns)
    train = build_train(path, caption_data)
    assert len(train) == 4

    encoded = []

    def encode_fn(x):  # (B,3,H,W) -> (B, N=4, C=3): a fixed function of the pixels
        encoded.append(x.shape[0])
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(2).transpose(1, 2)

    out = str(tmp_path / "feats" / "train.pt")
    build_feature_cache(train, encode_fn, out, batch_size=2)
    assert sum(encoded) == 2  # red.png encoded once for its two captions; the corrupt file never
    cached = CachedFeatureDataset(train, out)
    assert len(cached) == 4 and cached.annotation is train.annotation
    for i in range(3):
        s = cached[i]
        assert set(s) == {"image_embeds", "text_input", "image_id", "instance_id"}
        torch.testing.assert_close(s["image_embeds"], encode_fn(train[i]["image"][None])[0])
        assert s["text_input"] == train[i]["text_input"]
    assert cached[3] is None
    batch = cached.collater([cached[i] for i in range(4)])
    assert batch["image_embeds"].shape == (3, 4, 3) and batch["n_skipped"].item() == 1

    shorter = write_json(caption_data["root"] / "fc2.json", anns[1:])
    with pytest.raises(ValueError, match="different dataset"):
        CachedFeatureDataset(build_train(shorter, caption_data), out)
