"""Step cost of EVLGen and LAVIS's BLIP-2 side by side, on identical frozen backbones, in one process.

    python benchmarks/step_cost.py --scale {tiny,small,paper} [--steps N] [--batch B] [--out results.md]

Every model shares the *same* frozen vision encoder and LLM modules (random weights, built offline):

    floor          frozen encoder forward + LLM forward/backward, identity connector (first M feature
                   tokens, width sliced/padded to the LLM's): what no connector can beat
    EVLGen         EVLGen.forward (TomeFormer, LM loss on the caption tokens)
    EVLGen cached  the same with frozen-encoder features precomputed (run.cache_vision_features)
    BLIP-2 s2      LAVIS's Blip2OPT.forward as shipped (Q-Former, OPT with labels: logits at every position)
    BLIP-2 s2 (EVLGen harness)  the same Q-Former in EVLGen's harness: same LM-loss code as EVLGen, so
                   the connector is the only difference (this is the model of benchmarks/convergence.py)
    BLIP-2 s1      LAVIS's Blip2Qformer.forward (ITC + ITM + ITG; no LLM)

The rounds alternate the models (one step each per round) so that a shared, noisy machine slows them alike;
each number is a median. Columns: time per training step (forward + backward + AdamW step), samples/s, peak
memory of a step above the weights (CUDA: allocator peak; CPU: sampled malloc peak), trainable parameters,
connector GFLOPs per sample (counted by torch's FLOP counter on the connector's forward and backward, not
taken from the paper), visual tokens into the LLM, and greedy generation latency with the same LLM module.

Scales: ``tiny`` (seconds; tests), ``small`` (CPU-sized; the paper's token counts 257 -> 29 and 32 queries,
its 12-layer connectors, roughly its cost proportions at ~1/60 of its FLOPs), ``paper`` (EVA-ViT-g and
OPT-2.7B shapes, bert-base-shaped connectors, random weights, no download; on a CPU only the connectors are
measured unless ``--full-models`` is given: then the whole models run in fp32, which needs ~18 GB of memory
(peak RSS 18.4 GB with ``--models floor`` at batch 2). ``--models`` keeps a subset (EVLGen and BLIP-2 s2 are always kept).
The last line printed holds the EVLGen / BLIP-2 stage-2 step-time ratio.
"""
import argparse
import copy
import os
import sys
import time
import types
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (sets the offline environment first)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

CAPTIONS = [
    "a man riding a wave on top of a surfboard",
    "two dogs playing with a red frisbee in the park",
    "a plate of food with broccoli and rice on a table",
    "a city street at night with cars and tall buildings",
    "a young girl holding an umbrella in the rain",
    "a cat sleeping on the keyboard of a laptop computer",
    "a group of people standing around a kitchen counter",
    "an old train crossing a bridge over a river",
]

SCALES = {
    "tiny": dict(
        image_size=32, vit=dict(kind="tiny", patch_size=8, width=32, depth=2, heads=2),
        connector=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        r=4, queries=8, llm=dict(kind="tiny", hidden=64), batch=4, steps=5, gen_tokens=5,
    ),
    "small": dict(
        image_size=224, vit=dict(kind="tiny", patch_size=14, width=384, depth=12, heads=6),
        connector=dict(hidden_size=128, num_hidden_layers=12, num_attention_heads=2, intermediate_size=512),
        r=19, queries=32, llm=dict(kind="opt", hidden=512, layers=12, heads=8, ffn=2048),
        batch=8, steps=8, gen_tokens=10,
    ),
    "paper": dict(
        image_size=224, vit=dict(kind="eva_g"),
        connector=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        r=19, queries=32, llm=dict(kind="opt", hidden=2560, layers=32, heads=32, ffn=10240),
        batch=32, cpu_batch=4, steps=10, gen_tokens=10,
    ),
}


# -- frozen backbones ---------------------------------------------------------------------------------

def build_vision(cfg, device, half):
    from evlgen_lavis.models.vision import FrozenVisionEncoder, build_tiny_vit

    size, v = cfg["image_size"], cfg["vit"]
    if v["kind"] == "tiny":
        backbone = build_tiny_vit(image_size=size, patch_size=v["patch_size"], width=v["width"], depth=v["depth"],
                                  heads=v["heads"])
        n_tokens = (size // v["patch_size"]) ** 2 + 1
    else:  # EVA-CLIP ViT-g/14 shape (lavis.models.eva_vit.create_eva_vit_g without its download)
        from functools import partial

        from lavis.models.eva_vit import VisionTransformer

        if device.type == "meta":  # shapes only (tests): EVA's __init__ calls .item(), so only parameters go to meta
            from accelerate import init_empty_weights

            place = init_empty_weights()
        else:
            place = torch.device(device)  # initialise on the GPU: seconds instead of minutes
        with place:
            backbone = VisionTransformer(img_size=size, patch_size=14, use_mean_pooling=False, embed_dim=1408,
                                         depth=39, num_heads=1408 // 88, mlp_ratio=4.3637, qkv_bias=True,
                                         norm_layer=partial(nn.LayerNorm, eps=1e-6))
        n_tokens = (size // 14) ** 2 + 1
    if device.type != "meta":
        backbone = backbone.to(device=device, dtype=torch.float16 if half else torch.float32)
    encoder = FrozenVisionEncoder(backbone, lambda m, x: m(x), backbone.num_features, n_tokens, True,
                                  f"bench_vit_{v['kind']}")
    return encoder if device.type == "meta" else encoder.to(device)


def build_llm(cfg, device, half):
    """A frozen OPT (random weights) and the GPT-2 BPE tokenizer OPT's is built on (adds a start token)."""
    from transformers import GPT2Tokenizer, OPTConfig, OPTForCausalLM

    from evlgen_lavis.models.assets import build_tiny_opt, gpt2_bpe_dir

    tok = GPT2Tokenizer.from_pretrained(gpt2_bpe_dir(), add_bos_token=True)
    tok.pad_token = tok.eos_token
    spec = cfg["llm"]
    if spec["kind"] == "tiny":
        llm = build_tiny_opt(len(tok), tok.pad_token_id)  # the `tiny` model type's LLM
    else:
        config = OPTConfig(vocab_size=50272, hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                           ffn_dim=spec["ffn"], num_attention_heads=spec["heads"], word_embed_proj_dim=spec["hidden"],
                           max_position_embeddings=2048, dropout=0.0, attention_dropout=0.0,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
        with torch.device(device):
            torch.manual_seed(0)
            llm = OPTForCausalLM(config)
    llm = llm.to(device=device, dtype=torch.float16 if half else torch.float32).eval()
    for p in llm.parameters():
        p.requires_grad_(False)
    return llm, tok


# -- models -------------------------------------------------------------------------------------------

def floor_soft_prompts(self, samples):
    """Identity connector: the first M frozen-feature tokens, width sliced or zero-padded to the LLM's."""
    feats = samples["image_embeds"].to(self.device) if "image_embeds" in samples else self.encode_image(samples["image"])
    D = self.llm_model.get_input_embeddings().embedding_dim
    x = feats[:, : self.num_soft_tokens].float()  # (B, M, Cv)
    x = x[..., :D] if x.shape[-1] >= D else F.pad(x, (0, D - x.shape[-1]))
    soft = x.to(self.llm_model.dtype).detach().requires_grad_(True)  # a leaf: the LLM's backward runs in full
    return soft, soft.new_ones(soft.shape[0], soft.shape[1], 1), x


MODEL_NAMES = ("floor", "EVLGen", "EVLGen cached", "BLIP-2 s2", "BLIP-2 s2 (EVLGen harness)", "BLIP-2 s1")
REQUIRED = ("EVLGen", "BLIP-2 s2")  # the ratio the last line reports


def parse_models(text):
    """The ``--models`` subset, in the canonical order; EVLGen and BLIP-2 s2 always included."""
    if not text:
        return set(MODEL_NAMES)
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = sorted(names - set(MODEL_NAMES))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; known: {', '.join(MODEL_NAMES)}")
    return names | set(REQUIRED)


def build_models(cfg, device, half, connectors_only=False, only=None):
    """{name: model} sharing one frozen encoder and one frozen LLM; ``only``: the names to build (all if None)."""
    from blip2_offline import (OfflineBlip2OPT, OfflineBlip2Qformer, QFormerConnector, bert_tokenizer,
                               build_evlgen, build_qformer, init_single_process_group, qformer_config,
                               with_connector)

    from evlgen_lavis.models.assets import minilm_dir

    init_single_process_group()
    torch.manual_seed(0)
    vision = build_vision(cfg, device, half) if not connectors_only else None
    width = 1408 if cfg["vit"]["kind"] == "eva_g" else cfg["vit"]["width"]
    n_tokens = (cfg["image_size"] // (14 if cfg["vit"]["kind"] == "eva_g" else cfg["vit"]["patch_size"])) ** 2 + 1
    bert_tok = bert_tokenizer(minilm_dir())
    qcfg = qformer_config(width, cfg["queries"], vocab_size=30522, **cfg["connector"])
    tf_cfg = dict(bert=None, r=cfg["r"], config=dict(cfg["connector"]))
    only = set(MODEL_NAMES) if only is None else set(only)
    models = {}
    if connectors_only:
        built = _connector_models(cfg, width, n_tokens, tf_cfg, qcfg, bert_tok, device)
        return {name: model for name, model in built.items() if name in only}
    llm, tok = build_llm(cfg, device, half)
    evl_kwargs = dict(image_size=cfg["image_size"], prompt="", max_txt_len=32, end_sym="\n",
                      vit_precision="fp16" if half else "fp32", llm_precision="fp16" if half else "fp32")
    torch.manual_seed(0)
    evlgen = build_evlgen(vision, llm, tok, tf_cfg, **evl_kwargs).to(device)
    if "floor" in only:
        floor = copy.copy(evlgen)  # shares every module; only soft_prompts differs
        floor.soft_prompts = types.MethodType(floor_soft_prompts, floor)
        models["floor"] = floor
    models["EVLGen"] = evlgen
    if "EVLGen cached" in only:
        models["EVLGen cached"] = evlgen  # same model; its batch carries precomputed features
    torch.manual_seed(0)
    qformer, queries = build_qformer(qcfg, vocab_size=len(bert_tok))
    models["BLIP-2 s2"] = OfflineBlip2OPT(vision, width, qformer, queries, llm, tok).to(device)
    if "BLIP-2 s2 (EVLGen harness)" in only:
        torch.manual_seed(0)
        qformer2, queries2 = build_qformer(qcfg, vocab_size=len(bert_tok))
        harness = build_evlgen(vision, llm, tok, tf_cfg, **evl_kwargs)
        from blip2_offline import strip_for_stage2

        models["BLIP-2 s2 (EVLGen harness)"] = with_connector(
            harness, QFormerConnector(strip_for_stage2(qformer2), queries2, width)).to(device)
    if "BLIP-2 s1" in only:
        torch.manual_seed(0)
        qformer1, queries1 = build_qformer(qcfg, vocab_size=len(bert_tok))
        models["BLIP-2 s1"] = OfflineBlip2Qformer(vision, width, qformer1, queries1, bert_tok,
                                                  max_txt_len=32).to(device)
    return models


class _ConnectorOnly(nn.Module):
    """A connector with its input LayerNorm/projection, for --scale paper on a CPU (no frozen parts)."""

    def __init__(self, connector, proj):
        super().__init__()
        self.connector, self.proj = connector, proj

    def forward(self, samples):
        tokens, _ = self.connector(samples["image_embeds"])
        return {"loss": self.proj(tokens).float().pow(2).mean()}


def _connector_models(cfg, width, n_tokens, tf_cfg, qcfg, bert_tok, device):
    from blip2_offline import OfflineBlip2Qformer, QFormerConnector, build_qformer, strip_for_stage2
    from transformers import BertConfig

    from evlgen_lavis.models.tomeformer import TomeFormer

    D = cfg["llm"]["hidden"]
    torch.manual_seed(0)
    tf = TomeFormer(BertConfig(**cfg["connector"]), r=cfg["r"], vision_width=width)
    models = {"EVLGen": _ConnectorOnly(tf, nn.Linear(tf.hidden_size, D)).to(device)}
    models["EVLGen"].num_soft_tokens = tf.check_input_tokens(n_tokens)
    torch.manual_seed(0)
    qformer, queries = build_qformer(qcfg, vocab_size=len(bert_tok))
    qc = QFormerConnector(strip_for_stage2(qformer), queries, width)
    models["BLIP-2 s2"] = _ConnectorOnly(qc, nn.Linear(qc.hidden_size, D)).to(device)
    models["BLIP-2 s2"].num_soft_tokens = qc.num_queries
    torch.manual_seed(0)
    qformer1, queries1 = build_qformer(qcfg, vocab_size=len(bert_tok))
    models["BLIP-2 s1"] = OfflineBlip2Qformer(nn.Identity(), width, qformer1, queries1, bert_tok,
                                              max_txt_len=32).to(device)
    return models


def connector_of(name, model):
    """(callable feats -> output tensor, trainable module set) of a model's connector, or None."""
    if name == "floor":
        return None
    if name.startswith("EVLGen") or name == "BLIP-2 s2 (EVLGen harness)":
        if isinstance(model, _ConnectorOnly):
            return lambda feats: model.proj(model.connector(feats)[0])
        return lambda feats: model.llm_proj(model.tomeformer(feats.float())[0])
    if name == "BLIP-2 s2":
        if isinstance(model, _ConnectorOnly):
            return lambda feats: model.proj(model.connector(feats)[0])

        def run(feats):
            image_embeds = model.ln_vision(feats)
            atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=feats.device)
            queries = model.query_tokens.expand(feats.shape[0], -1, -1)
            out = model.Qformer.bert(query_embeds=queries, encoder_hidden_states=image_embeds,
                                     encoder_attention_mask=atts, return_dict=True).last_hidden_state
            return model.opt_proj(out)

        return run
    return None


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def visual_tokens(name, model):
    if name == "BLIP-2 s1":
        return "- (no LLM)"
    if name == "BLIP-2 s2" and not isinstance(model, _ConnectorOnly):
        return model.query_tokens.shape[1]
    return model.num_soft_tokens


# -- measurement --------------------------------------------------------------------------------------

class Runner:
    def __init__(self, models, device, half, batch, feats):
        self.models, self.device, self.half = models, device, half
        self.batch = batch
        self.feats = feats  # precomputed features of batch["image"] (B, N, Cv)
        self.opts, by_model = {}, {}
        for name, model in models.items():
            params = trainable(model) if name != "floor" else []  # the floor trains nothing
            if params and id(model) not in by_model:  # EVLGen cached reuses EVLGen's optimizer
                by_model[id(model)] = torch.optim.AdamW(params, lr=1e-5)
            self.opts[name] = by_model.get(id(model)) if params else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=half)

    def samples(self, name):
        if name == "EVLGen cached" or isinstance(self.models[name], _ConnectorOnly):
            return {"image_embeds": self.feats, "text_input": self.batch["text_input"]}
        if name == "BLIP-2 s1" and isinstance(self.models[name].visual_encoder, nn.Identity):
            return {"image": self.feats, "text_input": self.batch["text_input"]}
        return self.batch

    def autocast(self):
        if self.half:
            return torch.autocast(self.device.type, dtype=torch.float16)
        import contextlib

        return contextlib.nullcontext()

    def step(self, name):
        model, opt = self.models[name], self.opts.get(name)
        model.train()
        for frozen in ("llm_model", "opt_model"):  # LAVIS's Blip2OPT.train() would switch the shared LLM
            if isinstance(getattr(model, frozen, None), nn.Module):
                getattr(model, frozen).eval()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        with self.autocast():
            out = model(self.samples(name))
        loss = out["loss"] if isinstance(out, dict) else out.loss
        self.scaler.scale(loss).backward()
        if opt is not None:
            self.scaler.step(opt)
            self.scaler.update()
        return loss

    def timed_step(self, name):
        """(wall seconds, CPU seconds) of one training step."""
        benchlib.sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        self.step(name)
        benchlib.sync(self.device)
        return time.perf_counter() - t0, time.process_time() - c0

    def peak_memory(self, name):
        with benchlib.PeakMemory(self.device) as pm:
            self.step(name)
        return pm.peak

    def connector_flops(self, name):
        """(forward, backward) FLOPs per sample of the connector alone."""
        model = self.models[name]
        B = self.feats.shape[0]
        if name == "BLIP-2 s1":  # the whole stage-1 forward minus its frozen encoder
            samples = {"image": self.feats, "text_input": self.batch["text_input"]}
            with mock.patch.object(model, "visual_encoder", nn.Identity()):
                with benchlib.flop_counter() as fwd, self.autocast():
                    loss = model(samples).loss
                with benchlib.flop_counter() as bwd:
                    loss.backward()
            model.zero_grad(set_to_none=True)
            return fwd.get_total_flops() / B, bwd.get_total_flops() / B
        run = connector_of(name, model)
        if run is None:
            return 0.0, 0.0
        feats = self.feats.float() if not self.half else self.feats
        with self.autocast():
            with benchlib.flop_counter() as fwd:
                out = run(feats)
        with benchlib.flop_counter() as bwd:
            out.float().sum().backward()
        model.zero_grad(set_to_none=True)
        return fwd.get_total_flops() / B, bwd.get_total_flops() / B


def stub_merging():
    """Patch TomeFormer's merging with a free stand-in that drops the last r tokens (same token counts)."""
    import evlgen_lavis.models.tomeformer as T
    from evlgen_lavis.models.tome import max_merge

    def bsm(metric, r, class_token=True):
        r = min(int(r), max_merge(metric.shape[1], class_token))

        def merge(x, mode="mean"):
            return x[:, : x.shape[1] - r]

        return merge, merge

    def wavg(merge, x, size=None):
        return merge(x), merge(size)

    return mock.patch.multiple(T, bipartite_soft_matching=bsm, merge_wavg=wavg)


def merge_overhead(runner, name, reps, clock="wall"):
    """Median fwd+bwd time of the TomeFormer connector with real merging and with a free stand-in."""
    run = connector_of(name, runner.models[name])
    feats = runner.feats

    def once():
        benchlib.sync(runner.device)
        t0 = benchlib.now_s(clock)
        with runner.autocast():
            out = run(feats)
        out.float().sum().backward()
        benchlib.sync(runner.device)
        return benchlib.now_s(clock) - t0

    real, free = [], []
    once()
    for _ in range(reps):
        real.append(once())
        with stub_merging():
            free.append(once())
    runner.models[name].zero_grad(set_to_none=True)
    return benchlib.median(real), benchlib.median(free)


def generate_latency(models, runner, tokens, reps, clock="wall"):
    """Greedy generation of exactly ``tokens`` new tokens for the batch, median seconds per call."""
    from blip2_offline import lavis_opt_sharing_weights

    batch = {"image": runner.batch["image"]}
    fns = {}
    if "EVLGen" in models:
        evlgen = models["EVLGen"]
        fns["EVLGen"] = lambda: evlgen.generate(batch, num_beams=1, max_length=tokens, min_length=tokens)
    if "BLIP-2 s2" in models:
        b = models["BLIP-2 s2"]
        fns["BLIP-2 s2"] = lambda: b.generate_embeds(batch, max_length=tokens, min_length=tokens)
        try:  # LAVIS 1.0.2's own generate needs its own OPT class (query_embeds); same weights
            stock = copy.copy(b)
            stock._modules = dict(b._modules)
            stock.opt_model = lavis_opt_sharing_weights(b.opt_model)
            n_prompt = stock.opt_tokenizer(stock.prompt, return_tensors="pt").input_ids.shape[1]
            stock.generate(batch, num_beams=1, max_length=2, min_length=n_prompt + 2)
            fns["BLIP-2 s2 (LAVIS 1.0.2 generate, its OPT copy)"] = lambda: stock.generate(
                batch, num_beams=1, max_length=tokens, min_length=n_prompt + tokens)
        except Exception as err:  # noqa: BLE001 (report, do not fail the benchmark)
            print(f"LAVIS 1.0.2 Blip2OPT.generate unavailable here: {type(err).__name__}: {str(err)[:200]}")
    for model in models.values():
        model.eval()
    times = {k: [] for k in fns}
    with torch.no_grad(), runner.autocast():
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(reps):
            for k, fn in fns.items():
                benchlib.sync(runner.device)
                t0 = benchlib.now_s(clock)
                fn()
                benchlib.sync(runner.device)
                times[k].append(benchlib.now_s(clock) - t0)
    return {k: benchlib.median(v) for k, v in times.items()}


def plot_steps(path, title, step_ms, gen_ms, clock):
    """Bar charts of step time per model and of generation latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("training step", step_ms)] + ([("greedy generate", gen_ms)] if gen_ms else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels):
        labels = list(values)
        ax.barh(range(len(labels)), [values[k] for k in labels], color="C0")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels([k.replace(" (", "\n(") for k in labels], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"{clock} ms (median)")
        ax.set_title(name, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default per scale)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default per scale)")
    parser.add_argument("--gen-reps", type=int, default=3, help="generate calls timed per model")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="what the ratios and the step/generate columns time: wall-clock, or this process's CPU "
                             "time (robust to other jobs on a shared CPU machine with --threads 1; CPU only)")
    parser.add_argument("--connectors-only", action="store_true",
                        help="measure the connectors alone (default for --scale paper on a CPU)")
    parser.add_argument("--full-models", action="store_true",
                        help="--scale paper on a CPU: run the whole models (fp32, ~18 GB with --models floor at batch 2)")
    parser.add_argument("--models", default="",
                        help=f"comma-separated subset of {', '.join(MODEL_NAMES)} (EVLGen and BLIP-2 s2 always run)")
    parser.add_argument("--out", default=None, help="write a markdown report here")
    args = parser.parse_args(argv)
    only = parse_models(args.models)
    benchlib.quiet_warnings()

    cfg = SCALES[args.scale]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    half = device.type == "cuda"
    if args.connectors_only and args.full_models:
        raise SystemExit("--connectors-only and --full-models contradict each other: give one")
    connectors_only = args.connectors_only or (args.scale == "paper" and device.type == "cpu" and not args.full_models)
    threads = benchlib.setup_threads(args.threads)
    clock = "wall" if device.type == "cuda" else args.clock
    batch_size = args.batch or (cfg.get("cpu_batch", cfg["batch"]) if device.type == "cpu" else cfg["batch"])
    steps = args.steps or cfg["steps"]
    t_start = time.time()

    import evlgen_lavis  # noqa: F401  (registers; LAVIS import)

    models = build_models(cfg, device, half, connectors_only, only)
    build_s = time.time() - t_start
    torch.manual_seed(1)
    images = torch.randn(batch_size, 3, cfg["image_size"], cfg["image_size"], device=device)
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    width = 1408 if cfg["vit"]["kind"] == "eva_g" else cfg["vit"]["width"]
    n_tokens = (cfg["image_size"] // (14 if cfg["vit"]["kind"] == "eva_g" else cfg["vit"]["patch_size"])) ** 2 + 1
    if connectors_only:
        feats = torch.randn(batch_size, n_tokens, width, device=device)
    else:
        with torch.no_grad():
            feats = models["EVLGen"].encode_image(images)  # (B, N, Cv)
    runner = Runner(models, device, half, {"image": images, "text_input": texts}, feats)
    names = list(models)

    print(f"scale={args.scale} device={device} threads={threads} clock={clock} batch={batch_size} steps={steps} "
          f"{'connectors only' if connectors_only else 'full models'}; built in {build_s:.1f} s", flush=True)
    for _ in range(args.warmup):
        for name in names:
            runner.step(name)
    times = {n: [] for n in names}
    for i in range(steps):
        for name in names:
            times[name].append(runner.timed_step(name))
        print(f"round {i + 1}/{steps}: " + ", ".join(f"{n} {times[n][-1][0] * 1e3:.0f}/{times[n][-1][1] * 1e3:.0f} ms"
                                                  for n in names) + " (wall/CPU)", flush=True)
    wall_s = {n: benchlib.median([t[0] for t in v]) for n, v in times.items()}
    cpu_s = {n: benchlib.median([t[1] for t in v]) for n, v in times.items()}
    step_s = cpu_s if clock == "cpu" else wall_s
    k = 1 if clock == "cpu" else 0
    spread = {n: (min(t[k] for t in v), max(t[k] for t in v)) for n, v in times.items()}  # this clock's
    memory = {n: runner.peak_memory(n) for n in names}
    flops = {n: runner.connector_flops(n) for n in names}
    for m in models.values():
        m.zero_grad(set_to_none=True)
    merge_real, merge_free = merge_overhead(runner, "EVLGen", reps=max(steps, 2), clock=clock)
    gen = {} if connectors_only else generate_latency(models, runner, cfg["gen_tokens"], args.gen_reps, clock)

    rows = []
    for n in names:
        params = sum(p.numel() for p in trainable(models[n])) if n != "floor" else 0
        f_fwd, f_bwd = flops[n]
        rows.append([
            n, benchlib.fmt(wall_s[n] * 1e3, 0), benchlib.fmt(cpu_s[n] * 1e3, 0),
            f"{benchlib.fmt(spread[n][0] * 1e3, 0)}-{benchlib.fmt(spread[n][1] * 1e3, 0)}",
            benchlib.fmt(batch_size / step_s[n], 2 if batch_size / step_s[n] < 1 else 1),
            benchlib.fmt(memory[n] / 2**20 if memory[n] is not None else None, 0),
            benchlib.fmt(params), benchlib.fmt(f_fwd / 1e9, 3) + " / " + benchlib.fmt((f_fwd + f_bwd) / 1e9, 3),
            visual_tokens(n, models[n]),
            benchlib.fmt(gen[n] * 1e3, 0) if n in gen else "-",
        ])
    for n in gen:
        if n not in names:
            rows.append([n, "-", "-", "-", "-", "-", "-", "-", runner.models["BLIP-2 s2"].query_tokens.shape[1],
                         benchlib.fmt(gen[n] * 1e3, 0)])
    headers = ["model", "step wall ms", "step CPU ms", f"step {clock} ms min-max", f"samples/s ({clock})",
               "peak step MB", "trainable params",
               "connector GFLOPs/sample fwd / fwd+bwd", "visual tokens into LLM",
               f"greedy generate {clock} ms ({cfg['gen_tokens']} tokens)"]
    lines = benchlib.table(headers, rows)

    ratio_s2 = step_s["EVLGen"] / step_s["BLIP-2 s2"]
    summary = []
    if "floor" in step_s:
        summary.append(f"EVLGen step / floor step (target <= 1.15): {step_s['EVLGen'] / step_s['floor']:.3f}")
    if "EVLGen cached" in step_s:
        summary.append(f"EVLGen cached-features step / EVLGen step: {step_s['EVLGen cached'] / step_s['EVLGen']:.3f}")
    if "BLIP-2 s2 (EVLGen harness)" in step_s:
        summary.append(f"EVLGen / BLIP-2 s2 in the EVLGen harness (connector the only difference): "
                       f"{step_s['EVLGen'] / step_s['BLIP-2 s2 (EVLGen harness)']:.3f}")
    if steps >= 3:
        pairs = [(a, b) for a, b in (("EVLGen", "BLIP-2 s2"), ("EVLGen", "floor")) if b in spread]
        summary.append(f"spread of the {steps} timed steps, (max - min) / median {clock} time: "
                       + ", ".join(f"{n} {(spread[n][1] - spread[n][0]) / step_s[n] * 100:.1f}%" for n in names)
                       + "; min-max ranges " + ", ".join(
                           f"{a} / {b} " + ("overlap (a tie at this noise)"
                                            if benchlib.ranges_overlap(spread[a], spread[b]) else "disjoint")
                           for a, b in pairs))
    overhead = (merge_real - merge_free) / merge_real
    summary.append(f"merging overhead: {overhead * 100:.1f}% of the TomeFormer connector's fwd+bwd time "
                   f"({merge_real * 1e3:.1f} ms with merging, {merge_free * 1e3:.1f} ms with a free stand-in; "
                   "target < 10%)")
    if "EVLGen" in gen and "BLIP-2 s2" in gen:
        summary.append(f"greedy generate latency EVLGen / BLIP-2 s2, same LLM module (target <= 1): "
                       f"{gen['EVLGen'] / gen['BLIP-2 s2']:.3f}")
    if "BLIP-2 s1" in step_s:
        summary.append(f"step time BLIP-2 s1 / BLIP-2 s2: {step_s['BLIP-2 s1'] / step_s['BLIP-2 s2']:.3f}")
    what = "connectors only, " if connectors_only else ""
    last = (f"EVLGen / BLIP-2 stage-2 step-time ratio ({what}scale {args.scale}, {device.type}, {clock} time): {ratio_s2:.3f} "
            f"({step_s['EVLGen'] * 1e3:.0f} ms vs {step_s['BLIP-2 s2'] * 1e3:.0f} ms)")

    print()
    print("\n".join(lines))
    print()
    print("\n".join(summary))
    print(last, flush=True)

    if args.out:
        v = cfg["vit"]
        vit_desc = ("EVA-CLIP ViT-g/14 shape (1408 wide, 39 blocks)" if v["kind"] == "eva_g" else
                    f"EVA ViT {v['width']} wide, {v['depth']} blocks, patch {v['patch_size']}")
        llm = cfg["llm"]
        llm_desc = ("the `tiny` type's 2-layer OPT (hidden 64)" if llm["kind"] == "tiny" else
                    f"OPT {llm['hidden']} wide, {llm['layers']} layers, vocab 50272")
        c = cfg["connector"]
        doc = [
            f"# Step cost, scale `{args.scale}`" + (" (connectors only)" if connectors_only else ""),
            "",
            f"- command: `{benchlib.command_line()}`",
            f"- machine: {benchlib.machine()}; compare models within a run (other jobs on the machine, if any, "
            "slow all of them)",
            f"- date: {benchlib.now()}, code {benchlib.git_rev()}",
            f"- batch {batch_size}, {steps} timed steps per model (median; models alternate every round), "
            f"{args.warmup} warm-up, AdamW; {'fp16 autocast, frozen parts fp16' if half else 'fp32'}; "
            f"{threads} torch thread(s); ratios, samples/s and generation use {clock} time"
            + (" (process CPU time: what other jobs on a shared machine disturb least on one thread)"
               if clock == "cpu" else ""),
            f"- frozen parts (random weights, shared by every model): "
            + ("none (connectors alone on random features)" if connectors_only else f"{vit_desc}, {llm_desc}"),
            f"- vision tokens {n_tokens} x {width}; TomeFormer and Q-Former both {c['num_hidden_layers']} layers, "
            f"hidden {c['hidden_size']}, {c['num_attention_heads']} heads, FFN {c['intermediate_size']}, random init; "
            f"TomeFormer r={cfg['r']} per layer; Q-Former {cfg['queries']} queries, cross-attention every 2nd layer "
            "(LAVIS's Qformer.py)",
            "",
        ] + lines + ["", *[f"- {s}" for s in summary], f"- **{last}**", "",
                     "Peak step MB: memory of one training step above the resident weights "
                     + ("(CUDA allocator peak)." if half else "(malloc bytes in use sampled every 0.5 ms: a lower "
                        "bound; CPU runs do not reuse freed blocks the way the CUDA caching allocator does)."),
                     "Connector FLOPs are counted by `torch.utils.flop_counter` on the connector's own forward and "
                     "backward (for BLIP-2 s1: the whole ITC+ITM+ITG forward and backward, which has no LLM).",
                     ]
        png = os.path.splitext(args.out)[0] + ".png"
        try:
            plot_steps(png, f"step cost, scale {args.scale}" + (" (connectors only)" if connectors_only else "")
                       + f", {device.type}, batch {batch_size}", {n: step_s[n] * 1e3 for n in names},
                       {n: v * 1e3 for n, v in gen.items()}, clock)
            doc += ["", f"![step cost]({os.path.basename(png)})"]
        except Exception as err:  # noqa: BLE001 (the table is the result; the plot is a convenience)
            print(f"no plot: {type(err).__name__}: {err}")
        benchlib.write_text(args.out, doc)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
