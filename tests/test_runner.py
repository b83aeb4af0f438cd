"""runner_evlgen_iter, train.py and evaluate.py on the tiny config (projects/evlgen/tiny/caption_local.yaml).

Subprocess tests run the real command lines (one process, and two ranks under torch.distributed.run
with gloo); in-process tests call the same entry points (``train_main``) for the failure paths.
Everything runs on the CPU in well under a minute of compute.
"""
import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evlgen_lavis  # noqa: F401
from evlgen_lavis.datasets import MissingDataError, TooManySkippedError
from evlgen_lavis.runners import ConfigError, NonFiniteLossError, load_config
from evlgen_lavis.runners import runner_iter as runner_module
from evlgen_lavis.runners.checkpoint import load_checkpoint_file, state_digest, trainable_state
from evlgen_lavis.runners.cli import train_main
from evlgen_lavis.runners.metrics_log import read_metrics
from evlgen_lavis.tasks import EvlgenCaptionTask

REPO = Path(__file__).resolve().parents[1]
CFG = str(REPO / "projects" / "evlgen" / "tiny" / "caption_local.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
MAX_ITERS = 6


def run_script(script, options, cwd, prefix=(), timeout=240):
    cmd = [sys.executable, *prefix, str(REPO / script), "--cfg-path", CFG, "--options", *options]
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def job_dir(out, job_id):
    return Path(out) / job_id


def losses(path):
    return {int(r["iter"]): r for r in read_metrics(path)}


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread like the subprocesses (OMP_NUM_THREADS=1): float reductions then
    happen in the same order, and losses compare exactly across the two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tiny_caption_data):
    return tiny_caption_data()


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """One uninterrupted single-process train.py run of the tiny config (6 iterations)."""
    out = tmp_path_factory.mktemp("full_run")
    run_script("train.py", data[1] + [f"run.output_dir={out}", "run.job_id=full", "run.keep_last_ckpts=1"], out)
    return job_dir(out, "full")


def test_train_py_single_process(full_run):
    files = {p.name for p in full_run.iterdir()}
    assert {"checkpoint_6.pth", "checkpoint_best.pth", "log.txt", "metrics.csv", "test_metrics.json"} <= files
    assert "checkpoint_3.pth" not in files, "run.keep_last_ckpts=1 keeps only the newest numbered checkpoint"
    assert not [f for f in files if f.startswith(".tmp-")], "atomic writes leave no temporary files"

    rows = read_metrics(full_run / "metrics.csv")
    assert [int(r["iter"]) for r in rows] == list(range(MAX_ITERS))
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 and r["n_skipped"] == 0 for r in rows)
    # warmup 1e-4 -> 1e-3 over 2 iterations, then cosine towards min_lr over max_iters
    assert rows[0]["lr"] == pytest.approx(1e-4) and rows[2]["lr"] == pytest.approx(1e-3)
    assert rows[2]["lr"] > rows[3]["lr"] > rows[4]["lr"] > rows[5]["lr"] > 1e-5

    log = [json.loads(line) for line in (full_run / "log.txt").read_text().splitlines() if line.startswith('{"')]
    assert [e["train_iters"] for e in log if "train_iters" in e] == [3, 6]
    assert [e["val_iters"] for e in log if "val_iters" in e] == [3, 6]
    assert any("test_agg_metrics" in e for e in log)

    ckpt = load_checkpoint_file(full_run / "checkpoint_6.pth")
    assert ckpt["iters"] == MAX_ITERS and len(ckpt["rng"]) == 1 and ckpt["world_size"] == 1
    assert all(k.startswith(("tomeformer.", "llm_proj.")) for k in ckpt["model"]), "trainable weights only"
    assert ckpt["rank_digests"] == [state_digest(ckpt["model"])]
    assert ckpt["data"] == {"epoch": 1, "batches": 2}  # 16 samples / batch 4 = 4 batches per epoch
    assert set(ckpt) >= {"optimizer", "lr_scheduler", "scaler", "skips", "best", "config"}


def test_evaluate_py_reproduces_test_metrics(full_run, data, tmp_path):
    proc = run_script("evaluate.py", data[1] + [
        f"run.output_dir={tmp_path}", "run.job_id=eval", f"run.checkpoint={full_run / 'checkpoint_best.pth'}",
    ], tmp_path)
    evaluated = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
    trained = json.loads((full_run / "test_metrics.json").read_text())
    assert evaluated == pytest.approx(trained), proc.stderr[-2000:]


def test_resume_continues_the_same_trajectory(full_run, data, tmp_path):
    common = data[1] + [f"run.output_dir={tmp_path}"]
    run_script("train.py", common + ["run.job_id=half", "run.stop_after_iters=3"], tmp_path)
    half = job_dir(tmp_path, "half")
    assert (half / "checkpoint_3.pth").exists() and not (half / "test_metrics.json").exists()
    run_script("train.py", common + ["run.job_id=resumed", f"run.resume_ckpt_path={half}"], tmp_path)

    expected = losses(full_run / "metrics.csv")
    got = {**losses(half / "metrics.csv"), **losses(job_dir(tmp_path, "resumed") / "metrics.csv")}
    assert sorted(got) == list(range(MAX_ITERS))
    for it in range(MAX_ITERS):
        assert got[it]["loss"] == pytest.approx(expected[it]["loss"], abs=1e-6, rel=0), f"iteration {it}"
        assert got[it]["lr"] == pytest.approx(expected[it]["lr"], rel=1e-12)
    a = load_checkpoint_file(full_run / "checkpoint_6.pth")["model"]
    b = load_checkpoint_file(job_dir(tmp_path, "resumed") / "checkpoint_6.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_rng_restore_diverges(full_run, data, tmp_path, monkeypatch):
    """Control for the test above: the comparison is sensitive to the RNG state (dropout) a resume restores."""
    common = data[1] + [f"run.output_dir={tmp_path}", "run.max_iters=6", "run.valid_splits=[]", "run.test_splits=[]"]
    train_main(["--cfg-path", CFG, "--options", *common, "run.job_id=half", "run.stop_after_iters=3"])
    monkeypatch.setattr(runner_module, "restore_rng_state", lambda state: None)
    train_main(["--cfg-path", CFG, "--options", *common, "run.job_id=resumed",
                f"run.resume_ckpt_path={tmp_path / 'half'}"])
    expected, got = losses(full_run / "metrics.csv"), losses(tmp_path / "resumed" / "metrics.csv")
    assert got[3]["loss"] != pytest.approx(expected[3]["loss"], abs=1e-6)


def test_losses_do_not_depend_on_num_workers(full_run, data, tmp_path):
    """Augmentation is seeded per (seed, epoch, sample), so worker processes give the same batches."""
    run = _train(data[1] + ["run.num_workers=2", "run.valid_splits=[]", "run.test_splits=[]"], tmp_path)
    expected = losses(full_run / "metrics.csv")
    assert [r["loss"] for r in losses(run / "metrics.csv").values()] == [expected[i]["loss"] for i in range(MAX_ITERS)]


def test_ddp_two_ranks_keep_identical_weights(data, tmp_path):
    prefix = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    proc = run_script("train.py", data[1] + [f"run.output_dir={tmp_path}", "run.job_id=ddp"], tmp_path,
                      prefix=prefix)
    run = job_dir(tmp_path, "ddp")
    for name in ("checkpoint_3.pth", "checkpoint_6.pth"):
        ckpt = load_checkpoint_file(run / name)
        assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
        # every rank hashed its own replica before rank 0 saved; all equal the saved weights
        assert ckpt["rank_digests"] == [state_digest(ckpt["model"])] * 2, proc.stderr[-2000:]
        assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"]), "per-rank seeds"
    rows = read_metrics(run / "metrics.csv")
    assert [int(r["iter"]) for r in rows] == list(range(MAX_ITERS))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["epoch"] == 2  # 16 samples / (2 ranks x batch 4) = 2 batches per epoch

    # the 2-rank test phase (best weights reloaded on every rank, results merged) equals one process's
    run_script("evaluate.py", data[1] + [f"run.output_dir={tmp_path}", "run.job_id=eval",
                                        f"run.checkpoint={run / 'checkpoint_best.pth'}"], tmp_path)
    captions = [json.loads((d / "result" / "test_epochbest.json").read_text()) for d in (run, tmp_path / "eval")]
    assert sorted(captions[0], key=str) == sorted(captions[1], key=str)


def test_ddp_with_cached_features_and_accumulation(data, tmp_path):
    """Rank 0 builds the feature caches while rank 1 waits; both train on them with 2-step accumulation."""
    prefix = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    options = data[1] + [f"run.output_dir={tmp_path}", "run.job_id=ddp", "run.max_iters=8",
                         "run.iters_per_inner_epoch=4", "run.accum_grad_iters=2", "run.test_splits=[]",
                         "run.cache_vision_features=true", f"run.feature_cache_dir={tmp_path / 'cache'}"]
    run_script("train.py", options, tmp_path, prefix=prefix)
    assert len(list((tmp_path / "cache").glob("local_caption_*.pt"))) == 3
    ckpt = load_checkpoint_file(tmp_path / "ddp" / "checkpoint_8.pth")
    assert ckpt["rank_digests"] == [state_digest(ckpt["model"])] * 2
    rows = read_metrics(tmp_path / "ddp" / "metrics.csv")
    assert [r["grad_norm"] is not None for r in rows] == [False, True] * 4, "an optimizer step every 2 iterations"


NAN_ON_RANK1 = """
import sys
import torch.distributed as dist
import evlgen_lavis
from evlgen_lavis.runners.cli import train_main
from evlgen_lavis.tasks import EvlgenCaptionTask

original, calls = EvlgenCaptionTask.train_step, [0]

def train_step(self, model, samples):  # NaN loss on rank 1 only, at iteration 2
    loss = original(self, model, samples)
    calls[0] += 1
    return loss * float("nan") if calls[0] == 3 and dist.get_rank() == 1 else loss

EvlgenCaptionTask.train_step = train_step
train_main(sys.argv[1:])
"""


def test_ddp_nonfinite_loss_on_one_rank_skips_everywhere(data, tmp_path):
    """All ranks agree to skip (rank 0's loss was finite): no hang, the replicas stay identical."""
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(NAN_ON_RANK1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--cfg-path", CFG, "--options", *data[1], f"run.output_dir={tmp_path}", "run.job_id=ddp",
           "run.nonfinite_loss=skip", "run.valid_splits=[]", "run.test_splits=[]"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = read_metrics(tmp_path / "ddp" / "metrics.csv")
    assert [r["nonfinite"] for r in rows] == [0, 0, 1, 0, 0, 0]
    ckpt = load_checkpoint_file(tmp_path / "ddp" / "checkpoint_6.pth")
    assert ckpt["nonfinite_skipped"] == 1 and ckpt["rank_digests"] == [state_digest(ckpt["model"])] * 2


# -- units ---------------------------------------------------------------------------------------------


def _lrs(name, iters=8, ipe=4, **run):
    from omegaconf import OmegaConf

    from evlgen_lavis.runners.optim import build_lr_scheduler

    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.0)
    cfg = OmegaConf.create({"init_lr": 1.0, "min_lr": 0.0, "lr_sched": name, **run})
    schedule = build_lr_scheduler(cfg, optimizer, max_iters=iters, iters_per_inner_epoch=ipe)
    return [schedule.step(i) for i in range(iters)]


def test_lr_schedules_by_iteration():
    cosine = _lrs("evlgen_warmup_cosine_iter", warmup_steps=2, warmup_lr=0.0)
    assert cosine[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert cosine[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)])
    assert _lrs("constant_lr", warmup_steps=2, warmup_lr=0.0) == pytest.approx([0, 0.5] + [1.0] * 6)
    # LAVIS's epoch-based schedules see (inner epoch, step) = divmod(iteration, iters_per_inner_epoch)
    assert _lrs("linear_warmup_cosine_lr") == pytest.approx([1.0] * 4 + [0.5] * 4)  # epoch 1 of max_epoch 2
    assert _lrs("linear_warmup_step_lr", lr_decay_rate=0.5) == pytest.approx([1.0] * 4 + [0.5] * 4)
    with pytest.raises(ValueError, match=r"run\.lr_sched='nope'"):
        _lrs("nope")


def test_resumable_sampler_shards_and_resumes():
    from evlgen_lavis.runners.data import ResumableSampler

    shards = [ResumableSampler(10, num_replicas=3, rank=r, seed=1) for r in range(3)]
    for s in shards:
        s.set_epoch(4)
    drawn = [s.indices() for s in shards]
    assert [len(d) for d in drawn] == [4, 4, 4]  # padded to a multiple of the ranks by wrapping around
    assert {i for d in drawn for i in d} == set(range(10))
    shards[0].set_start(2)
    assert list(shards[0]) == drawn[0][2:]
    shards[0].set_epoch(5)
    shards[0].set_start(0)
    assert list(shards[0]) != drawn[0], "each epoch has its own order"


# -- failure paths, in-process ----------------------------------------------------------------------------


def _train(options, tmp_path, job_id="job"):
    train_main(["--cfg-path", CFG, "--options", *options, f"run.output_dir={tmp_path}", f"run.job_id={job_id}"])
    return tmp_path / job_id


def _nan_at(monkeypatch, bad_call):
    """Make the task's training loss NaN on call ``bad_call`` (0-based); records the trainable weights
    seen at the start of each call."""
    seen = {"calls": 0, "states": [], "model": None}
    original = EvlgenCaptionTask.train_step

    def train_step(self, model, samples):
        seen["states"].append(trainable_state(model))
        seen["model"] = model
        loss = original(self, model, samples)
        seen["calls"] += 1
        return loss * float("nan") if seen["calls"] - 1 == bad_call else loss

    monkeypatch.setattr(EvlgenCaptionTask, "train_step", train_step)
    return seen


def test_nan_loss_stops_naming_the_iteration(data, tmp_path, monkeypatch):
    seen = _nan_at(monkeypatch, bad_call=4)
    with pytest.raises(NonFiniteLossError, match=r"iteration 4 \(0-based\): loss = nan"):
        _train(data[1] + ["run.valid_splits=[]"], tmp_path)
    after = trainable_state(seen["model"])
    assert all(torch.equal(after[k], seen["states"][4][k]) for k in after), "weights must be left untouched"


def test_nan_loss_skip_policy_skips_the_update(data, tmp_path, monkeypatch):
    seen = _nan_at(monkeypatch, bad_call=1)
    run = _train(data[1] + ["run.nonfinite_loss=skip", "run.valid_splits=[]", "run.test_splits=[]"], tmp_path)
    rows = read_metrics(run / "metrics.csv")
    assert [r["nonfinite"] for r in rows] == [0, 1, 0, 0, 0, 0]
    assert math.isnan(rows[1]["loss"]) and math.isfinite(rows[2]["loss"])
    assert all(torch.equal(seen["states"][1][k], seen["states"][2][k]) for k in seen["states"][1])
    assert not all(torch.equal(seen["states"][2][k], seen["states"][3][k]) for k in seen["states"][2])
    assert load_checkpoint_file(run / "checkpoint_6.pth")["nonfinite_skipped"] == 1


def test_unreadable_images_are_skipped_and_counted(tiny_caption_data, tmp_path):
    _, options = tiny_caption_data(n_corrupt=3)
    run = _train(options + ["run.max_skip_fraction=0.5", "run.test_splits=[]"], tmp_path)
    rows = read_metrics(run / "metrics.csv")
    ckpt = load_checkpoint_file(run / "checkpoint_6.pth")
    assert ckpt["skips"]["skipped"] == sum(r["n_skipped"] for r in rows) > 0
    assert ckpt["skips"]["seen"] == MAX_ITERS * 4  # every sample of the 6 batches, readable or not
    train_log = [json.loads(line) for line in (run / "log.txt").read_text().splitlines() if '"train_iters"' in line]
    assert train_log[-1]["train_n_skipped_total"] == ckpt["skips"]["skipped"]

    with pytest.raises(TooManySkippedError, match="run.max_skip_fraction"):
        _train(options + ["run.max_skip_fraction=0.0"], tmp_path, job_id="strict")


def test_all_images_unreadable_stops(tiny_caption_data, tmp_path):
    _, options = tiny_caption_data(n_train=0, n_corrupt=8)
    with pytest.raises(TooManySkippedError, match="no readable sample"):
        _train(options, tmp_path)


def test_cached_vision_features(data, tmp_path):
    options = data[1] + ["run.cache_vision_features=true", f"run.feature_cache_dir={tmp_path / 'cache'}",
                         "run.valid_splits=[]"]
    run = _train(options, tmp_path)
    caches = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [c.split("_")[2] for c in caches] == ["test", "train", "val"], caches
    assert all(math.isfinite(r["loss"]) for r in read_metrics(run / "metrics.csv"))
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    _train(options, tmp_path, job_id="again")  # the caches are reused, not rebuilt
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == mtimes


@pytest.mark.parametrize("options, key", [
    (["model.arch=no_such_model"], "model.arch"),
    (["model.model_type=no_such_type"], "model.model_type"),
    (["run.task=no_such_task"], "run.task"),
    (["run.runner=no_such_runner"], "run.runner"),
    (["run.valid_splits=[validation]"], "run.valid_splits"),
])
def test_config_errors_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(["--cfg-path", CFG, "--options", *options])


def test_unknown_dataset_builder_is_named(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(Path(CFG).read_text().replace("  local_caption:", "  no_such_builder:"))
    with pytest.raises(ConfigError, match=r"datasets\.no_such_builder"):
        load_config(["--cfg-path", str(cfg)])


def test_missing_annotation_file_is_named(data, tmp_path):
    options = [o for o in data[1] if ".train." not in o]
    options.append(f"datasets.local_caption.build_info.annotations.train.storage={tmp_path / 'missing.json'}")
    with pytest.raises(MissingDataError, match=r"datasets\.local_caption\.build_info\.annotations\.train\.storage"):
        _train(options, tmp_path)


def test_run_setting_errors_name_the_key(data, tmp_path):
    with pytest.raises(ValueError, match=r"run\.iters_per_inner_epoch=3 is not a multiple of run\.accum_grad_iters=2"):
        _train(data[1] + ["run.accum_grad_iters=2"], tmp_path)
    assert not glob.glob(str(tmp_path / "job" / "*.pth"))
