"""The benchmark scripts run end to end at toy sizes (CPU, offline, seconds) and print what they promise.

The numbers themselves are not tested (they live in benchmarks/results/, measured on purpose); this only
guards that `step_cost.py`, `convergence.py` and `speed_work.py` keep working as the package changes, and
that the offline BLIP-2 construction matches LAVIS's.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _run(args, timeout=240):
    out = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _module(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_step_cost_tiny_ends_with_the_ratio(tmp_path):
    report = tmp_path / "step_cost.md"
    out = _run([BENCH / "step_cost.py", "--scale", "tiny", "--steps", "3", "--warmup", "0", "--gen-reps", "1",
                "--out", report])
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert "wrote" in lines[-1]
    last = lines[-2]
    assert "ratio" in last and "EVLGen / BLIP-2 stage-2" in last
    assert float(last.split(":")[-1].split()[0]) > 0
    for row in ("| floor |", "| EVLGen |", "| EVLGen cached |", "| BLIP-2 s2 |", "| BLIP-2 s1 |",
                "| BLIP-2 s2 (EVLGen harness) |"):
        assert row in out
    assert "merging overhead" in out and "generate latency" in out and "spread of the 3 timed steps" in out
    assert "EVLGen / BLIP-2 s2 overlap" in out or "EVLGen / BLIP-2 s2 disjoint" in out
    text = report.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len({line.count(" | ") for line in table}) == 1, "every row has the header's columns"
    assert "- command: `python benchmarks/step_cost.py --scale tiny" in text and "- machine:" in text


def test_step_cost_connectors_only_path():
    """The path --scale paper takes on a CPU, at tiny size."""
    out = _run([BENCH / "step_cost.py", "--scale", "tiny", "--connectors-only", "--steps", "1", "--warmup", "0"])
    last = out.strip().splitlines()[-1]
    assert "ratio" in last and "connectors only" in last
    assert "| floor |" not in out


def test_step_cost_model_subset_and_flag_conflicts():
    """--models keeps a subset (plus the two the ratio needs); contradictory flags are refused by name."""
    out = _run([BENCH / "step_cost.py", "--scale", "tiny", "--models", "floor", "--steps", "1", "--warmup", "0",
                "--gen-reps", "1"])
    assert "| floor |" in out and "| EVLGen |" in out and "| BLIP-2 s2 |" in out
    assert "| BLIP-2 s1 |" not in out and "| EVLGen cached |" not in out
    assert "EVLGen step / floor step" in out and "ratio" in out.strip().splitlines()[-1]
    bad = subprocess.run([sys.executable, BENCH / "step_cost.py", "--scale", "tiny", "--models", "floor,nope"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown ['nope']" in bad.stderr
    bad = subprocess.run([sys.executable, BENCH / "step_cost.py", "--connectors-only", "--full-models"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "contradict" in bad.stderr


def test_generate_latency_times_each_model_itself():
    """Each timed generate call goes to the model it is labelled with (a loop variable once rebound the
    EVLGen closure to the last model in the dict, so "EVLGen" timed another model's generate)."""
    import contextlib
    import types

    step_cost = _module("step_cost")
    calls = []

    class Fake(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def generate(self, samples, **kwargs):
            calls.append(self.name)
            return ["x"]

        generate_embeds = generate

    models = {name: Fake(name) for name in ("floor", "EVLGen", "BLIP-2 s2", "BLIP-2 s1")}
    runner = types.SimpleNamespace(batch={"image": torch.zeros(1, 3, 8, 8)}, device=torch.device("cpu"),
                                   autocast=contextlib.nullcontext)
    times = step_cost.generate_latency(models, runner, tokens=2, reps=2)
    assert set(times) >= {"EVLGen", "BLIP-2 s2"}
    assert calls.count("EVLGen") == 3 and calls.count("BLIP-2 s2") == 3  # warm-up + 2 timed each
    assert "BLIP-2 s1" not in calls and "floor" not in calls


def test_table_keeps_generated_text_in_its_cell():
    benchlib = _module("benchlib")
    rows = [["a", "A.\n\nThe | end"], ["b", 3], ["c", "x\\|y"], ["d", "a\r\nb\rc"]]
    lines = benchlib.table(["variant", "caption"], rows)
    assert len(lines) == 2 + len(rows)
    assert lines[2] == "| a | A.\\n\\nThe \\| end |" and lines[3] == "| b | 3 |"
    assert lines[4] == "| c | x\\\\\\|y |"  # the backslash escaped, then the pipe: still one cell
    assert lines[5] == "| d | a\\nb\\nc |"


def test_ranges_overlap():
    benchlib = _module("benchlib")
    assert benchlib.ranges_overlap((1.0, 2.0), (1.5, 3.0)) and benchlib.ranges_overlap((1.0, 3.0), (1.5, 2.0))
    assert benchlib.ranges_overlap((1.0, 2.0), (2.0, 3.0))  # touching: a tie
    assert not benchlib.ranges_overlap((2.075, 2.255), (2.478, 3.002))
    assert not benchlib.ranges_overlap((3.0, 4.0), (1.0, 2.0))


def test_convergence_caveats_follow_the_variants_run():
    import types

    conv = _module("convergence")
    args = types.SimpleNamespace(batch=16, clock="wall", evlgen_r=None, queries=32)

    def run(variant, tokens, cpu):
        return {"variant": variant, "label": conv.label(variant, args), "soft_tokens": tokens}, [{"cpu": cpu}]

    only_evlgen = conv.caveats([run("evlgen", 13, 1000.0), run("evlgen_10pct", 13, 990.0)], args)
    assert only_evlgen == ["- none beyond the seed and the test-set size."]
    mixed = "\n".join(conv.caveats([run("evlgen", 13, 1000.0), run("blip2_2stage", 32, 800.0)], args))
    assert "Blip2Qformer.forward" in mixed and "fresh AdamW" in mixed
    assert "EVLGen 13, BLIP-2 2-stage 32" in mixed
    assert "BLIP-2 2-stage got less than 90%" in mixed
    args.clock = "cpu"  # a CPU-time budget: every variant gets the same CPU, no warning
    assert "less than 90%" not in "\n".join(conv.caveats([run("evlgen", 13, 1000.0), run("blip2_lm", 32, 800.0)],
                                                         args))
    args.evlgen_r, args.queries = 0, 13
    assert conv.label("evlgen", args) == "EVLGen (r=0)" and conv.label("blip2_lm", args) == "BLIP-2 LM only (13 queries)"


def test_convergence_tiny_runs_end_to_end(tmp_path):
    report = tmp_path / "conv.md"
    out = _run([BENCH / "convergence.py", "--model", "tiny", "--budget", "1", "--evals", "1", "--eval-images", "8",
                "--train-images", "32", "--batch", "4", "--out", report])
    assert "ratio BLIP-2 LM only / EVLGen" in out and "ratio EVLGen 10% data / EVLGen" in out
    text = report.read_text()
    for label in ("| EVLGen |", "| BLIP-2 LM only |", "| BLIP-2 2-stage |", "| EVLGen 10% data |"):
        assert label in text
    assert (tmp_path / "conv.png").stat().st_size > 1000 and (tmp_path / "conv.json").exists()
    # the report re-renders from the saved curves with other targets, keeping the run's header
    out = _run([BENCH / "convergence.py", "--from-json", tmp_path / "conv.json", "--target-acc", "0.0",
                "--target-cider", "0.0", "--out", report])
    text = report.read_text()
    assert "re-rendered" in text and "--train-images 32" in text and "time to acc >= 0" in text


def test_speed_work_tiny():
    out = _run([BENCH / "speed_work.py", "--scale", "tiny", "--reps", "1", "--only", "merge,fused_qkv,lm_head"])
    for name in ("| merge |", "| fused_qkv |", "| lm_head |"):
        assert name in out


@pytest.mark.parametrize("n,r,class_token", [(257, 19, True), (49, 4, False), (17, 4, True), (12, 100, False)])
def test_merge_candidates_agree(n, r, class_token):
    """The merge implementations compared in speed_work.py compute the same thing as the package's."""
    sw = _module("speed_work")
    from evlgen_lavis.models.tome import bipartite_soft_matching

    torch.manual_seed(0)
    metric, x = torch.randn(3, n, 8), torch.randn(3, n, 5, dtype=torch.float64)
    merges = [f(metric, r, class_token)[0] for f in (bipartite_soft_matching, sw.bipartite_soft_matching_before,
                                                      sw.bipartite_soft_matching_scatter)]
    for mode in ("sum", "mean", "amax"):
        ref = merges[0](x, mode)
        for merge in merges[1:]:
            torch.testing.assert_close(merge(x, mode), ref)


def test_offline_qformer_matches_lavis_layout():
    """build_qformer + strip_for_stage2 give LAVIS's Q-Former parameter names (loadable from its checkpoints)."""
    bo = _module("blip2_offline")
    from evlgen_lavis.models.assets import minilm_dir

    tok = bo.bert_tokenizer(minilm_dir())
    config = bo.qformer_config(48, 4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64)
    qformer, queries = bo.build_qformer(config, vocab_size=len(tok))
    names = {n for n, _ in qformer.named_parameters()}
    assert "bert.encoder.layer.0.crossattention.self.key.weight" in names  # cross-attention every 2nd layer
    assert "bert.encoder.layer.1.crossattention.self.key.weight" not in names
    assert "bert.encoder.layer.0.intermediate_query.dense.weight" in names
    layer0 = qformer.bert.encoder.layer[0]
    torch.testing.assert_close(layer0.intermediate_query.dense.weight, layer0.intermediate.dense.weight)
    assert queries.shape == (1, 4, 32) and len(tok) == 30523
    connector = bo.QFormerConnector(bo.strip_for_stage2(qformer), queries, 48)
    tokens, sizes = connector(torch.randn(2, 17, 48))
    assert tokens.shape == (2, 4, 32) and torch.all(sizes == 1)


def test_paper_scale_builds_with_the_right_shapes():
    """--scale paper's frozen parts (EVA-ViT-g, OPT-2.7B) and connectors, built on the meta device (no memory)."""
    sc = _module("step_cost")
    bo = _module("blip2_offline")
    from transformers import BertConfig

    from evlgen_lavis.models.tomeformer import TomeFormer

    cfg = sc.SCALES["paper"]
    meta = torch.device("meta")
    vision = sc.build_vision(cfg, meta, half=True)
    assert (vision.num_features, vision.num_tokens) == (1408, 257)
    assert 0.95e9 < sum(p.numel() for p in vision.parameters()) < 1.05e9  # ViT-g: about 1.0B
    llm, _ = sc.build_llm(cfg, meta, half=True)
    assert 2.6e9 < sum(p.numel() for p in llm.parameters()) < 2.7e9  # OPT-2.7B: 2.65B
    assert llm.dtype == torch.float16
    with meta:
        tf = TomeFormer(BertConfig(**cfg["connector"]), r=cfg["r"], vision_width=1408)
        qformer, queries = bo.build_qformer(bo.qformer_config(1408, cfg["queries"], **cfg["connector"]))
    assert tf.check_input_tokens(257) == 29 and queries.shape == (1, 32, 768)
    assert len(qformer.bert.encoder.layer) == 12
