"""The paper's claim in miniature: caption quality against wall-clock, EVLGen vs BLIP-2, same budget each.

    python benchmarks/convergence.py [--budget 400] [--evals 4] [--eval-images 150] [--clock wall|cpu] [--threads N]
                                     [--out benchmarks/results/convergence.md]

On easy-vqa's captions ("a blue rectangle") with the demo backbones (frozen EfficientNet-Lite0 features,
cached; frozen SmolLM2-135M), each variant trains for the same wall-clock budget (evaluation time excluded):

    EVLGen            the demo type's TomeFormer (from MiniLM, 6 layers; its yaml's r: 49 -> 13 tokens), LM loss
    BLIP-2 LM only    a fresh Q-Former (LAVIS's Qformer.py, initialised from the same MiniLM with the same config
                      overrides, cross-attention every 2nd layer, 32 queries) on the LM loss alone, one stage
    BLIP-2 2-stage    the same Q-Former: stage 1 = LAVIS's Blip2Qformer.forward (ITC + ITM + ITG) for
                      --stage1-frac of the budget, then stage 2 (LM loss) for the rest
    EVLGen 10% data   EVLGen on a fixed random 1/10 of the training images

LAVIS's Blip2OPT is OPT-only and SmolLM2 is LLaMA-architecture, so BLIP-2's stage 2 here is its Q-Former
(+ linear projection) put in the EVLGen harness in front of SmolLM2: the LLM, its inputs, the LM loss and
greedy generation are the same code for every variant; only the connector differs.

Greedy captions of a fixed test subset are scored at evenly spaced points of training wall-clock with
``compute_caption_metrics`` (CIDEr, exact match = colour+shape accuracy). The report gives the time each
variant needs to reach the targets (linearly interpolated between evaluations) and its ratio to EVLGen's,
plus a PNG of the curves. ``--model tiny`` runs the same pipeline on the random `tiny` type (tests).
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (sets the offline environment first)

import torch  # noqa: E402
from torch import nn  # noqa: E402

COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
DEFAULT_QUERIES = 32  # BLIP-2's
VARIANTS = ("evlgen", "blip2_lm", "blip2_2stage", "evlgen_10pct")
LABELS = {"evlgen": "EVLGen", "blip2_lm": "BLIP-2 LM only", "blip2_2stage": "BLIP-2 2-stage",
          "evlgen_10pct": "EVLGen 10% data"}


# -- data ---------------------------------------------------------------------------------------------

def build_splits(image_size, demo):
    """easy_vqa_caption train/test datasets as the demo config builds them, and the eval processor config."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from evlgen_lavis.common import config_path

    default = OmegaConf.load(config_path("datasets", "easy_vqa", "defaults_caption.yaml")).datasets.easy_vqa_caption
    if demo:
        user = OmegaConf.load(os.path.join(benchlib.ROOT, "projects/evlgen/demo/caption_easy_vqa.yaml"))
        cfg = OmegaConf.merge(default, user.datasets.easy_vqa_caption)
    else:
        cfg = OmegaConf.merge(default, {"vis_processor": {"eval": {"name": "evlgen_image_eval",
                                                                     "image_size": image_size}}})
    cfg.build_info.splits = ["train", "test"]
    datasets = registry.get_builder_class("easy_vqa_caption")(cfg).build_datasets()
    return datasets, cfg


def split_features(model, dataset, cfg, indices, log):
    """Frozen features (n, N, C) of ``dataset[indices]``: from the runner's feature cache file when the whole
    split is used (built once if missing; the same file ``run.cache_vision_features`` uses), else encoded here."""
    from evlgen_lavis.common import CACHE_ROOT
    from evlgen_lavis.datasets import build_feature_cache
    from evlgen_lavis.runners.vision_cache import cache_key, eval_processor

    processor, proc_cfg = eval_processor("easy_vqa_caption", cfg)
    if len(indices) == len(dataset):
        path = os.path.join(CACHE_ROOT, "features",
                            f"easy_vqa_caption_{dataset_split(dataset)}_{cache_key(model, dataset, proc_cfg)}.pt")
        if not os.path.exists(path):
            log(f"encoding {len(dataset)} images into {path} (once)")
        build_feature_cache(dataset, model.encode_image, path, vis_processor=processor)
        cache = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        rows = cache["index"][torch.as_tensor(indices)]
        if not bool(cache["valid"][rows].all()):
            raise RuntimeError(f"{path} marks some images unreadable")
        return cache["features"][rows].clone()  # (n, N, C) in memory
    out = []
    with torch.no_grad():
        for start in range(0, len(indices), 64):
            images = torch.stack([dataset.load_image(i, vis_processor=processor) for i in indices[start:start + 64]])
            out.append(model.encode_image(images).cpu())
    return torch.cat(out)


def dataset_split(dataset):
    return "train" if "caption_train" in dataset.ann_paths[0] else "test"


def colour_shape(caption):
    words = set(re.findall(r"[a-z]+", caption.lower()))
    colours = [c for c in COLOURS if c in words]
    shapes = [s for s in SHAPES if s in words]
    return (colours[0] if len(colours) == 1 else None), (shapes[0] if len(shapes) == 1 else None)


# -- models -------------------------------------------------------------------------------------------

def build_base(kind):
    from lavis.common.registry import registry

    arch = "evlgen_llama" if kind == "demo" else "evlgen_opt"
    return registry.get_model_class(arch).from_pretrained(kind)


def tomeformer_cfg(kind):
    from omegaconf import OmegaConf

    from evlgen_lavis.common import config_path

    arch = "evlgen_llama" if kind == "demo" else "evlgen_opt"
    cfg = OmegaConf.load(config_path("models", arch, f"{kind}.yaml")).model.tomeformer
    return OmegaConf.to_container(cfg, resolve=True)


def fresh_evlgen_connector(model, kind, seed, r=None):
    """A new TomeFormer (from MiniLM for the demo) and llm_proj, seeded; ``r`` overrides the type's merge
    schedule (0: no merging)."""
    cfg = tomeformer_cfg(kind)
    if r is not None:
        cfg["r"] = r
    torch.manual_seed(seed)
    model.tomeformer = model._build_tomeformer(cfg, model.visual_encoder)
    model.llm_proj = nn.Linear(model.tomeformer.hidden_size, model.llm_model.get_input_embeddings().embedding_dim)
    model.num_soft_tokens = model.tomeformer.check_input_tokens(model.visual_encoder.num_tokens)
    return model


def fresh_qformer(model, kind, seed, num_queries):
    """LAVIS's Q-Former, comparable to the TomeFormer: same BERT (MiniLM for the demo, with the TomeFormer's
    config overrides; the tiny config otherwise), cross-attention every 2nd layer, ``num_queries`` learned
    queries; + the [DEC] tokenizer."""
    from blip2_offline import bert_tokenizer, build_qformer, qformer_config

    from evlgen_lavis.models.assets import minilm_dir

    tok = bert_tokenizer(minilm_dir())
    width = model.visual_encoder.num_features
    torch.manual_seed(seed)
    if kind == "demo":  # the TomeFormer's config overrides too (the demo's: no dropout, see its yaml)
        cfg = qformer_config(width, num_queries, base=minilm_dir(), **tomeformer_cfg(kind).get("config", {}))
        qformer, queries = build_qformer(cfg, bert_path=minilm_dir(), vocab_size=len(tok))
    else:
        over = dict(tomeformer_cfg(kind)["config"])
        cfg = qformer_config(width, num_queries, **over)
        qformer, queries = build_qformer(cfg, vocab_size=len(tok))
    return qformer, queries, tok


# -- training -----------------------------------------------------------------------------------------

class Clock:
    """Training time, counted only between start() and stop(): wall-clock seconds (``kind="wall"``) or this
    process's CPU seconds over all threads (``kind="cpu"``, robust to other jobs on a shared machine; on an
    idle machine it is the thread count times the wall-clock). Both are always recorded."""

    def __init__(self, kind="wall"):
        self.kind = kind
        self.total = self.wall = self.cpu = 0.0
        self._t0 = None

    def start(self):
        self._t0 = (time.perf_counter(), time.process_time())

    def stop(self):
        wall, cpu = time.perf_counter() - self._t0[0], time.process_time() - self._t0[1]
        self.wall += wall
        self.cpu += cpu
        self.total = self.cpu if self.kind == "cpu" else self.wall
        self._t0 = None


class Evaluator:
    def __init__(self, feats, ids, refs, batch, max_len, threads=0):
        self.feats, self.ids, self.refs = feats, ids, refs
        self.batch, self.max_len, self.threads = batch, max_len, threads

    @torch.no_grad()
    def __call__(self, model):
        from evlgen_lavis.tasks.caption_metrics import compute_caption_metrics

        model.eval()
        train_threads = torch.get_num_threads()
        if self.threads:  # evaluation time is not counted: use every core for it
            torch.set_num_threads(self.threads)
        captions = []
        for start in range(0, len(self.ids), self.batch):
            captions += model.generate({"image_embeds": self.feats[start:start + self.batch]}, num_beams=1,
                                       max_length=self.max_len, min_length=1)
        torch.set_num_threads(train_threads)
        model.train()
        res = dict(zip(self.ids, captions))
        gts = {i: self.refs[i] for i in self.ids}
        scores = compute_caption_metrics(gts, res, metrics=["cider", "exact_match"])
        cs = [(colour_shape(c), colour_shape(self.refs[i][0])) for i, c in res.items()]
        return {
            "CIDEr": scores["CIDEr"], "acc": scores["exact_match"],
            "colour_acc": sum(p[0] == t[0] for p, t in cs) / len(cs),
            "shape_acc": sum(p[1] == t[1] for p, t in cs) / len(cs),
            "example": captions[0],
        }


def train_for(label, loss_fn, params, data, clock, until, args, evaluate=None, eval_model=None, log=print,
              eval_every=None, curve=None, stage=""):
    """Train with AdamW (warm-up, then constant lr; grad-norm clip 1.0) until ``clock.total >= until``,
    evaluating ``eval_model`` whenever the clock passes a multiple of ``eval_every`` (and at the end)."""
    feats, captions = data
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    order, pos, step, losses = torch.randperm(len(captions), generator=gen), 0, 0, []
    next_eval = (math.floor(clock.total / eval_every + 1e-9) + 1) * eval_every if eval_every else None

    evaluated_at = [None]  # the step of the last evaluation

    def do_eval():
        if evaluated_at[0] == step:
            return
        evaluated_at[0] = step
        t0 = time.perf_counter()
        point = {"t": clock.total, "wall": clock.wall, "cpu": clock.cpu, "stage": stage, "step": step,
                 **evaluate(eval_model)}
        point["loss"] = sum(losses[-20:]) / max(len(losses[-20:]), 1) if losses else None
        curve.append(point)
        log(f"  [{label}{stage}] t={point['t']:6.1f}s step {step:4d} loss {point['loss'] or float('nan'):.3f} "
            f"CIDEr {point['CIDEr']:.3f} acc {point['acc']:.3f} ({time.perf_counter() - t0:.1f} s eval) "
            f"e.g. {point['example']!r}")

    if evaluate is not None:
        do_eval()  # the starting point
    while clock.total < until - 1e-9:
        if next_eval is not None and clock.total >= next_eval - 1e-9:
            do_eval()
            next_eval += eval_every
        clock.start()
        if pos + args.batch > len(order):
            order, pos = torch.randperm(len(captions), generator=gen), 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_fn({"image_embeds": feats[idx], "image": feats[idx], "text_input": [captions[i] for i in idx]})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        clock.stop()
        losses.append(float(loss))
        step += 1
    if evaluate is not None:
        do_eval()
    return step


def run_variant(variant, base, kind, train, test_eval, args, log):
    from blip2_offline import OfflineBlip2Qformer, QFormerConnector, strip_for_stage2, with_connector

    curve, clock = [], Clock(args.clock)
    feats, captions = train
    if variant == "evlgen_10pct":
        keep = sorted(random.Random(args.seed).sample(range(len(captions)), max(len(captions) // 10, args.batch)))
        feats, captions = feats[keep], [captions[i] for i in keep]
    width = base.visual_encoder.num_features
    info = {"variant": variant, "label": label(variant, args), "train_images": len(captions)}

    if variant in ("evlgen", "evlgen_10pct"):
        model = fresh_evlgen_connector(base, kind, args.seed, args.evlgen_r)
    else:
        qformer, queries, tok = fresh_qformer(base, kind, args.seed, args.queries)
        if variant == "blip2_2stage":
            stage1 = OfflineBlip2Qformer(nn.Identity(), width, qformer, queries, tok, max_txt_len=args.stage1_txt_len)
            stage1.train()
            until = args.budget * args.stage1_frac
            params = [p for p in stage1.parameters() if p.requires_grad]
            info["stage1_params"] = sum(p.numel() for p in params)
            log(f"{LABELS[variant]}: stage 1 (ITC+ITM+ITG) for {until:.0f} s, {info['stage1_params']:,} parameters")
            info["stage1_steps"] = train_for(LABELS[variant], lambda s: stage1(s).loss, params, (feats, captions),
                                             clock, until, args, log=log)
            info["stage1_s"] = clock.total
            connector = QFormerConnector(strip_for_stage2(stage1.Qformer), stage1.query_tokens, width,
                                         ln_vision=stage1.ln_vision)
        else:
            connector = QFormerConnector(strip_for_stage2(qformer), queries, width)
        torch.manual_seed(args.seed)
        model = with_connector(base, connector)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    info["params"] = sum(p.numel() for p in params)
    info["soft_tokens"] = model.num_soft_tokens
    log(f"{LABELS[variant]}: LM-loss training, {info['params']:,} trainable parameters, "
        f"{model.num_soft_tokens} soft tokens, {len(captions)} training images")
    t0 = clock.total
    info["steps"] = train_for(LABELS[variant], lambda s: model(s)["loss"], params, (feats, captions), clock,
                              args.budget, args, evaluate=test_eval, eval_model=model, log=log,
                              eval_every=args.budget / args.evals, curve=curve,
                              stage=" s2" if variant == "blip2_2stage" else "")
    info["lm_s"] = clock.total - t0
    info["s_per_step"] = info["lm_s"] / max(info["steps"], 1)
    return info, curve


def time_to(curve, key, target):
    """First training time at which ``curve[key]`` reaches ``target``, interpolated linearly; None if never."""
    prev = None
    for point in curve:
        if point[key] >= target:
            if prev is None or point["t"] <= prev["t"]:
                return point["t"]
            frac = (target - prev[key]) / (point[key] - prev[key])
            return prev["t"] + frac * (point["t"] - prev["t"])
        prev = point
    return None


# -- report -------------------------------------------------------------------------------------------

def clock_name(kind):
    return "CPU seconds (this process, all threads)" if kind == "cpu" else "wall-clock seconds"


def plot(results, path, budget, targets, kind="wall"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (info, curve), colour in zip(results, ("C0", "C3", "C1", "C2")):
        ts = [p["t"] / 60 for p in curve]
        for ax, key in zip(axes, ("CIDEr", "acc")):
            ax.plot(ts, [p[key] for p in curve], marker="o", ms=3, color=colour, label=info["label"])
            if "stage1_s" in info:
                ax.axvline(info["stage1_s"] / 60, color=colour, ls=":", lw=1)
    for ax, key, title in zip(axes, ("CIDEr", "acc"), ("CIDEr", "colour+shape accuracy (exact match)")):
        for tgt in targets.get(key, []):
            ax.axhline(tgt, color="gray", ls="--", lw=0.8)
        ax.set_xlabel(f"training {'CPU time' if kind == 'cpu' else 'wall-clock'} (min; evaluation excluded)")
        ax.set_title(title)
        ax.set_xlim(0, budget / 60 * 1.02)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("easy-vqa captions, frozen EfficientNet-Lite0 + SmolLM2-135M, same budget per variant "
                 "(dotted: BLIP-2 stage 1 -> 2)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_meta(wall_s):
    return {"command": benchlib.command_line(), "machine": benchlib.machine(), "date": benchlib.now(),
            "code": benchlib.git_rev(), "wall_s": wall_s}


def meta_from_report(path):
    """The header of an earlier report (for results saved before the JSON carried it)."""
    meta = {}
    with open(path) as f:
        for line in f:
            if line.startswith("- command: `"):
                meta["command"] = line.split("`")[1]
            elif line.startswith("- machine: "):
                meta["machine"] = line[len("- machine: "):].split(";")[0].strip()
            elif line.startswith("- date: "):
                date, _, rest = line[len("- date: "):].partition(", code ")
                meta["date"] = date.strip()
                code, _, wall = rest.partition("; whole run ")
                meta["code"] = code.strip()
                meta["wall_s"] = float(wall.split()[0]) * 60 if wall else float("nan")
    return meta


def label(variant, args):
    """The variant's name, with the overrides that change its model (``--evlgen-r``, ``--queries``)."""
    text = LABELS[variant]
    if variant.startswith("evlgen") and args.evlgen_r is not None:
        text += f" (r={args.evlgen_r})"
    if variant.startswith("blip2") and args.queries != DEFAULT_QUERIES:
        text += f" ({args.queries} queries)"
    return text


def reference(results):
    """The run the ratios divide by: EVLGen on the full data when it was run, else the first variant."""
    return next((r for r in results if r[0]["variant"] == "evlgen"), results[0])


def caveats(results, args):
    """The caveats that apply to the variants in this run."""
    variants = {i["variant"] for i, _ in results}
    lines = []
    if "blip2_2stage" in variants:
        lines += [
            f"- easy-vqa has only {len(COLOURS) * len(SHAPES)} distinct captions, so a batch of {args.batch} holds "
            "several copies of one caption. LAVIS 1.0.2's `Blip2Qformer.forward` (used unmodified) does not mask "
            "same-caption pairs, so ITC gets contradictory targets and ITM's hard negatives are often true matches: "
            "stage 1 is handicapped on this data in a way it would not be on web captions.",
            "- all-MiniLM-L6-v2 is a sentence encoder without an MLM head, so the Q-Former's ITG head starts random "
            "(BLIP-2 starts it from bert-base's).",
            "- BLIP-2's stage 2 starts a fresh AdamW and repeats the warm-up, as a second training run does.",
        ]
    if len({i["soft_tokens"] for i, _ in results}) > 1:
        lines.append("- the connectors feed the LLM different numbers of soft tokens ("
                     + ", ".join(f"{i['label']} {i['soft_tokens']}" for i, _ in results)
                     + "), so the LLM's share of a step differs; s/step includes it.")
    busiest = max(c[-1]["cpu"] for _, c in results)
    slow = [i["label"] for i, c in results if c[-1]["cpu"] < 0.9 * busiest]
    if args.clock == "wall" and slow:
        lines.append(f"- {', '.join(slow)} got less than 90% of the busiest variant's CPU time in the same "
                     "wall-clock budget (idle threads: other work on the machine or less parallel code), so fewer "
                     "steps; compare per step too.")
    return lines or ["- none beyond the seed and the test-set size."]


def report(results, args, targets, meta, png_name, rerendered=None):
    ref_info, ref_curve = reference(results)
    variants = {i["variant"] for i, _ in results}
    rows = []
    for info, curve in results:
        last = curve[-1]
        row = [info["label"], f"{info['train_images']:,}", f"{info['params']:,}", info["soft_tokens"],
               str(info["steps"]) + (f" (+{info['stage1_steps']} stage 1)" if "stage1_steps" in info else ""),
               benchlib.fmt(info["s_per_step"], 2), benchlib.fmt(last["CIDEr"], 3), benchlib.fmt(last["acc"], 3),
               f"{last['colour_acc']:.3f} / {last['shape_acc']:.3f}"]
        for key in targets:
            for tgt in targets[key]:
                t = time_to(curve, key, tgt)
                ref = time_to(ref_curve, key, tgt)
                if t is None:
                    row.append(f"not reached (> {args.budget:.0f} s)")
                else:
                    ratio = f" = {t / ref:.2f}x" if ref else ""  # no ratio: the reference never got there, or started there
                    row.append(f"{t:.0f} s{ratio}")
        rows.append(row)
    headers = ["variant", "train images", "trainable params", "soft tokens", "LM steps", "s/step (LM)",
               "final CIDEr", "final acc", "final colour / shape acc"]
    headers += [f"time to {'CIDEr' if k == 'CIDEr' else 'acc'} >= {t:g} (x {ref_info['label']})"
                for k in targets for t in targets[k]]
    lines = [
        "# Convergence in miniature: EVLGen vs BLIP-2, same training-time budget",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}; compare variants within one run (wall time is sensitive to other "
        "jobs on the machine)",
        f"- date: {meta['date']}, code {meta['code']}; whole run {meta['wall_s'] / 60:.1f} min",
    ] + ([f"- this report was re-rendered from the run's saved curves (nothing retrained; the report code or the targets may differ): "
          f"`{rerendered}`"] if rerendered else []) + [
        f"- data: easy-vqa captions ({max(i['train_images'] for i, _ in results):,} training images"
        + "".join(f"; 1/10 = {i['train_images']:,}" for i, _ in results if i["variant"] == "evlgen_10pct") + "), "
        f"frozen {args.model} encoder features cached; evaluation: greedy captions (max {args.max_len} tokens) "
        f"of the first {args.eval_images} test images, CIDEr and exact match (colour+shape accuracy) from "
        "`compute_caption_metrics`",
        f"- budget {args.budget:.0f} {clock_name(args.clock)} of training per variant (evaluation excluded; "
        f"{args.threads or torch.get_num_threads()} torch threads), "
        f"{args.evals} evaluations evenly spaced (+ one at the start); batch {args.batch}, AdamW lr {args.lr:g} "
        f"(weight decay 0.05, {args.warmup}-step linear warm-up, then constant), grad-norm clip 1.0, seed {args.seed}"
        + (f"; EVLGen's TomeFormer merges r={args.evlgen_r} tokens per layer instead of the type's schedule"
           + (" (no merging)" if args.evlgen_r == 0 else "") if args.evlgen_r is not None else ""),
        f"- BLIP-2: LAVIS's Q-Former (`lavis.models.blip2_models.Qformer`), initialised from the same BERT as the "
        f"TomeFormer with the same config overrides (the demo's: no dropout), cross-attention every 2nd layer, "
        f"{args.queries} queries; stage 1 = LAVIS's "
        f"`Blip2Qformer.forward` (ITC + ITM + ITG, text max {args.stage1_txt_len} tokens) for "
        f"{args.stage1_frac:.0%} of the budget; stage 2 and the LM-only variant put the Q-Former + a linear "
        "projection in front of the same frozen LLM with EVLGen's LM-loss and generation code (LAVIS's Blip2OPT is "
        "OPT-only; SmolLM2 is LLaMA-architecture)",
        "",
    ] + benchlib.table(headers, rows) + [
        "",
        f"Time to a target is training time ({clock_name(args.clock)}), interpolated linearly between "
        f"evaluations; the ratio divides by {ref_info['label']}'s"
        + (". For BLIP-2 2-stage it includes stage 1" if "blip2_2stage" in variants else "") + ". Training wall-clock "
        f"and CPU time of each variant: "
        + "; ".join(f"{i['label']} {c[-1]['wall']:.0f} s wall / {c[-1]['cpu']:.0f} s CPU" for i, c in results) + ".",
        "",
        f"Read with these caveats (each variant is one seed; {args.eval_images} test images, so accuracy moves in "
        f"steps of {1 / args.eval_images:.4f}):",
        "",
    ] + caveats(results, args) + [
        "",
        f"![curves]({png_name})",
        "",
        "<details><summary>every evaluation</summary>",
        "",
    ]
    point_rows = []
    for info, curve in results:
        for p in curve:
            point_rows.append([info["label"] + p["stage"], f"{p['t']:.0f}", f"{p['wall']:.0f} / {p['cpu']:.0f}", p["step"],
                               benchlib.fmt(p["loss"], 3) if p["loss"] is not None else "-",
                               f"{p['CIDEr']:.3f}", f"{p['acc']:.3f}", f"{p['colour_acc']:.3f}", f"{p['shape_acc']:.3f}",
                               p["example"]])
    lines += benchlib.table(["variant", "t (s)", "wall / CPU s", "step", "train loss", "CIDEr", "acc", "colour acc", "shape acc",
                             "first caption"], point_rows)
    lines += ["", "</details>"]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo", "tiny"], default="demo")
    parser.add_argument("--budget", type=float, default=400.0, help="training seconds per variant (see --clock)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="what the budget counts: training wall-clock seconds, or this process's CPU seconds "
                             "(all threads; use on a shared machine)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for training (0: torch's default)")
    parser.add_argument("--eval-threads", type=int, default=os.cpu_count(), help="torch threads for evaluation")
    parser.add_argument("--evals", type=int, default=4, help="evaluations per variant (+ one at t=0)")
    parser.add_argument("--eval-images", type=int, default=150)
    parser.add_argument("--train-images", type=int, default=None, help="use only the first N (tests)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4, help="the demo's (and the paper's) peak lr")
    parser.add_argument("--warmup", type=int, default=100,
                        help="linear warm-up steps (30 diverged for some seeds; see benchmarks/NOTES.md)")
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES, help="BLIP-2's learned queries")
    parser.add_argument("--evlgen-r", type=int, default=None,
                        help="TomeFormer tokens merged per layer (default: the model type's; 0: no merging)")
    parser.add_argument("--stage1-frac", type=float, default=0.5)
    parser.add_argument("--stage1-txt-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=6, help="generated tokens at most")
    parser.add_argument("--target-acc", type=float, nargs="*", default=[0.5, 0.8])
    parser.add_argument("--target-cider", type=float, nargs="*", default=[5.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-json", default=None,
                        help="re-render the report and plot from a run's saved curves (e.g. with other targets)")
    parser.add_argument("--out", default=None, help="markdown report (a PNG and a JSON are written beside it)")
    args = parser.parse_args(argv)
    benchlib.quiet_warnings()
    if args.threads:
        torch.set_num_threads(args.threads)
    wall0 = time.time()

    def log(msg):
        print(f"[{time.time() - wall0:7.1f}s] {msg}", flush=True)

    if args.from_json:
        return rerender(args)

    import evlgen_lavis  # noqa: F401
    from blip2_offline import init_single_process_group

    init_single_process_group()
    base = build_base(args.model)
    base.train()
    datasets, cfg = build_splits(32 if args.model == "tiny" else 224, args.model == "demo")
    train_ds, test_ds = datasets["train"], datasets["test"]
    n_train = len(train_ds) if args.train_images is None else min(args.train_images, len(train_ds))
    train_idx = list(range(n_train))
    test_idx = list(range(min(args.eval_images, len(test_ds))))
    log(f"features: {n_train} train, {len(test_idx)} test images")
    train = (split_features(base, train_ds, cfg, train_idx, log),
             [train_ds.annotation[i]["caption"] for i in train_idx])
    test_feats = split_features(base, test_ds, cfg, test_idx, log)
    ids = [test_ds.annotation[i]["image_id"] for i in test_idx]
    refs = {test_ds.annotation[i]["image_id"]: list(test_ds.annotation[i]["caption"]) for i in test_idx}
    evaluate = Evaluator(test_feats, ids, refs, batch=100, max_len=args.max_len, threads=args.eval_threads)
    log(f"ready: train features {tuple(train[0].shape)}, test {tuple(test_feats.shape)}")

    results = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        info, curve = run_variant(variant, base, args.model, train, evaluate, args, log)
        results.append((info, curve))
        log(f"{info['label']}: {info['steps']} LM steps, {info['s_per_step']:.2f} s/step, final CIDEr "
            f"{curve[-1]['CIDEr']:.3f} acc {curve[-1]['acc']:.3f}")

    meta = run_meta(time.time() - wall0)
    meta["args"] = vars(args)
    finish(results, args, meta)
    return 0


def rerender(args):
    with open(args.from_json) as f:
        saved = json.load(f)
    if isinstance(saved, list):  # saved before the JSON carried the run's header: take it from the report
        saved = {"meta": meta_from_report(args.out), "results": saved}
    results = [(r["info"], r["curve"]) for r in saved["results"]]
    for key, value in (saved["meta"].get("args") or {}).items():  # the run's settings, not this command's
        if key not in ("target_acc", "target_cider", "out", "from_json"):
            setattr(args, key, value)
    for info, _ in results:  # names follow the current labelling (a run saved before it named no overrides)
        info["label"] = label(info["variant"], args)
    finish(results, args, saved["meta"], rerendered=benchlib.command_line())
    return 0


def finish(results, args, meta, rerendered=None):
    targets = {"acc": args.target_acc, "CIDEr": args.target_cider}
    png = os.path.splitext(args.out)[0] + ".png" if args.out else None
    lines = report(results, args, targets, meta, os.path.basename(png) if png else "", rerendered)
    print()
    print("\n".join(lines[lines.index("") + 1:]))
    ref = reference(results)
    for info, curve in results:
        if info is ref[0]:
            continue
        for tgt in args.target_acc[:1]:
            a, b = time_to(curve, "acc", tgt), time_to(ref[1], "acc", tgt)
            if a is not None and b:
                msg = f"{a / b:.2f}"
            elif b == 0:
                msg = f"n/a ({ref[0]['label']} was there at the start)"
            else:
                missing = [i["label"] for i, t in ((info, a), (ref[0], b)) if t is None]
                msg = f"n/a (target not reached by {' and '.join(missing)})"
            print(f"time-to-acc>={tgt:g} ratio {info['label']} / {ref[0]['label']}: {msg}")
    if args.out:
        benchlib.write_text(args.out, lines)
        plot(results, png, args.budget, targets, args.clock)
        if not rerendered:
            with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
                json.dump({"meta": meta, "results": [{"info": i, "curve": c} for i, c in results]}, f, indent=1)
        print(f"wrote {args.out}, {png}")


if __name__ == "__main__":
    sys.exit(main())
