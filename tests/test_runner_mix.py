"""runner_evlgen_iter on several train datasets (``run.train_dataset_ratios``) and on iterable (webdataset)
train datasets: the per-iteration draw, the streams, a train.py run on local_caption + laion115M shards,
exact resume of a mix of two map-style datasets, and the errors that name the key.

Everything is tiny (the ``tiny`` evlgen_opt, 32 px images, a few iterations) and runs on the CPU.
"""
import io
import json
import logging
import os
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

import evlgen_lavis  # noqa: F401  (registers builders, models, runner)
from evlgen_lavis.datasets import TooManySkippedError
from evlgen_lavis.datasets.paper import WebImageTextDataset
from evlgen_lavis.datasets.skipping import SkipCounter
from evlgen_lavis.runners.checkpoint import load_checkpoint_file
from evlgen_lavis.runners.cli import train_main
from evlgen_lavis.runners.data import IterableStream, TrainStream
from evlgen_lavis.runners.metrics_log import read_metrics
from evlgen_lavis.runners.mix import MixedStream, MixSchedule, mix_uniform, resolve_ratios
from evlgen_lavis.runners.settings import RunSettings

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = REPO / "projects" / "evlgen" / "tiny" / "caption_local.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
SEED = 42  # the tiny config's run.seed
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}
KINDS = [(c, s) for c in COLOURS for s in ("square", "circle")]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as the subprocesses (OMP_NUM_THREADS=1): in-process losses compare exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- tiny data and configs ----------------------------------------------------------------------------


def png_bytes(colour, shape):
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)((6, 6, 26, 26), fill=COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_shards(root, n_shards=2, per_shard=8, corrupt_first=False):
    """``n_shards`` webdataset shards of ``per_shard`` png+json samples ("a red square", ...); with
    ``corrupt_first`` the second sample of the first shard is not an image. Returns the brace pattern."""
    os.makedirs(root, exist_ok=True)
    for k in range(n_shards):
        with tarfile.open(os.path.join(root, f"{k:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                colour, shape = KINDS[(i + k) % len(KINDS)]
                image = b"not an image" if (corrupt_first and k == 0 and i == 1) else png_bytes(colour, shape)
                for ext, data in (("png", image), ("json", json.dumps({"caption": f"a {colour} {shape}"}).encode())):
                    info = tarfile.TarInfo(f"s{k}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(root, "{" + f"{0:05d}..{n_shards - 1:05d}" + "}.tar")


def mix_config(path, datasets, ratios):
    """The tiny config plus ``datasets`` sections and ``run.train_dataset_ratios``, written to ``path``."""
    cfg = OmegaConf.load(TINY_CFG)
    for name, entry in datasets.items():
        cfg.datasets[name] = entry
    if ratios is not None:
        cfg.run.train_dataset_ratios = ratios
    OmegaConf.save(cfg, path)
    return str(path)


IMAGE_TRAIN = {"name": "evlgen_image_train", "image_size": 32}
TEXT = {"name": "blip_caption"}


def laion_entry(storage, **build_info):
    return {"vis_processor": {"train": IMAGE_TRAIN}, "text_processor": {"train": TEXT},
            "build_info": {"storage": storage, **build_info}}


def ccs_json_entry(paths):
    """ccs14M in its json format over a tiny_caption_data train split: a second map-style builder name."""
    return {"vis_processor": {"train": IMAGE_TRAIN}, "text_processor": {"train": TEXT},
            "build_info": {"format": "json", "annotations": {"train": {"storage": paths["train"]}},
                           "images": {"storage": paths["images"]}}}


@pytest.fixture(scope="module")
def caption_data(tiny_caption_data):
    return tiny_caption_data()


def train(cfg, options, out, job_id):
    train_main(["--cfg-path", cfg, "--options", *options, f"run.output_dir={out}", f"run.job_id={job_id}"])
    return Path(out) / job_id


def train_log(run):
    return [json.loads(line) for line in (run / "log.txt").read_text().splitlines() if '"train_iters"' in line]


# -- (a) the per-iteration draw ------------------------------------------------------------------------


def test_draw_follows_the_ratios():
    weights = {"laion115M": 15, "ccs14M": 4, "local_caption": 1}
    schedule = MixSchedule(weights, seed=SEED)
    counts = Counter(schedule.choose(it) for it in range(2000))
    assert set(counts) == set(weights)
    for name, weight in weights.items():
        assert counts[name] / 2000 == pytest.approx(weight / 20, abs=0.03), counts
    # no long runs of one dataset: consecutive iterations are not correlated
    small = [schedule.choose(it) for it in range(400)]
    assert 0.1 < sum(a != b for a, b in zip(small, small[1:])) / 399 < 0.7
    u = [mix_uniform(SEED, it) for it in range(2000)]
    assert all(0.0 <= x < 1.0 for x in u) and abs(sum(u) / len(u) - 0.5) < 0.03
    # another seed draws another sequence; weight 0 is never drawn
    assert [MixSchedule(weights, seed=7).choose(it) for it in range(50)] != small[:50]
    assert "b" not in {MixSchedule({"a": 1, "b": 0}, seed=1).choose(it) for it in range(200)}


def test_draw_is_a_pure_function_of_seed_and_iteration():
    """What makes every DDP rank and every resumed run draw the same dataset: no RNG state, no order."""
    weights = {"a": 3, "b": 1, "c": 2}
    expected = [MixSchedule(weights, SEED).choose(it) for it in range(300)]
    for rank in range(3):  # each rank seeds its global generators differently (setup_seeds(seed + rank))
        random.seed(SEED + rank)
        torch.manual_seed(SEED + rank)
        reordered = dict(reversed(list(weights.items())))  # the datasets section's order does not matter
        schedule = MixSchedule(reordered, SEED)
        assert [schedule.choose(it) for it in range(300)] == expected
        # a run resumed at iteration 120 draws what the uninterrupted one drew
        assert [schedule.choose(it) for it in range(120, 300)] == expected[120:]
    assert mix_uniform(SEED, 1234) == mix_uniform(SEED, 1234) != mix_uniform(SEED, 1235)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, tag, n):
        self.items = [f"{tag}{i}" for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return {"text_input": self.items[index]}

    @staticmethod
    def collater(samples):
        return {"text_input": [s["text_input"] for s in samples]}


def mixed(rank=0, world=1, seed=SEED):
    streams = {tag: TrainStream(ListDataset(tag, n), 2, ListDataset.collater, num_replicas=world, rank=rank,
                                seed=seed, name=tag) for tag, n in (("a", 8), ("b", 6))}
    return MixedStream(streams, {"a": 2, "b": 1}, seed)


def take(stream, start, stop):
    counter = SkipCounter()
    return [(stream.next_nonempty(counter, it)["text_input"], stream.current) for it in range(start, stop)], counter


def test_mixed_stream_resumes_exactly_and_ranks_step_the_same_dataset():
    full, counter = take(mixed(), 0, 20)
    assert counter.seen == 40 and counter.skipped == 0
    first = mixed()
    head, _ = take(first, 0, 7)
    state = first.state_dict()
    assert set(state["mix"]) == {"a", "b"} and sum(state["used"].values()) == 7
    resumed = mixed()
    resumed.load_state_dict(state)
    tail, _ = take(resumed, 7, 20)
    assert head + tail == full
    assert dict(resumed.used) == dict(Counter(name for _, name in full))

    ranks = [take(mixed(rank=r, world=2), 0, 12)[0] for r in range(2)]
    assert [name for _, name in ranks[0]] == [name for _, name in ranks[1]], "every rank draws the same dataset"
    # within one epoch of a dataset the two ranks read disjoint samples
    epoch0 = [sum([batch for batch, name in rank if name == "a"][:2], []) for rank in ranks]  # 8 / (2 x 2)
    assert len(epoch0[0]) == 4 and not set(epoch0[0]) & set(epoch0[1])


def test_checkpoint_data_formats_load_across_setups(caplog):
    """A single-stream checkpoint's {"epoch", "batches"} still loads into a single stream; loading it into
    a mix (or a mix's state into a single stream) warns and starts the data from the beginning."""
    single = TrainStream(ListDataset("a", 8), 2, ListDataset.collater, seed=SEED)
    single.load_state_dict({"epoch": 1, "batches": 3})
    assert single.state_dict() == {"epoch": 1, "batches": 3}
    with caplog.at_level(logging.WARNING):
        stream = mixed()
        stream.load_state_dict({"epoch": 1, "batches": 3})
        assert all(s.state_dict() == {"epoch": 0, "batches": 0} for s in stream.streams.values())
        single.load_state_dict(mixed().state_dict())
        assert single.state_dict() == {"epoch": 0, "batches": 0}
    assert "single training stream" in caplog.text and "different training-data setup" in caplog.text


def test_ratio_forms_and_errors():
    names = ["laion115M", "ccs14M", "local_caption"]
    assert resolve_ratios({"ccs14M": 4, "laion115M": 15, "local_caption": 1}, names) == \
        {"laion115M": 15.0, "ccs14M": 4.0, "local_caption": 1.0}
    assert resolve_ratios([15, 4, 1], names) == {"laion115M": 15.0, "ccs14M": 4.0, "local_caption": 1.0}
    assert resolve_ratios(OmegaConf.create({"a": 1}), ["a"]) == {"a": 1.0}
    assert resolve_ratios(None, names) is None
    with pytest.raises(ValueError, match=r"run\.train_dataset_ratios\.coco_caption: there is no train dataset "
                                         r"named 'coco_caption'; the train datasets are \['laion115M'"):
        resolve_ratios({"laion115M": 15, "ccs14M": 4, "coco_caption": 1}, names)
    with pytest.raises(ValueError, match=r"no weight to the train dataset\(s\) \['local_caption'\]"):
        resolve_ratios({"laion115M": 15, "ccs14M": 4}, names)
    with pytest.raises(ValueError, match="lists 2 weight"):
        resolve_ratios([1, 2], names)
    with pytest.raises(ValueError, match=r"run\.train_dataset_ratios\.ccs14M must be a non-negative number"):
        resolve_ratios({"laion115M": 1, "ccs14M": -4, "local_caption": 1}, names)
    with pytest.raises(ValueError, match="sum to 0"):
        resolve_ratios([0, 0, 0], names)
    with pytest.raises(ValueError, match=r"run\.train_dataset_ratios\[1\] must be a number"):
        RunSettings.from_run_cfg(OmegaConf.create({"max_iters": 2, "train_dataset_ratios": [1, "x"]}))


# -- iterable (webdataset) stream ------------------------------------------------------------------------


def test_iterable_stream_restarts_passes_and_counts_skips(tmp_path):
    from lavis.common.registry import registry

    processor = registry.get_processor_class("evlgen_image_eval").from_config(OmegaConf.create({"image_size": 16}))
    shards = write_shards(str(tmp_path), n_shards=2, per_shard=3, corrupt_first=True)  # 5 readable samples
    dataset = WebImageTextDataset(sorted(str(p) for p in tmp_path.glob("*.tar")), processor, resample=False,
                                  shuffle_buffer=0)
    assert shards.endswith("{00000..00001}.tar")
    stream = IterableStream(dataset, 2, dataset.collater, seed=SEED, name="laion115M")
    counter = SkipCounter()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    sizes = [len(stream.next_nonempty(counter)["text_input"]) for _ in range(7)]
    assert torch.equal(torch.get_rng_state(), before), "the pipeline runs under its own generator states"
    assert sizes == [2, 2, 1, 2, 2, 1, 2]  # passes of 5 samples, the last batch of a pass smaller
    assert stream.epoch == 2 and stream.batches == 1
    assert counter.skipped == 3 and counter.seen == 12 + 3  # the corrupt sample, in each of the 3 passes begun
    assert stream.state_dict() == {"kind": "iterable", "epoch": 2, "batches": 1}

    bad = tmp_path / "bad" / "00000.tar"  # captions without images: every sample is skipped
    bad.parent.mkdir()
    with tarfile.open(bad, "w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"s{i}.txt")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"a cat"))
    empty = WebImageTextDataset([str(bad)], processor, resample=False, shuffle_buffer=0)
    with pytest.raises(TooManySkippedError, match="no batch in a whole pass"):
        next(IterableStream(empty, 2, empty.collater, name="laion115M"))


# -- (b) train.py on local_caption + laion115M shards ------------------------------------------------------


def test_train_py_on_a_map_and_webdataset_mix(caption_data, tmp_path):
    paths, options = caption_data
    storage = write_shards(str(tmp_path / "shards"), corrupt_first=True)
    ratios = {"local_caption": 1, "laion115M": 3}
    cfg = mix_config(tmp_path / "mix.yaml", {"laion115M": laion_entry(storage, resample=False, shuffle_buffer=0)},
                     ratios)
    max_iters = 10
    expected = Counter(MixSchedule(ratios, SEED).choose(it) for it in range(max_iters))
    assert expected["laion115M"] > 4 and expected["local_caption"] > 0  # a second pass over the 15 good samples
    cmd = [sys.executable, str(REPO / "train.py"), "--cfg-path", cfg, "--options", *options,
           f"run.output_dir={tmp_path}", "run.job_id=mix", f"run.max_iters={max_iters}",
           f"run.iters_per_inner_epoch={max_iters}", "run.test_splits=[]", "run.max_skip_fraction=0.5"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    run = tmp_path / "mix"

    rows = read_metrics(run / "metrics.csv")
    assert [int(r["iter"]) for r in rows] == list(range(max_iters))
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e3 for r in rows), "finite losses"
    log = train_log(run)[-1]
    assert {k: v for k, v in log.items() if k.startswith("train_batches_")} == \
        {f"train_batches_{name}": n for name, n in expected.items()}
    assert "[laion115M]" in proc.stderr and "[local_caption]" in proc.stderr

    ckpt = load_checkpoint_file(run / f"checkpoint_{max_iters}.pth")
    data = ckpt["data"]
    assert set(data["mix"]) == {"local_caption", "laion115M"} and data["used"] == dict(expected)
    assert data["mix"]["laion115M"]["kind"] == "iterable" and data["mix"]["laion115M"]["epoch"] >= 1
    assert ckpt["skips"]["skipped"] >= 1 and ckpt["skips"]["skipped"] == sum(r["n_skipped"] for r in rows)
    assert any("val_iters" in json.loads(line) for line in (run / "log.txt").read_text().splitlines()
               if line.startswith('{"val'))


# -- (c) exact resume of a mix of two map-style datasets ------------------------------------------------


def test_resume_of_a_map_style_mix_continues_the_same_trajectory(caption_data, tiny_caption_data, tmp_path):
    _, options = caption_data
    second, _ = tiny_caption_data(n_train=12)
    cfg = mix_config(tmp_path / "mix.yaml", {"ccs14M": ccs_json_entry(second)}, {"local_caption": 1, "ccs14M": 2})
    common = options + ["run.max_iters=8", "run.iters_per_inner_epoch=4", "run.valid_splits=[]",
                        "run.test_splits=[]"]
    full = train(cfg, common, tmp_path, "full")
    half = train(cfg, common + ["run.stop_after_iters=4"], tmp_path, "half")
    resumed = train(cfg, common + [f"run.resume_ckpt_path={half}"], tmp_path, "resumed")

    expected = {int(r["iter"]): r for r in read_metrics(full / "metrics.csv")}
    got = {int(r["iter"]): r for r in read_metrics(half / "metrics.csv") + read_metrics(resumed / "metrics.csv")}
    assert sorted(got) == list(range(8))
    for it in range(8):
        assert got[it]["loss"] == pytest.approx(expected[it]["loss"], abs=1e-6, rel=0), f"iteration {it}"
        assert got[it]["epoch"] == expected[it]["epoch"]
    a = load_checkpoint_file(full / "checkpoint_8.pth")
    b = load_checkpoint_file(resumed / "checkpoint_8.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["data"] == b["data"] and set(a["data"]["mix"]) == {"local_caption", "ccs14M"}
    assert all(v > 0 for v in a["data"]["used"].values())
    assert a["data"]["mix"]["local_caption"] != a["data"]["mix"]["ccs14M"]
    used_half = train_log(half)[-1]
    assert used_half["train_batches_local_caption"] + used_half["train_batches_ccs14M"] == 4


# -- (d) errors ----------------------------------------------------------------------------------------------


def test_unknown_ratio_name_is_named(caption_data, tmp_path):
    _, options = caption_data
    with pytest.raises(ValueError, match=r"run\.train_dataset_ratios\.coco_caption: there is no train dataset "
                                         r"named 'coco_caption'; the train datasets are \['local_caption'\]"):
        train(str(TINY_CFG), options + ["run.train_dataset_ratios.coco_caption=1"], tmp_path, "job")
    assert not list((tmp_path / "job").glob("*.pth"))


def test_feature_caching_refuses_webdatasets(caption_data, tmp_path):
    _, options = caption_data
    storage = write_shards(str(tmp_path / "shards"))
    cfg = mix_config(tmp_path / "mix.yaml", {"laion115M": laion_entry(storage)}, {"local_caption": 1, "laion115M": 1})
    with pytest.raises(ValueError, match=r"run\.cache_vision_features: train dataset 'laion115M' is an iterable"):
        train(cfg, options + ["run.cache_vision_features=true", f"run.feature_cache_dir={tmp_path / 'cache'}"],
              tmp_path, "job")
    assert not (tmp_path / "cache").exists()
