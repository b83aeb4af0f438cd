"""The EVLGen model through LAVIS's public API, offline: tiny (random) and demo (real weights) types."""
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

import evlgen_lavis  # noqa: E402,F401
from lavis.common.registry import registry  # noqa: E402
from lavis.models import load_model_and_preprocess  # noqa: E402

CAPTIONS = ["a red circle", "a blue square on the left", "a green triangle", "two yellow stars"]


@pytest.fixture(scope="module")
def tiny():
    model, vis, txt = load_model_and_preprocess("evlgen_opt", "tiny", is_eval=True, device="cpu")
    return model, vis, txt


def _images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def _fresh_tiny():
    return registry.get_model_class("evlgen_opt").from_pretrained("tiny")


def test_registered_names_and_types():
    for name in ("evlgen_opt", "evlgen_llama"):
        assert registry.get_model_class(name) is not None
    assert set(registry.get_model_class("evlgen_opt").PRETRAINED_MODEL_CONFIG_DICT) == {
        "pretrain_opt2.7b", "pretrain_opt6.7b", "caption_coco_opt2.7b", "tiny"}
    assert set(registry.get_model_class("evlgen_llama").PRETRAINED_MODEL_CONFIG_DICT) == {"pretrain_vicuna7b", "demo"}
    for name in ("evlgen_image_train", "evlgen_image_eval"):
        assert registry.get_processor_class(name) is not None


def test_double_import_is_harmless():
    code = (
        "import importlib, evlgen_lavis, evlgen_lavis.models.evlgen_opt as m\n"
        "importlib.reload(m); importlib.reload(evlgen_lavis.processors.image)\n"
        "import evlgen_lavis\n"
        "from lavis.common.registry import registry\n"
        "assert registry.get_model_class('evlgen_opt') is m.EVLGenOPT\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_registering_another_class_under_a_taken_name_fails():
    from evlgen_lavis.common import registry_once
    from evlgen_lavis.models.evlgen import EVLGen

    with pytest.raises(KeyError, match="already registered"):
        registry_once("model", "evlgen_opt")(type("Other", (EVLGen,), {}))


def test_missing_lavis_gives_install_instructions(monkeypatch):
    import importlib.metadata as md

    def fake_version(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", fake_version)
    with pytest.raises(ImportError, match="--no-deps salesforce-lavis==1.0.2"):
        evlgen_lavis._check_lavis()
    monkeypatch.setattr(md, "version", lambda name: "1.0.0")
    with pytest.raises(ImportError, match="1.0.0 is installed"):
        evlgen_lavis._check_lavis()


@pytest.mark.parametrize("mode,size", [("L", (40, 30)), ("RGBA", (64, 64)), ("P", (10, 300)), ("1", (8, 8)),
                                       ("I;16", (50, 20)), ("CMYK", (33, 33)), ("RGB", (1, 1)), ("LA", (2000, 900))])
def test_processors_accept_any_pil_image(tiny, mode, size):
    _, vis, _ = tiny
    image = Image.new(mode, size)
    for split in ("train", "eval"):
        out = vis[split](image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_processor_composites_transparency_on_white(tiny):
    _, vis, _ = tiny
    clear = vis["eval"](Image.new("RGBA", (16, 16), (0, 0, 0, 0)))
    white = vis["eval"](Image.new("RGB", (16, 16), (255, 255, 255)))
    torch.testing.assert_close(clear, white)
    with pytest.raises(TypeError, match="PIL"):
        vis["eval"]("not an image")


def test_forward_gives_finite_lm_loss_and_caption_only_labels(tiny):
    model, _, _ = tiny
    out = model({"image": _images(), "text_input": CAPTIONS})
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0
    ids, mask, labels = model._caption_targets(["a cat"])
    n_bos = len(model.bos_ids)
    assert (labels[0, :n_bos] == -100).all()  # bos (and the prompt) are never supervised
    supervised = labels[0][labels[0] != -100].tolist()
    assert model.llm_tokenizer.decode(supervised) == "a cat\n"  # caption + end_sym


def test_lm_loss_equals_the_hf_models_own_loss(tiny):
    """Our loss projects only the supervised positions onto the vocabulary; it must equal HF's full loss."""
    model, _, _ = tiny
    soft, _, _ = model.soft_prompts({"image": _images(3)})
    ids, mask, labels = model._caption_targets(CAPTIONS[:3])
    inputs = torch.cat([soft, model._embed(ids)], dim=1)
    attention = torch.cat([torch.ones(3, soft.shape[1], dtype=torch.long), mask], dim=1)
    labels = torch.cat([torch.full((3, soft.shape[1]), -100), labels], dim=1)
    with torch.no_grad():
        ours = model._lm_loss(inputs, attention, labels)
        theirs = model.llm_model(inputs_embeds=inputs, attention_mask=attention, labels=labels).loss
    torch.testing.assert_close(ours, theirs)


def test_prompt_tokens_are_masked():
    model = _fresh_tiny()
    model.prompt = "a photo of"
    ids, mask, labels = model._caption_targets(["a dog", "two very small dogs"])
    supervised = [model.llm_tokenizer.decode(row[row != -100].tolist()) for row in labels]
    assert supervised == [" a dog\n", " two very small dogs\n"]
    lengths = mask.sum(1)
    assert lengths[0] < lengths[1] == ids.shape[1]  # right padding, and only the padding is masked
    assert mask[0].tolist() == [1] * lengths[0] + [0] * (ids.shape[1] - lengths[0])


def test_gradients_reach_only_trainable_and_frozen_weights_unchanged():
    model = _fresh_tiny()
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("tomeformer.", "llm_proj.")) for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("visual_encoder.") for n in frozen) and any(n.startswith("llm_model.") for n in frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = model({"image": _images(), "text_input": CAPTIONS})["loss"]
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and
               (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not no_grad, f"trainable tensors without a gradient: {no_grad}"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(before[n], p), n
        else:
            assert torch.equal(frozen[n], p), f"frozen weight {n} changed"
    assert not model.visual_encoder.training and not model.llm_model.training  # frozen parts stay in eval


def test_tiny_model_overfits_four_pairs():
    torch.manual_seed(0)
    model = _fresh_tiny()
    model.train()
    samples = {"image": _images(), "text_input": CAPTIONS}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(120):
        loss = model(samples)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], f"loss {losses[0]:.2f} -> {losses[-1]:.2f}"


def test_generate_beam_search_and_nucleus_sampling(tiny):
    model, _, _ = tiny
    samples = {"image": _images(2)}
    beams = model.generate(samples, num_beams=3, max_length=6, num_captions=2)
    assert len(beams) == 4 and all(isinstance(c, str) for c in beams)
    greedy = model.generate(samples, num_beams=1, max_length=6)
    assert greedy == model.generate(samples, num_beams=1, max_length=6)  # deterministic
    assert len(greedy) == 2
    torch.manual_seed(0)
    sampled = model.generate(samples, use_nucleus_sampling=True, num_beams=1, max_length=6, num_captions=3,
                             top_p=0.9, temperature=1.0)
    assert len(sampled) == 6
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(samples, num_beams=2, num_captions=3)


def test_generation_ignores_batch_padding(tiny):
    """A sample's answer must not depend on what else is in its batch (left padding is handled)."""
    model, _, _ = tiny
    images = _images(2, seed=3)
    alone = model.predict_answers({"image": images[:1], "text_input": ["what?"]}, num_beams=1, max_len=5)
    batched = model.predict_answers(
        {"image": images, "text_input": ["what?", "what colour is the very large shape in the middle?"]},
        num_beams=1, max_len=5)
    assert batched[0] == alone[0]


def test_predict_answers(tiny):
    model, _, _ = tiny
    answers = model.predict_answers({"image": _images(3), "text_input": ["what colour?", "which shape?", "how many?"]},
                                    num_beams=2, max_len=4)
    assert len(answers) == 3 and all(isinstance(a, str) and "\n" not in a for a in answers)


def test_trainable_only_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _fresh_tiny()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model({"image": _images(), "text_input": CAPTIONS})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.trainable_state_dict(), "iters": 3}, path)
    state = torch.load(path)["model"]
    assert state and not any(k.startswith(("llm_model.", "visual_encoder.")) for k in state)

    other = _fresh_tiny().eval()
    samples = {"image": _images(2, seed=5), "text_input": CAPTIONS[:2]}
    with torch.no_grad():
        assert not torch.equal(other(samples)["loss"], model(samples)["loss"])
        other.load_checkpoint(str(path))
        torch.testing.assert_close(other(samples)["loss"], model(samples)["loss"], rtol=0, atol=0)
    assert other.generate(samples, num_beams=2, max_length=5) == model.generate(samples, num_beams=2, max_length=5)


def test_checkpoint_errors(tmp_path):
    model = _fresh_tiny()
    state = model.trainable_state_dict()
    torch.save({"model": {**state, "not_a_param": torch.zeros(1)}}, tmp_path / "extra.pth")
    with pytest.raises(KeyError, match="not_a_param"):
        model.load_checkpoint(str(tmp_path / "extra.pth"))
    state.pop("llm_proj.weight")
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(KeyError, match="llm_proj.weight"):
        model.load_checkpoint(str(tmp_path / "partial.pth"))
    with pytest.raises(FileNotFoundError):
        model.load_checkpoint(str(tmp_path / "nope.pth"))


def test_bad_input_errors(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="empty"):
        model({"image": _images(2), "text_input": []})
    with pytest.raises(ValueError, match="batch-size mismatch: 2 images but 3"):
        model({"image": _images(2), "text_input": CAPTIONS[:3]})
    with pytest.raises(KeyError, match="image"):
        model({"text_input": CAPTIONS[:2]})
    with pytest.raises(ValueError, match="vision tokens"):
        model({"image_embeds": torch.randn(2, 5, 32), "text_input": CAPTIONS[:2]})


def test_bad_config_errors():
    cls = registry.get_model_class("evlgen_opt")
    cfg = OmegaConf.load(cls.default_config_path("tiny")).model
    cfg.tomeformer.r = [8, 8]  # 17 tokens - 16 leaves only the class token
    with pytest.raises(ValueError, match="lower r"):
        cls.from_config(cfg)
    cfg.tomeformer.r = 4
    cfg.vision_encoder = "resnet9000"
    with pytest.raises(ValueError, match="known: eva_clip_g"):
        cls.from_config(cfg)
    with pytest.raises(AssertionError, match="Unknown model type"):
        cls.default_config_path("opt-42b")


def test_cached_features_give_the_same_loss(tiny):
    model, _, _ = tiny
    images = _images(2)
    with torch.no_grad():
        direct = model({"image": images, "text_input": CAPTIONS[:2]})["loss"]
        cached = model({"image_embeds": model.encode_image(images), "text_input": CAPTIONS[:2]})["loss"]
    torch.testing.assert_close(direct, cached)


def test_paper_types_parse_with_paper_settings():
    cls = registry.get_model_class("evlgen_opt")
    for model_type, llm in [("pretrain_opt2.7b", "facebook/opt-2.7b"), ("pretrain_opt6.7b", "facebook/opt-6.7b"),
                            ("caption_coco_opt2.7b", "facebook/opt-2.7b")]:
        cfg = OmegaConf.load(cls.default_config_path(model_type))
        m = cfg.model
        assert (m.vision_encoder, m.image_size, m.llm) == ("eva_clip_g", 224, llm)
        assert (m.tomeformer.bert, m.tomeformer.num_layers, m.tomeformer.r) == ("bert-base-uncased", 12, 19)
        assert cfg.preprocess.vis_processor.eval.image_size == m.image_size
    vic = OmegaConf.load(registry.get_model_class("evlgen_llama").default_config_path("pretrain_vicuna7b")).model
    assert vic.llm == "lmsys/vicuna-7b-v1.1" and vic.tomeformer.r == 19


def test_paper_shapes_at_full_size_with_random_weights():
    """EVA-CLIP-g's real token grid and width (one block instead of 39), the paper's TomeFormer, OPT-2.7B's
    embedding width: 257 tokens -> 29 soft tokens of width 2560."""
    from functools import partial

    from lavis.models.eva_vit import VisionTransformer
    from torch import nn
    from transformers import BertConfig, OPTConfig

    from evlgen_lavis.models.tomeformer import TomeFormer

    vit = VisionTransformer(img_size=224, patch_size=14, embed_dim=1408, depth=1, num_heads=16, mlp_ratio=4.3637,
                            qkv_bias=True, use_mean_pooling=False, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    tf = TomeFormer(BertConfig(), r=19, vision_width=vit.num_features).eval()  # bert-base-uncased shape
    opt_width = OPTConfig(hidden_size=2560, word_embed_proj_dim=2560).word_embed_proj_dim
    llm_proj = nn.Linear(tf.hidden_size, opt_width)
    with torch.no_grad():
        feats = vit(torch.randn(1, 3, 224, 224))
        tokens, sizes = tf(feats)
        soft = llm_proj(tokens)
    assert feats.shape == (1, 257, 1408)
    assert soft.shape == (1, 29, 2560) and sizes.sum().item() == 257


@pytest.mark.slow
def test_demo_type_loads_offline_and_generates():
    model, vis, txt = load_model_and_preprocess("evlgen_llama", "demo", is_eval=True, device="cpu")
    assert model.num_soft_tokens == 13 and model.visual_encoder.num_tokens == 49
    assert model.llm_tokenizer.eos_token == "<|im_end|>" and model.eos_token_id == 2
    image = vis["eval"](Image.new("P", (64, 64)))
    assert image.shape == (3, 224, 224)
    samples = {"image": image[None].repeat(2, 1, 1, 1), "text_input": ["a blue circle", "a red square"]}
    assert torch.isfinite(model(samples)["loss"])
    captions = model.generate(samples, num_beams=2, max_length=6)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    tok = model.llm_tokenizer
    ids = tok("The capital of France is", add_special_tokens=False, return_tensors="pt").input_ids
    out = model.llm_model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])  # the real SmolLM2 weights, not random ones
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 5e6 < trainable < 2e7


def test_llm_and_bert_accept_local_folders(tmp_path):
    """Paper types name hub models; a local folder must work the same way (open_clip-style)."""
    from transformers import BertConfig, BertModel

    source = _fresh_tiny()
    source.llm_model.save_pretrained(tmp_path / "opt")
    source.llm_tokenizer.save_pretrained(tmp_path / "opt")
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
              ).save_pretrained(tmp_path / "bert")
    cls = registry.get_model_class("evlgen_opt")
    cfg = OmegaConf.load(cls.default_config_path("tiny")).model
    cfg.llm = str(tmp_path / "opt")
    cfg.tomeformer = {"bert": str(tmp_path / "bert"), "num_layers": 2, "r": 4}
    model = cls.from_config(cfg).eval()
    for (name, p), q in zip(model.llm_model.named_parameters(), source.llm_model.parameters()):
        assert torch.equal(p, q), name
    assert len(model.tomeformer.layer) == 2
    assert model.generate({"image": _images(1)}, num_beams=1, max_length=3)[0] is not None


def _contrastive_model():
    cls = registry.get_model_class("evlgen_opt")
    cfg = OmegaConf.load(cls.default_config_path("tiny")).model
    cfg.beta = 0.5
    torch.manual_seed(0)
    return cls.from_config(cfg)


def test_contrastive_loss_adds_to_lm_loss_and_trains_its_head():
    model = _contrastive_model()
    model.train()
    out = model({"image": _images(), "text_input": CAPTIONS})
    assert set(out) == {"loss", "loss_lm", "loss_itc"}
    torch.testing.assert_close(out["loss"], out["loss_lm"] + 0.5 * out["loss_itc"])
    out["loss"].backward()
    assert model.itc_proj.weight.grad is not None and model.itc_temp.grad is not None
    assert all(not p.requires_grad for p in model.text_encoder.parameters())


def _ddp_contrastive(rank, world, port, images, captions, result):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _contrastive_model().eval()
    n = images.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    with torch.no_grad():
        soft, sizes, tokens = model.soft_prompts({"image": images[sl]})
        result[rank] = model._contrastive_loss(tokens, sizes, captions[sl]).item()
    dist.destroy_process_group()


def test_contrastive_loss_gathers_across_ranks():
    """Two ranks with half the batch each: the mean of their losses equals one process on the whole
    batch, because every rank scores its images against the texts of all ranks (and vice versa)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    images = _images(4, seed=9)
    model = _contrastive_model().eval()
    with torch.no_grad():
        soft, sizes, tokens = model.soft_prompts({"image": images})
        whole = model._contrastive_loss(tokens, sizes, CAPTIONS).item()
    result = mp.Manager().dict()
    mp.spawn(_ddp_contrastive, args=(2, port, images, CAPTIONS, result), nprocs=2, join=True)
    assert abs((result[0] + result[1]) / 2 - whole) < 1e-5
    assert abs(result[0] - result[1]) > 1e-6  # each rank scored different rows
