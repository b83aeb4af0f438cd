"""The offline video demo (``make demo-video``): does the temporal module know which way things move?

Trains and tests evlgen_video_llama ``demo`` on synthetic clips of a coloured shape moving left, right, up
or down ("a red circle moves to the left"; mp4 files generated once under the cache) in three variants,
each through ``train.py`` with projects/evlgen/video/demo_motion_shapes.yaml:

    frame_mean    no temporal module: frame features averaged (model.temporal.placement=none)
    paper         the paper's temporal attention on the encoder's output tokens (order_aware=False)
    order_aware   the same with the zero-initialised temporal position embedding (order_aware=True)

All three start from the image demo's checkpoint (``make demo``: the last
output/demo/caption/run/checkpoint_<iters>.pth) when there is one, else from scratch, and share one cache
of frozen per-frame EfficientNet features. It
reports caption metrics (BLEU-4, METEOR, ROUGE-L, CIDEr, exact match) and, from the generated captions,
direction accuracy (the right one of four), axis accuracy (horizontal vs vertical) and how often the
opposite direction was named. Outputs: ``<out>/results.json``, ``<out>/results.md`` and one run directory
per variant. Usage: ``python run_scripts/evlgen/demo_video.py [--max-iters N] [--image-ckpt PATH |
--from-scratch] [--variants a,b] [--out DIR]``.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = "projects/evlgen/video/demo_motion_shapes.yaml"
IMAGE_RUN = "output/demo/caption/run"  # where `make demo` leaves its checkpoint_<iters>.pth
VARIANTS = {
    "frame_mean": ["model.temporal.placement=none"],
    "paper": ["model.temporal.placement=output", "model.temporal.order_aware=False"],
    "order_aware": ["model.temporal.placement=output", "model.temporal.order_aware=True"],
}
LABELS = {"frame_mean": "frame mean, no temporal module", "paper": "temporal attention (paper)",
          "order_aware": "temporal attention + position embedding (order-aware)"}


def child_env():
    """Offline, and one OpenMP thread per process when the machine is already busy: two threads on two
    shared cores wait on each other (measured here: 15 s per step instead of 2)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if "OMP_NUM_THREADS" not in env and os.getloadavg()[0] >= 1.0:
        print(f"load average {os.getloadavg()[0]:.1f}: running with OMP_NUM_THREADS=1 (set it to override)")
        env["OMP_NUM_THREADS"] = "1"
    return env


def run(cmd, log_path):
    """Run a command from the repo root, echoing its output and keeping a copy in ``log_path``."""
    print("+", " ".join(cmd), flush=True)
    env = child_env()
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if "Warning" not in line and "warnings.warn" not in line:
                sys.stdout.write(line)
            log.write(line)
        if proc.wait() != 0:
            raise SystemExit(f"command failed (exit {proc.returncode}); its output is in {log_path}")
    return time.time() - start


def image_checkpoint():
    """The image demo's last numbered checkpoint (what it tests), or None."""
    from evlgen_lavis.runners.checkpoint import numbered_checkpoints

    found = numbered_checkpoints(os.path.join(ROOT, IMAGE_RUN))
    return found[-1][1] if found else None


def newest(pattern):
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    return found[-1] if found else None


def read_json(path):
    with open(path) as f:
        return json.load(f)


def clips_dir():
    """Generate (once) the clips the config describes; returns their directory."""
    from omegaconf import OmegaConf

    from evlgen_lavis.datasets.motion_clips import prepare_motion_clips

    info = OmegaConf.load(os.path.join(ROOT, CFG)).datasets.motion_shapes_caption.build_info
    keys = ("n_train", "n_val", "n_test", "n_frames", "size", "seed", "cache_dir")
    return prepare_motion_clips(**{k: info.get(k) for k in keys if info.get(k) is not None})


def cached_features_path(log_path, split):
    """The per-frame feature cache a variant's run used for ``split`` (the runner logs it)."""
    pattern = re.compile(rf"motion_shapes_caption/{split}: using cached vision features (\S+)")
    with open(log_path) as f:
        for line in f:
            found = pattern.search(line)
            if found:
                return found.group(1)
    raise SystemExit(f"{log_path} names no cached features for {split}: was run.cache_vision_features on?")


def direction_probe(log_path, directory, steps=200, batch=16, seed=0):
    """What each variant's temporal stage can *represent*, without the LLM: on the same cached frozen
    per-frame features, train only [temporal module ->] frame mean -> LayerNorm -> token mean -> linear
    classifier of the direction (module settings, lr and weight decay from the demo configs), then test it.
    Returns ``{variant: {"direction", "axis", "same_on_reversed"}}``."""
    import torch
    from omegaconf import OmegaConf
    from torch import nn

    from evlgen_lavis.common import config_path
    from evlgen_lavis.datasets.motion_clips import DIRECTIONS
    from evlgen_lavis.models.temporal import TemporalAttention, frames

    temporal = OmegaConf.load(config_path("models", "evlgen_video_llama", "demo.yaml")).model.temporal
    run_cfg = OmegaConf.load(os.path.join(ROOT, CFG)).run
    index = {d: i for i, d in enumerate(DIRECTIONS)}

    def load(split):
        cache = torch.load(cached_features_path(log_path, split), map_location="cpu", mmap=True, weights_only=True)
        by_video = {a["video"]: a["direction"] for a in read_json(os.path.join(directory, f"caption_{split}.json"))}
        labels = torch.tensor([index[by_video[k]] for k in cache["keys"]])
        return cache["features"].float(), labels  # (M, T, N, C), (M,)

    (x_train, y_train), (x_test, y_test) = load("train"), load("test")
    width = x_train.shape[-1]
    results = {}
    for name in VARIANTS:
        torch.manual_seed(seed)
        module = None
        if name != "frame_mean":
            module = TemporalAttention(width, temporal.hidden_dim, temporal.num_heads, order_aware=(name == "order_aware"),
                                       max_frames=temporal.max_frames, gain=temporal.gain)
        norm, head = nn.LayerNorm(width), nn.Linear(width, len(index))
        parts = [norm, head] + ([module] if module is not None else [])
        params = [p for part in parts for p in part.parameters()]
        optimizer = torch.optim.AdamW(params, lr=float(run_cfg.init_lr), weight_decay=float(run_cfg.weight_decay))

        def predict(x):
            B, T, N, C = x.shape
            if module is not None:
                with frames([module], T):
                    x = module(x.reshape(B * T, N, C)).view(B, T, N, C)
            return head(norm(x.mean(1)).mean(1))  # (B, 4)

        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            pick = torch.randint(0, len(x_train), (batch,), generator=generator)
            loss = nn.functional.cross_entropy(predict(x_train[pick]), y_train[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            pred, pred_rev = predict(x_test).argmax(-1), predict(x_test.flip(1)).argmax(-1)
        results[name] = {"direction": (pred == y_test).float().mean().item(),
                         "axis": ((pred // 2) == (y_test // 2)).float().mean().item(),
                         "same_on_reversed": (pred == pred_rev).float().mean().item()}
    return results


def probe_table(probe, steps=200):
    lines = ["| variant | direction acc. | axis acc. | same prediction for the reversed clip |", "|---|---|---|---|"]
    for name, r in probe.items():
        lines.append(f"| {LABELS[name]} | {r['direction']:.3f} | {r['axis']:.3f} | {r['same_on_reversed']:.3f} |")
    lines.append("")
    lines.append(f"Direction probe: the variant's temporal stage + LayerNorm + token mean + a linear classifier, "
                 f"{steps} steps of batch 16 on the same cached per-frame features (no LLM).")
    return "\n".join(lines)


def table(rows, iters, batch, start):
    lines = [
        f"| variant | BLEU-4 | METEOR | ROUGE-L | CIDEr | exact match | direction acc. | axis acc. | "
        f"opposite direction | colour+shape | train+test s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        m, s = r["caption"], r["motion"]
        lines.append(
            f"| {LABELS[name]} | {m.get('Bleu_4', float('nan')):.3f} | {m.get('METEOR', float('nan')):.3f} | "
            f"{m.get('ROUGE_L', float('nan')):.3f} | {m.get('CIDEr', float('nan')):.3f} | "
            f"{m.get('exact_match', float('nan')):.3f} | {s['direction']:.3f} | {s['axis']:.3f} | "
            f"{s['reversed_direction']:.3f} | {s['appearance']:.3f} | {r['seconds']:.0f} |")
    lines.append("")
    lines.append(f"{rows[next(iter(rows))]['motion']['n']} test clips, {iters} training iterations of batch {batch} "
                 f"per variant, start: {start}. Chance: direction 0.25, axis 0.5.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/demo_video", help="output directory (replaced)")
    parser.add_argument("--max-iters", type=int, default=None, help="override run.max_iters (quick check)")
    parser.add_argument("--image-ckpt", default=None,
                        help=f"image demo checkpoint (default: the last {IMAGE_RUN}/checkpoint_<iters>.pth)")
    parser.add_argument("--from-scratch", action="store_true", help="ignore any image demo checkpoint")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--rescore", action="store_true",
                        help="do not train: score the runs already in --out again (and redo the probe)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    out = os.path.join(ROOT, args.out)
    previous = read_json(os.path.join(out, "results.json")) if args.rescore else {}
    if not args.rescore:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)

    ckpt = None if args.from_scratch else (args.image_ckpt or image_checkpoint())
    if ckpt and not os.path.isfile(ckpt):
        raise SystemExit(f"--image-ckpt {ckpt} does not exist")
    start = f"image demo checkpoint {os.path.relpath(ckpt, ROOT)}" if ckpt else "scratch (no image demo checkpoint)"
    start = previous.get("start", start)
    if ckpt and not args.rescore:  # a private copy: `make demo` may replace output/demo while this runs
        shutil.copyfile(ckpt, os.path.join(out, "image_checkpoint.pth"))
        ckpt = os.path.join(out, "image_checkpoint.pth")
    print(f"video demo: starting from {start}", flush=True)
    directory = clips_dir()
    test_ann = read_json(os.path.join(directory, "caption_test.json"))

    from omegaconf import OmegaConf

    from evlgen_lavis.datasets.motion_clips import motion_scores

    run_cfg = OmegaConf.load(os.path.join(ROOT, CFG)).run
    iters, batch = args.max_iters or int(run_cfg.max_iters), int(run_cfg.batch_size_train)
    rows, t0 = {}, time.time()
    for name in variants:
        opts = [f"run.output_dir={out}", f"run.job_id={name}", *VARIANTS[name]]
        if ckpt:
            opts.append(f"model.pretrained={ckpt}")
        if args.max_iters:
            opts += [f"run.max_iters={args.max_iters}", f"run.iters_per_inner_epoch={args.max_iters}"]
        if args.rescore:
            seconds = previous.get("variants", {}).get(name, {}).get("seconds", float("nan"))
        else:
            seconds = run([sys.executable, "train.py", "--cfg-path", CFG, "--options", *opts],
                          os.path.join(out, f"{name}.log"))
        run_dir = os.path.join(out, name)
        results = read_json(newest(os.path.join(run_dir, "result", "test_*.json")))
        rows[name] = {"caption": read_json(os.path.join(run_dir, "test_metrics.json")),
                      "motion": motion_scores(results, test_ann), "seconds": seconds,
                      "examples": sorted(results, key=lambda r: str(r["image_id"]))[:6]}

    print("direction probe (no LLM) on the cached features ...", flush=True)
    probe = direction_probe(os.path.join(out, f"{variants[0]}.log"), directory)
    text = table(rows, iters, batch, start) + "\n\n" + probe_table(probe)
    total = previous.get("total_seconds", 0.0) if args.rescore else time.time() - t0
    summary = {"start": start, "iters": iters, "total_seconds": round(total, 1), "variants": rows,
               "direction_probe": probe, "config": CFG, "command": "make demo-video"}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")
    print("\n================ EVLGen video demo ================")
    print(text)
    print(f"total {summary['total_seconds']:.0f} s; outputs in {os.path.relpath(out, ROOT)}/")


if __name__ == "__main__":
    main()
