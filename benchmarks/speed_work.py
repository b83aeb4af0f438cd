"""Speed candidates for an EVLGen training step, each measured A/B in one process (alternating, medians).

    python benchmarks/speed_work.py [--scale small] [--reps 8] [--out results/speed_work.md]

The backbones and connector sizes are step_cost.py's. "A" is the code as it is in the package now, "B" the
candidate; candidates that were adopted into the package are measured against the code they replaced
(kept here as ``*_before`` functions), so the table stays reproducible after the change:

    merge        ToMe merge: slices + 2 gathers + scatter_reduce + cat per merged tensor (before) vs one
                 scatter_add through a per-token destination index (now in tome.py); both patched in, so the
                 comparison does not depend on which one the package holds
    fused_qkv    TomeFormer attention: three q/k/v Linear (now) vs one Linear over concatenated weights
    infer_mode   frozen encoder under torch.no_grad (now) vs torch.inference_mode (+ the clone autograd needs)
    lm_head      LM loss: vocabulary projection at the supervised positions only (now) vs HF's loss over
                 logits at every position (LAVIS's Blip2OPT does the latter)
    feat_cache   EVLGen step from images (A) vs from cached frozen features (B; run.cache_vision_features)
    bf16_llm     (CPU only) frozen LLM in fp32 (now, on a CPU) vs bf16 (the CPU has AMX/AVX512-bf16 or not)
    attn_dropout TomeFormer attention-probability dropout 0.1 (BERT's, now) vs 0: what the unfused attention
                 path costs (informational: not a pure speed change)
"""
import argparse
import contextlib
import copy
import os
import sys
import time
import types
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# -- the code before / the candidates -----------------------------------------------------------------

def bipartite_soft_matching_before(metric, r, class_token=True):
    """tome.bipartite_soft_matching as it was before the scatter-index merge (commit fd3c98f)."""
    from evlgen_lavis.models.tome import _identity, max_merge

    B, N, _ = metric.shape
    r = min(int(r), max_merge(N, class_token))
    if r <= 0:
        return _identity, _identity
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[:, 0, :] = -float("inf")
        best_score, best_dst = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True)
        src_idx = order[:, :r]
        keep_idx = order[:, r:].sort(dim=-1).values
        dst_idx = best_dst.gather(-1, src_idx)
    n_a = a.shape[1]

    def merge(x, mode="mean"):
        xa, xb = x[:, ::2], x[:, 1::2]
        D = x.shape[-1]
        kept = xa.gather(1, keep_idx[..., None].expand(B, n_a - r, D))
        moved = xa.gather(1, src_idx[..., None].expand(B, r, D))
        xb = xb.scatter_reduce(1, dst_idx[..., None].expand(B, r, D), moved, reduce=mode)
        return torch.cat([kept, xb], dim=1)

    return merge, merge  # unmerge unused here


def bipartite_soft_matching_scatter(metric, r, class_token=True):
    """The candidate: the same matching; merging as one scatter_add through a destination index per token
    (kept A tokens -> their slot in order, merged A tokens -> their B partner's slot, B tokens -> theirs)."""
    from evlgen_lavis.models.tome import _identity, max_merge

    B, N, _ = metric.shape
    r = min(int(r), max_merge(N, class_token))
    if r <= 0:
        return _identity, _identity
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[:, 0, :] = -float("inf")
        best_score, best_dst = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True)
        src_idx = order[:, :r]
        keep_idx = order[:, r:].sort(dim=-1).values
        n_a, n_b = a.shape[1], b.shape[1]
        n_kept = n_a - r
        dest_a = torch.empty_like(best_dst)
        dest_a.scatter_(1, keep_idx, torch.arange(n_kept, device=metric.device).expand(B, n_kept))
        dest_a.scatter_(1, src_idx, best_dst.gather(1, src_idx) + n_kept)
        dest = torch.empty(B, N, 1, dtype=torch.long, device=metric.device)
        dest[:, ::2, 0] = dest_a
        dest[:, 1::2, 0] = torch.arange(n_kept, n_kept + n_b, device=metric.device)

    def merge(x, mode="mean"):
        index = dest.expand(B, N, x.shape[-1])
        out = x.new_zeros(B, N - r, x.shape[-1])
        if mode == "sum":
            return out.scatter_add(1, index, x)
        return out.scatter_reduce(1, index, x, reduce=mode, include_self=False)

    return merge, merge


def fused_qkv_forward(self, x, attn_bias=None):
    """TomeSelfAttention.forward with one GEMM for q, k and v (weights concatenated per call)."""
    B, N, C = x.shape
    weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
    bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
    qkv = F.linear(x, weight, bias).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, N, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias,
                                         dropout_p=self.dropout_p if self.training else 0.0)
    return out.transpose(1, 2).reshape(B, N, C), k.mean(dim=1)


def hf_full_logits_loss(self, inputs, attention, labels):
    """The LM loss as HF computes it (and LAVIS's Blip2OPT uses): logits at every position."""
    return self.llm_model(inputs_embeds=inputs, attention_mask=attention, labels=labels, return_dict=True).loss


# -- measurement --------------------------------------------------------------------------------------

def alternate(fns, reps, device, clock="wall"):
    """{name: median seconds} of calling each fn, alternating, after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            benchlib.sync(device)
            t0 = benchlib.now_s(clock)
            fn()
            benchlib.sync(device)
            times[k].append(benchlib.now_s(clock) - t0)
    return {k: benchlib.median(v) for k, v in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="small")
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--only", default=None, help="comma-separated candidate names")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="see step_cost.py --clock")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    benchlib.quiet_warnings()

    import step_cost
    from blip2_offline import build_evlgen

    import evlgen_lavis  # noqa: F401
    import evlgen_lavis.models.tomeformer as T

    cfg = step_cost.SCALES[args.scale]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = benchlib.setup_threads(args.threads)
    clock = "wall" if device.type == "cuda" else args.clock
    half = device.type == "cuda"
    B = args.batch or cfg["batch"]
    vision = step_cost.build_vision(cfg, device, half)
    llm, tok = step_cost.build_llm(cfg, device, half)
    tf_cfg = dict(bert=None, r=cfg["r"], config=dict(cfg["connector"]))
    kw = dict(image_size=cfg["image_size"], max_txt_len=32, end_sym="\n",
              vit_precision="fp16" if half else "fp32", llm_precision="fp16" if half else "fp32")
    torch.manual_seed(0)
    model = build_evlgen(vision, llm, tok, tf_cfg, **kw).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    torch.manual_seed(1)
    images = torch.randn(B, 3, cfg["image_size"], cfg["image_size"], device=device)
    texts = [step_cost.CAPTIONS[i % len(step_cost.CAPTIONS)] for i in range(B)]
    with torch.no_grad():
        feats = model.encode_image(images)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if half else contextlib.nullcontext

    def step(m, samples, optimizer=opt):
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = m(samples)["loss"]
        loss.backward()
        optimizer.step()

    def connector():
        with autocast():
            out = model.llm_proj(model.tomeformer(feats.float())[0])
        out.float().sum().backward()

    wanted = set(args.only.split(",")) if args.only else None
    rows = []

    def record(name, what_a, what_b, t, part, kept, note=""):
        a, b = t["A"], t["B"]
        rows.append([name, what_a, what_b, part, f"{a * 1e3:.1f}", f"{b * 1e3:.1f}", f"{(1 - b / a) * 100:+.1f}%",
                     kept, note])
        print(f"{name}: A {a * 1e3:.1f} ms, B {b * 1e3:.1f} ms, gain {(1 - b / a) * 100:+.1f}%", flush=True)

    def want(name):
        return wanted is None or name in wanted

    if want("merge"):
        def patched(fn):
            def run():
                with mock.patch.object(T, "bipartite_soft_matching", fn):
                    connector()
            return run

        def run_free():
            with step_cost.stub_merging():
                connector()
        t = alternate({"A": patched(bipartite_soft_matching_before), "B": patched(bipartite_soft_matching_scatter),
                       "free": run_free}, args.reps, device, clock)
        share = lambda x: (x - t["free"]) / x * 100  # noqa: E731
        record("merge", "slices + 2 gathers + scatter_reduce + cat per merged tensor",
               "one scatter_add through a per-token destination index", t, "TomeFormer fwd+bwd", "kept (tome.py)",
               f"merging = {share(t['A']):.1f}% (A) / {share(t['B']):.1f}% (B) of the connector's time "
               f"(free stand-in: {t['free'] * 1e3:.1f} ms)")
    if want("fused_qkv"):
        fused = types.MethodType  # bound per layer below

        def run_fused():
            with contextlib.ExitStack() as stack:
                for layer in model.tomeformer.layer:
                    attn = layer.attention.self
                    stack.enter_context(mock.patch.object(attn, "forward", fused(fused_qkv_forward, attn)))
                connector()
        t = alternate({"A": connector, "B": run_fused}, args.reps, device, clock)
        record("fused_qkv", "3 Linear (now)", "1 Linear, weights concatenated per call", t, "TomeFormer fwd+bwd",
               "dropped")
    if want("attn_dropout"):
        def no_attn_dropout():
            layers = [layer.attention.self for layer in model.tomeformer.layer]
            saved = [a.dropout_p for a in layers]
            for a in layers:
                a.dropout_p = 0.0
            try:
                connector()
            finally:
                for a, p in zip(layers, saved):
                    a.dropout_p = p
        t = alternate({"A": connector, "B": no_attn_dropout}, args.reps, device, clock)
        record("attn_dropout", "attention dropout 0.1 (BERT default, now)", "attention dropout 0", t,
               "TomeFormer fwd+bwd", "not adopted (changes the model)",
               "with dropout, SDPA on a CPU falls back to its unfused math path")
    if want("infer_mode"):
        enc = model.visual_encoder

        def no_grad():
            with torch.no_grad(), autocast():
                return enc(images)

        def inference():
            with torch.inference_mode(), autocast():
                out = enc(images)
            return out.clone()  # an inference tensor cannot be saved for backward by the TomeFormer
        t = alternate({"A": no_grad, "B": inference}, args.reps, device, clock)
        record("infer_mode", "torch.no_grad (now)", "torch.inference_mode + clone", t, "frozen encoder fwd",
               "dropped")
    if want("lm_head"):
        full = copy.copy(model)
        full._lm_loss = types.MethodType(hf_full_logits_loss, full)
        samples = {"image_embeds": feats, "text_input": texts}
        t = alternate({"A": lambda: step(model, samples), "B": lambda: step(full, samples)}, args.reps, device, clock)
        record("lm_head", "projection at supervised positions (now)", "HF loss, logits everywhere", t,
               "EVLGen step (cached features)", "kept (evlgen.py, earlier)")
    if want("feat_cache"):
        t = alternate({"A": lambda: step(model, {"image": images, "text_input": texts}),
                       "B": lambda: step(model, {"image_embeds": feats, "text_input": texts})}, args.reps, device, clock)
        record("feat_cache", "encoder in the step", "cached features", t, "EVLGen step",
               "kept (runner: run.cache_vision_features)")
    if want("bf16_llm") and device.type == "cpu":
        llm16 = copy.deepcopy(llm).to(torch.bfloat16)
        torch.manual_seed(0)
        model16 = build_evlgen(vision, llm16, tok, tf_cfg, **kw).train()
        opt16 = torch.optim.AdamW([p for p in model16.parameters() if p.requires_grad], lr=1e-5)
        samples = {"image_embeds": feats, "text_input": texts}
        t = alternate({"A": lambda: step(model, samples), "B": lambda: step(model16, samples, opt16)},
                      args.reps, device, clock)
        record("bf16_llm", "fp32 LLM (CPU default)", "bf16 LLM", t, "EVLGen step (cached features)",
               "not adopted (numerics; see NOTES.md)")

    headers = ["candidate", "A", "B", "timed part", "A ms", "B ms", "gain (1 - B/A)", "status", "note"]
    lines = benchlib.table(headers, rows)
    print("\n".join(lines))
    if args.out:
        doc = [f"# Speed candidates, A/B, scale `{args.scale}`", "",
               f"- command: `{benchlib.command_line()}`",
               f"- machine: {benchlib.machine()}; shared with other jobs (measurement runs serialised by a lock)",
               f"- date: {benchlib.now()}, code {benchlib.git_rev()}",
               f"- batch {B}, {args.reps} alternating repetitions per side, medians of {clock} time, {threads} torch "
               f"thread(s); sizes as step_cost.py `--scale {args.scale}`", ""] + lines
        benchlib.write_text(args.out, doc)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
