"""The paper's run configs (projects/evlgen/, outside tiny/ and demo/), the pretraining-corpus builders
``laion115M`` / ``ccs14M`` on tiny generated shards, and the launch scripts in run_scripts/evlgen/.

Nothing here builds a paper-size model or touches the hub: configs are parsed and merged, never run.
"""
import argparse
import glob
import io
import itertools
import json
import os
import subprocess
import tarfile

import pytest
import torch
import webdataset as wds
from lavis.common.config import Config
from lavis.common.registry import registry
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

import evlgen_lavis  # noqa: F401  (registers models, builders, tasks, runner)
from evlgen_lavis.datasets import MissingDataError
from evlgen_lavis.datasets.caption import LocalCaptionDataset
from evlgen_lavis.datasets.paper import SKIP_KEY, WebImageTextDataset
from evlgen_lavis.runners import load_config
from evlgen_lavis.runners.optim import build_lr_scheduler
from evlgen_lavis.runners.settings import RunSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.join(REPO, "projects", "evlgen")
EXCLUDED_DIRS = ("tiny", "demo", "video")  # video/: tests/test_video.py
PRETRAIN = {
    "pretrain_opt.yaml": ("evlgen_opt", "pretrain_opt2.7b", "facebook/opt-2.7b"),
    "pretrain_opt6.7b.yaml": ("evlgen_opt", "pretrain_opt6.7b", "facebook/opt-6.7b"),
    "pretrain_opt_10pct.yaml": ("evlgen_opt", "pretrain_opt2.7b", "facebook/opt-2.7b"),
    "pretrain_vicuna7b.yaml": ("evlgen_llama", "pretrain_vicuna7b", "lmsys/vicuna-7b-v1.1"),
}
VQA_EVAL = {  # config -> (dataset builder, evaluated split)
    "eval/vqav2_zeroshot_opt2.7b_eval.yaml": ("coco_vqa", "val"),
    "eval/gqa_zeroshot_opt2.7b_eval.yaml": ("gqa", "val"),
    "eval/okvqa_zeroshot_opt2.7b_eval.yaml": ("ok_vqa", "test"),
}
CAPTION_EVAL = "eval/caption_coco_opt2.7b_eval.yaml"
EXPECTED = sorted(list(PRETRAIN) + list(VQA_EVAL) + [CAPTION_EVAL])


def paper_configs():
    """Every yaml under projects/evlgen/ except those in tiny/ and demo/ (paths relative to it)."""
    found = glob.glob(os.path.join(PROJECT, "**", "*.yaml"), recursive=True)
    rel = [os.path.relpath(p, PROJECT) for p in found]
    return sorted(r for r in rel if r.split(os.sep)[0] not in EXCLUDED_DIRS)


def lavis_config(rel):
    """LAVIS's own Config of a project yaml (what LAVIS's train.py would build)."""
    return Config(argparse.Namespace(cfg_path=os.path.join(PROJECT, rel), options=None))


# -- every config parses, names registered things, merges its defaults -------------------------------

def test_the_paper_configs_exist():
    missing = sorted(set(EXPECTED) - set(paper_configs()))
    assert not missing, f"missing paper configs: {missing}"


@pytest.mark.parametrize("rel", paper_configs())
def test_config_parses_and_names_registered_components(rel):
    cfg = lavis_config(rel)
    model = cfg.model_cfg
    model_cls = registry.get_model_class(model.arch)
    assert model_cls is not None, f"model.arch={model.arch} is not registered"
    assert model.model_type in model_cls.PRETRAINED_MODEL_CONFIG_DICT
    # the model type's default yaml merged under the run config's model section: the paper's connector
    assert model.vision_encoder == "eva_clip_g" and model.image_size == 224
    assert model.tomeformer.num_layers == 12 and model.tomeformer.r == 19
    assert model.tomeformer.bert == "bert-base-uncased"
    assert model.beta == 0.0  # LM loss only
    assert registry.get_task_class(cfg.run_cfg.task) is not None
    assert cfg.run_cfg.runner == "runner_evlgen_iter"
    assert registry.get_runner_class(cfg.run_cfg.runner) is not None
    used = ("eval",) if cfg.run_cfg.evaluate else ("train", "eval")  # evaluation builds no train split
    for name, entry in cfg.datasets_cfg.items():
        assert registry.get_builder_class(name) is not None, name
        assert entry.data_type == "images"
        for split, proc in (entry.get("vis_processor") or {}).items():
            if split not in used:
                continue
            assert proc.name == f"evlgen_image_{'train' if split == 'train' else 'eval'}", (name, split)
            assert proc.image_size == 224, (name, split)
    # what train.py / evaluate.py load: validated config and the runner's settings
    RunSettings.from_run_cfg(load_config(["--cfg-path", os.path.join(PROJECT, rel)]).run_cfg)


@pytest.mark.parametrize("rel", sorted(PRETRAIN))
def test_pretrain_config_model_and_mixture(rel):
    arch, model_type, llm = PRETRAIN[rel]
    cfg = lavis_config(rel)
    assert (cfg.model_cfg.arch, cfg.model_cfg.model_type, cfg.model_cfg.llm) == (arch, model_type, llm)
    run = cfg.run_cfg
    assert run.task == "evlgen_captioning" and run.train_splits == ["train"] and run.valid_splits == ["val"]
    ratios = OmegaConf.to_container(run.train_dataset_ratios)
    assert set(ratios) == set(cfg.datasets_cfg), "every training dataset needs a ratio, and only those"
    assert all(isinstance(v, int) and v > 0 for v in ratios.values())
    # the validation split exists in exactly one dataset (LAVIS concatenates only the train split)
    with_val = [n for n, d in cfg.datasets_cfg.items() if "val" in (d.build_info.get("annotations") or {})]
    assert with_val == ["local_caption"]


def run_values(rel, keys):
    run = lavis_config(rel).run_cfg
    return {k: (OmegaConf.to_container(run[k]) if OmegaConf.is_config(run[k]) else run[k]) for k in keys}


PAPER_RUN_KEYS = ("train_dataset_ratios", "max_iters", "iters_per_inner_epoch", "lr_sched", "init_lr", "min_lr",
                  "warmup_lr", "warmup_steps", "weight_decay", "batch_size_train", "batch_size_eval",
                  "num_workers", "amp", "max_len", "min_len", "num_beams", "seed", "valid_splits")
OPT_RUN = {
    "train_dataset_ratios": {"laion115M": 15, "ccs14M": 4, "local_caption": 1},
    "max_iters": 250000, "iters_per_inner_epoch": 5000, "lr_sched": "evlgen_warmup_cosine_iter",
    "init_lr": 1e-4, "min_lr": 1e-5, "warmup_lr": 1e-6, "warmup_steps": 5000, "weight_decay": 0.05,
    "batch_size_train": 200, "batch_size_eval": 100, "num_workers": 4, "amp": True,
    "max_len": 30, "min_len": 8, "num_beams": 5, "seed": 42, "valid_splits": ["val"],
}


def test_pretrain_opt_carries_the_authors_values():
    assert run_values("pretrain_opt.yaml", PAPER_RUN_KEYS) == OPT_RUN
    datasets = lavis_config("pretrain_opt.yaml").datasets_cfg
    for name in ("laion115M", "ccs14M", "local_caption"):  # the authors' blip2_image_train
        train = datasets[name].vis_processor.train
        assert (train.min_scale, train.hflip) == (0.5, True)


def test_pretrain_opt_variants_differ_only_where_stated():
    assert run_values("pretrain_opt6.7b.yaml", PAPER_RUN_KEYS) == OPT_RUN
    tenth = run_values("pretrain_opt_10pct.yaml", PAPER_RUN_KEYS)
    assert tenth.pop("train_dataset_ratios") == {"ccs14M": 4, "local_caption": 1}
    assert tenth == {k: v for k, v in OPT_RUN.items() if k != "train_dataset_ratios"}
    assert "laion115M" not in lavis_config("pretrain_opt_10pct.yaml").datasets_cfg


def test_pretrain_vicuna_carries_the_authors_values():
    values = run_values("pretrain_vicuna7b.yaml", PAPER_RUN_KEYS)
    assert values == {
        **OPT_RUN,
        "train_dataset_ratios": {"ccs14M": 45, "local_caption": 5},
        "max_iters": 60000, "warmup_steps": 2000, "batch_size_train": 20, "batch_size_eval": 20,
    }
    model = lavis_config("pretrain_vicuna7b.yaml").model_cfg
    assert (model.prompt, model.max_txt_len) == ("", 32)


def test_pretrain_opt_schedule_is_warmup_then_cosine():
    """The run config drives the runner's scheduler to the paper's learning rates."""
    run = lavis_config("pretrain_opt.yaml").run_cfg
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=float(run.init_lr))
    sched = build_lr_scheduler(run, optimizer, run.max_iters, run.iters_per_inner_epoch)
    assert sched.step(0) == pytest.approx(1e-6)
    assert sched.step(2500) == pytest.approx((1e-6 + 1e-4) / 2)
    assert sched.step(5000) == pytest.approx(1e-4)
    assert sched.step(5000 + 245000 // 2) == pytest.approx((1e-4 + 1e-5) / 2)
    assert sched.step(250000) == pytest.approx(1e-5)


def lavis_default_storage(builder, split, config_type="default"):
    """The storage entries of LAVIS's own default dataset yaml (its cache_root layout)."""
    cls = registry.get_builder_class(builder)
    info = OmegaConf.load(cls.default_config_path(type=config_type)).datasets[builder].build_info
    storage = info.annotations[split].storage
    return [storage] if isinstance(storage, str) else list(storage)


@pytest.mark.parametrize("rel", sorted(VQA_EVAL))
def test_zero_shot_vqa_configs(rel):
    builder, split = VQA_EVAL[rel]
    cfg = lavis_config(rel)
    run = cfg.run_cfg
    assert cfg.model_cfg.model_type == "pretrain_opt2.7b"
    assert run.task == "evlgen_vqa" and run.evaluate is True and run.test_splits == [split]
    assert run.prompt == "Question: {} Short answer:"
    assert (run.max_len, run.min_len, run.num_beams) == (10, 1, 5)
    assert run.inference_method == "generate" and run.batch_size_eval == 32
    assert list(cfg.datasets_cfg) == [builder]
    ann = cfg.datasets_cfg[builder].build_info.annotations[split]
    if builder == "gqa":  # GQA: scored against the split's own annotation list (no VQAv2-format files)
        assert cfg.datasets_cfg.gqa.type == "balanced_testdev"
        assert "ques_file" not in ann and "anno_file" not in ann
    else:  # official VQAv2 scoring over the files LAVIS's builder stores as the 3rd and 4th entries
        lavis_files = lavis_default_storage(builder, split, cfg.datasets_cfg[builder].get("type", "default"))
        assert [ann.ques_file, ann.anno_file] == lavis_files[2:4]
        assert list(ann.storage) == lavis_files  # LAVIS's layout kept: merged, not replaced


def test_caption_eval_config_is_the_authors_zero_shot_setting():
    cfg = lavis_config(CAPTION_EVAL)
    run = cfg.run_cfg
    assert cfg.model_cfg.model_type == "pretrain_opt2.7b" and cfg.model_cfg.prompt == ""
    assert run.task == "evlgen_captioning" and run.evaluate is True and run.test_splits == ["test"]
    assert (run.max_len, run.min_len, run.num_beams, run.batch_size_eval) == (30, 8, 5, 32)
    build_info = cfg.datasets_cfg.local_caption.build_info
    # the very files LAVIS's coco_caption stores under its cache_root (Karpathy test)
    assert [build_info.annotations.test.storage] == lavis_default_storage("coco_caption", "test")
    assert build_info.images.storage == "coco/images/"


def test_pretrain_coco_uses_lavis_coco_caption_files():
    build_info = lavis_config("pretrain_opt.yaml").datasets_cfg.local_caption.build_info
    for split in ("train", "val"):
        assert [build_info.annotations[split].storage] == lavis_default_storage("coco_caption", split)


# -- laion115M / ccs14M builders on tiny generated data --------------------------------------------

GOOD_CAPTIONS = ["a red square", "a green circle", "a blue square"]
SIZE = 16


def image_bytes(colour, fmt="JPEG"):
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), colour).save(buffer, fmt)
    return buffer.getvalue()


def write_shard(path, samples):
    """A webdataset shard: ``samples`` is a list of (key, {extension: bytes})."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """Two shards: 3 good samples (jpg+json, png+txt, jpg+txt) and 3 bad ones in between (corrupt jpg,
    truncated jpg, no caption). Returns the brace pattern."""
    jpg = image_bytes((200, 30, 30))
    write_shard(tmp_path / "00000.tar", [
        ("s0", {"jpg": jpg, "json": json.dumps({"caption": GOOD_CAPTIONS[0], "url": "x"}).encode()}),
        ("s1", {"png": image_bytes((30, 200, 30), "PNG"), "txt": GOOD_CAPTIONS[1].encode()}),
        ("s2", {"jpg": b"this is not a jpeg", "txt": b"a broken image"}),
    ])
    write_shard(tmp_path / "00001.tar", [
        ("s3", {"jpg": jpg[: len(jpg) // 2], "json": b'{"caption": "a truncated image"}'}),
        ("s4", {"jpg": jpg, "json": b'{"url": "no caption here"}'}),
        ("s5", {"jpg": image_bytes((30, 30, 200)), "txt": GOOD_CAPTIONS[2].encode()}),
    ])
    return str(tmp_path / "{00000..00001}.tar")


def build(name, build_info, vis_train=True):
    """Run a builder as LAVIS does: its default yaml merged with ``build_info`` (and a small image processor)."""
    cls = registry.get_builder_class(name)
    cfg = OmegaConf.load(cls.default_config_path()).datasets[name]
    image = {"name": "evlgen_image_eval", "image_size": SIZE}
    override = {"build_info": build_info, "vis_processor": {"train": image, "eval": image}}
    cfg = OmegaConf.merge(cfg, override)
    if not vis_train:
        cfg.vis_processor.train = None
    return cls(cfg).build_datasets()


def check_samples(samples):
    assert sorted(s["text_input"] for s in samples) == sorted(GOOD_CAPTIONS)
    for s in samples:
        assert isinstance(s["image"], torch.Tensor) and s["image"].shape == (3, SIZE, SIZE)
        assert torch.isfinite(s["image"]).all()


@pytest.mark.parametrize("name", ["laion115M", "ccs14M"])
def test_webdataset_builder_one_pass_skips_and_counts_bad_samples(name, shards):
    datasets = build(name, {"storage": shards, "resample": False, "shuffle_buffer": 0})
    assert list(datasets) == ["train"]
    dataset = datasets["train"]
    assert isinstance(dataset, WebImageTextDataset) and isinstance(dataset, wds.DataPipeline)
    samples = list(dataset)
    check_samples(samples)
    assert dataset.n_skipped == 3
    assert [s[SKIP_KEY] for s in samples] == [0, 0, 3]  # s2, s3, s4 dropped before s5
    batch = dataset.collater(samples)
    assert batch["image"].shape == (3, 3, SIZE, SIZE) and SKIP_KEY not in batch
    assert batch["n_skipped"].dim() == 0 and int(batch["n_skipped"]) == 3


def test_webdataset_skip_counts_reach_the_main_process_through_workers(shards):
    dataset = build("laion115M", {"storage": shards, "resample": False, "shuffle_buffer": 0})["train"]
    loader = DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=dataset.collater)
    batches = list(loader)
    assert sum(len(b["text_input"]) for b in batches) == 3
    assert sum(int(b["n_skipped"]) for b in batches) == 3


def test_webdataset_builder_resamples_endlessly(shards):
    dataset = build("laion115M", {"storage": shards, "shuffle_buffer": 8})["train"]  # default: resample
    samples = list(itertools.islice(iter(dataset), 10))
    assert len(samples) == 10
    assert {s["text_input"] for s in samples} <= set(GOOD_CAPTIONS)


def test_missing_shards_name_the_config_key(shards, tmp_path):
    key = "datasets.laion115M.build_info.storage"
    with pytest.raises(MissingDataError, match=key):
        build("laion115M", {"storage": str(tmp_path / "elsewhere" / "{00000..00003}.tar")})
    with pytest.raises(MissingDataError, match=f"{key} is not set"):
        build("laion115M", {})  # the default yaml leaves storage unset
    with pytest.raises(MissingDataError, match="never downloads"):
        build("laion115M", {"storage": "https://example.com/{00000..00001}.tar"})
    partly = str(tmp_path / "{00000..00002}.tar")  # 00002.tar does not exist
    with pytest.raises(MissingDataError, match="allow_missing_shards"):
        build("laion115M", {"storage": partly})
    dataset = build("laion115M", {"storage": partly, "allow_missing_shards": True, "resample": False,
                                  "shuffle_buffer": 0})["train"]
    check_samples(list(dataset))
    with pytest.raises(MissingDataError, match="datasets.ccs14M.build_info.storage"):
        build("ccs14M", {"format": "webdataset", "storage": str(tmp_path / "nothing.tar")})


def test_webdataset_builder_config_errors_name_the_key(shards):
    with pytest.raises(ValueError, match="datasets.laion115M.vis_processor.train"):
        build("laion115M", {"storage": shards}, vis_train=False)
    with pytest.raises(ValueError, match="datasets.ccs14M.build_info.format"):
        build("ccs14M", {"format": "parquet", "storage": shards})
    with pytest.raises(ValueError, match="datasets.laion115M.build_info.format"):
        build("laion115M", {"format": "json", "storage": shards})  # laion115M: webdataset only


@pytest.fixture
def ccs_json(tmp_path):
    """ccs14M in the json format: 3 images + 1 corrupt file, and the annotation list."""
    images = tmp_path / "images"
    images.mkdir()
    entries = []
    for i, (caption, colour) in enumerate(zip(GOOD_CAPTIONS, [(200, 30, 30), (30, 200, 30), (30, 30, 200)])):
        (images / f"{i}.jpg").write_bytes(image_bytes(colour))
        entries.append({"image": f"{i}.jpg", "caption": caption})
    (images / "bad.jpg").write_bytes(b"not an image at all")
    entries.insert(1, {"image": "bad.jpg", "caption": "a broken image"})
    ann = tmp_path / "ccs_filtered.json"
    ann.write_text(json.dumps(entries))
    return {"annotations": {"train": {"storage": str(ann)}}, "images": {"storage": str(images)}}


def test_ccs14m_json_format(ccs_json):
    dataset = build("ccs14M", {"format": "json", **ccs_json})["train"]
    assert isinstance(dataset, LocalCaptionDataset) and len(dataset) == 4
    items = [dataset[i] for i in range(len(dataset))]
    assert items[1] is None  # the corrupt image
    check_samples([s for s in items if s is not None])
    batch = dataset.collater(items)
    assert batch["image"].shape == (3, 3, SIZE, SIZE) and int(batch["n_skipped"]) == 1


def test_ccs14m_json_missing_annotation_names_the_key(ccs_json, tmp_path):
    ccs_json["annotations"]["train"]["storage"] = str(tmp_path / "missing.json")
    with pytest.raises(MissingDataError, match=r"datasets\.ccs14M\.build_info\.annotations\.train\.storage"):
        build("ccs14M", {"format": "json", **ccs_json})


# -- run_scripts/evlgen ----------------------------------------------------------------------------

SCRIPTS = {  # script -> (entry point, config)
    "pretrain_opt2.7b.sh": ("train.py", "pretrain_opt.yaml"),
    "pretrain_opt6.7b.sh": ("train.py", "pretrain_opt6.7b.yaml"),
    "pretrain_opt2.7b_10pct.sh": ("train.py", "pretrain_opt_10pct.yaml"),
    "pretrain_vicuna7b.sh": ("train.py", "pretrain_vicuna7b.yaml"),
    "eval_caption_coco.sh": ("evaluate.py", CAPTION_EVAL),
    "eval_vqav2_zeroshot.sh": ("evaluate.py", "eval/vqav2_zeroshot_opt2.7b_eval.yaml"),
    "eval_gqa_zeroshot.sh": ("evaluate.py", "eval/gqa_zeroshot_opt2.7b_eval.yaml"),
    "eval_okvqa_zeroshot.sh": ("evaluate.py", "eval/okvqa_zeroshot_opt2.7b_eval.yaml"),
}


@pytest.fixture
def fake_python(tmp_path):
    """An interpreter stand-in that prints its arguments, one per line."""
    path = tmp_path / "python"
    path.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    path.chmod(0o755)
    return str(path)


def run_script(name, args, fake_python, tmp_path, **env):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "CKPT")}
    full_env.update(PYTHON=fake_python, **env)
    script = os.path.join(REPO, "run_scripts", "evlgen", name)
    return subprocess.run([script, *args], cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_run_script_launches_torchrun_from_the_repo_root(name, fake_python, tmp_path):
    entry, rel = SCRIPTS[name]
    assert os.access(os.path.join(REPO, "run_scripts", "evlgen", name), os.X_OK)
    env = {"CKPT": "/ckpt/checkpoint_250000.pth"} if entry == "evaluate.py" else {}
    done = run_script(name, ["--options", "run.num_workers=2"], fake_python, tmp_path, **env)
    assert done.returncode == 0, done.stderr
    expected = ["-m", "torch.distributed.run", "--nproc_per_node=8", "--standalone", "--nnodes=1", entry,
                "--cfg-path", f"projects/evlgen/{rel}", "--options"]
    if entry == "evaluate.py":
        expected.append("run.checkpoint=/ckpt/checkpoint_250000.pth")
    assert done.stdout.split("\n")[:-1] == expected + ["run.num_workers=2"]
    assert os.path.isfile(os.path.join(REPO, "projects", "evlgen", rel))


def test_run_script_multi_node_and_checkpoint_rules(fake_python, tmp_path):
    multi = run_script("pretrain_opt2.7b.sh", [], fake_python, tmp_path,
                       NPROC="4", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    assert multi.returncode == 0, multi.stderr
    assert multi.stdout.split("\n")[1:7] == ["torch.distributed.run", "--nproc_per_node=4", "--nnodes=2",
                                             "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500"]
    no_addr = run_script("pretrain_opt2.7b.sh", [], fake_python, tmp_path, NNODES="2")
    assert no_addr.returncode == 2 and "MASTER_ADDR" in no_addr.stderr
    no_ckpt = run_script("eval_gqa_zeroshot.sh", [], fake_python, tmp_path)
    assert no_ckpt.returncode == 2 and "CKPT" in no_ckpt.stderr
    given = run_script("eval_gqa_zeroshot.sh", ["--options", "run.checkpoint=/c.pth"], fake_python, tmp_path)
    assert given.returncode == 0 and given.stdout.split("\n")[-3:-1] == ["--options", "run.checkpoint=/c.pth"]
    appended = run_script("eval_gqa_zeroshot.sh", [], fake_python, tmp_path, CKPT="/c.pth")
    assert appended.stdout.split("\n")[-3:-1] == ["--options", "run.checkpoint=/c.pth"]
