"""The offline demo, end to end on a CPU (``make demo``).

1. train evlgen_llama `demo` on easy-vqa captions through ``train.py`` (which also evaluates the test
   captions: BLEU, METEOR, ROUGE-L, CIDEr and exact colour+shape accuracy);
2. zero-shot VQA on easy-vqa's test questions through ``evaluate.py`` with the trained weights;
3. a results table (printed and ``results.json``), ``loss_curve.png`` and ``captions.png`` (test images
   with their generated captions), all in ``output/demo/``.

Everything comes from installed packages: no network. Usage: ``python run_scripts/evlgen/demo.py
[--max-iters N] [--out DIR]``.
"""
import argparse
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPTION_CFG = "projects/evlgen/demo/caption_easy_vqa.yaml"
VQA_CFG = "projects/evlgen/demo/vqa_easy_vqa_zeroshot.yaml"


def run(cmd, log_path):
    """Run a command from the repo root, echoing its output and keeping a copy in ``log_path``."""
    print("+", " ".join(cmd), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        if proc.wait() != 0:
            raise SystemExit(f"command failed (exit {proc.returncode}); its output is in {log_path}")
    return time.time() - start


def read_json(path):
    with open(path) as f:
        return json.load(f)


def newest(pattern):
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"expected a file matching {pattern}, found none")
    return found[-1]


def plot_loss(metrics_csv, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss") not in (None, "")]
    iters = [int(r["iter"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(iters, loss)
    ax.set_xlabel("iteration")
    ax.set_ylabel("LM loss (caption tokens)")
    ax.set_yscale("log")
    ax.set_title("EVLGen demo: SmolLM2-135M + TomeFormer(MiniLM) + EfficientNet-Lite0")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def caption_grid(results, annotation, images_root, path, n=24):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    refs = {a["image_id"]: a for a in annotation}
    results = sorted(results, key=lambda r: str(r["image_id"]))[:n]
    cols = 6
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.0, rows * 2.3))
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, results):
        ann = refs[r["image_id"]]
        truth = ann["caption"] if isinstance(ann["caption"], str) else ann["caption"][0]
        ax.imshow(Image.open(os.path.join(images_root, ann["image"])).convert("RGB"))
        ok = r["caption"].strip().lower() == truth.strip().lower()
        ax.set_title(r["caption"], fontsize=8, color="green" if ok else "red")
    fig.suptitle("test images, generated captions (green = exact colour+shape)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/demo", help="output directory (replaced)")
    parser.add_argument("--max-iters", type=int, default=None, help="override run.max_iters (quick check)")
    args = parser.parse_args()
    out = os.path.join(ROOT, args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    py = sys.executable
    t0 = time.time()

    opts = [f"run.output_dir={out}/caption", "run.job_id=run"]
    if args.max_iters:
        half = max(args.max_iters // 2, 1)
        opts += [f"run.max_iters={args.max_iters}", f"run.iters_per_inner_epoch={half}", f"run.save_every={half}"]
    train_s = run([py, "train.py", "--cfg-path", CAPTION_CFG, "--options", *opts], os.path.join(out, "train.log"))
    run_dir = os.path.join(out, "caption", "run")
    numbered = glob.glob(os.path.join(run_dir, "checkpoint_[0-9]*.pth"))
    if not numbered:
        raise SystemExit(f"no checkpoint_<iters>.pth in {run_dir}")
    ckpt = max(numbered, key=lambda p: int(os.path.basename(p)[len("checkpoint_"):-len(".pth")]))  # the last
    test_metrics = read_json(os.path.join(run_dir, "test_metrics.json"))

    vqa_opts = [f"run.output_dir={out}/vqa", "run.job_id=run", f"model.pretrained={ckpt}"]
    vqa_s = run([py, "evaluate.py", "--cfg-path", VQA_CFG, "--options", *vqa_opts], os.path.join(out, "vqa.log"))
    vqa_metrics = read_json(os.path.join(out, "vqa", "run", "test_metrics.json"))

    plot_loss(os.path.join(run_dir, "metrics.csv"), os.path.join(out, "loss_curve.png"))
    from evlgen_lavis.datasets.easyvqa import images_root, prepare_easy_vqa

    ann_dir = prepare_easy_vqa()
    annotation = read_json(os.path.join(ann_dir, "caption_test.json"))
    results = read_json(newest(os.path.join(run_dir, "result", "test_*.json")))
    caption_grid(results, annotation, images_root(), os.path.join(out, "captions.png"))

    summary = {
        "caption_test": {k: test_metrics[k] for k in ("exact_match", "Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
                         if k in test_metrics},
        "caption_test_images": len(results),
        "vqa_zeroshot_test": vqa_metrics,
        "train_and_test_seconds": round(train_s, 1),
        "vqa_eval_seconds": round(vqa_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "checkpoint": os.path.relpath(ckpt, ROOT),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n================ EVLGen offline demo ================")
    for k, v in summary["caption_test"].items():
        print(f"caption test  {k:<12} {v:8.4f}")
    print(f"caption test  images       {len(results):8d}")
    acc = vqa_metrics.get("accuracy", vqa_metrics.get("agg_metrics"))
    print(f"zero-shot VQA accuracy     {acc:8.2f} %")
    print(f"train + test captions      {train_s:8.1f} s")
    print(f"zero-shot VQA evaluation   {vqa_s:8.1f} s")
    print(f"total                      {summary['total_seconds']:8.1f} s")
    print(f"outputs in {os.path.relpath(out, ROOT)}/: results.json, loss_curve.png, captions.png, train.log, "
          f"{os.path.relpath(ckpt, out)}")


if __name__ == "__main__":
    main()
