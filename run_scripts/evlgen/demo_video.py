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
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    out = os.path.join(ROOT, args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)

    ckpt = None if args.from_scratch else (args.image_ckpt or image_checkpoint())
    if ckpt and not os.path.isfile(ckpt):
        raise SystemExit(f"--image-ckpt {ckpt} does not exist")
    start = f"image demo checkpoint {os.path.relpath(ckpt, ROOT)}" if ckpt else "scratch (no image demo checkpoint)"
    if ckpt:  # a private copy: `make demo` may replace output/demo while this runs
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
        seconds = run([sys.executable, "train.py", "--cfg-path", CFG, "--options", *opts],
                      os.path.join(out, f"{name}.log"))
        run_dir = os.path.join(out, name)
        results = read_json(newest(os.path.join(run_dir, "result", "test_*.json")))
        rows[name] = {"caption": read_json(os.path.join(run_dir, "test_metrics.json")),
                      "motion": motion_scores(results, test_ann), "seconds": seconds,
                      "examples": sorted(results, key=lambda r: str(r["image_id"]))[:6]}

    text = table(rows, iters, batch, start)
    summary = {"start": start, "iters": iters, "total_seconds": round(time.time() - t0, 1), "variants": rows,
               "config": CFG, "command": "make demo-video"}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")
    print("\n================ EVLGen video demo ================")
    print(text)
    print(f"total {summary['total_seconds']:.0f} s; outputs in {os.path.relpath(out, ROOT)}/")


if __name__ == "__main__":
    main()
