"""EVLGen-video: the temporal module (placements, zero-gate identity, order awareness), the registered video
models, the decord processors, the video datasets and builders, the synthetic clips, and a tiny training run
through train.py. Everything is offline and CPU-sized (tiny ViTs, the tiny OPT, generated mp4 files)."""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import evlgen_lavis  # noqa: E402,F401
from lavis.common.config import Config  # noqa: E402
from lavis.common.registry import registry  # noqa: E402
from lavis.models import load_model_and_preprocess  # noqa: E402

from evlgen_lavis.datasets.motion_clips import (  # noqa: E402
    KINDS, caption_of, direction_of, motion_scores, prepare_motion_clips, render_clip, write_mp4)
from evlgen_lavis.models.temporal import TemporalAttention, frames, insert_into_blocks, temporal_modules  # noqa: E402
from evlgen_lavis.processors.video import UnreadableVideoError, frame_indices, read_frames  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VIDEO_PROJECT = REPO / "projects" / "evlgen" / "video"
CAPTIONS = ["a red circle moves up", "a blue rectangle moves down", "a green triangle", "two yellow stars"]


def _clips(n=2, T=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, T, size, size, generator=g)  # (B, 3, T, H, W)


def _tiny_video(**temporal):
    cls = registry.get_model_class("evlgen_video_opt")
    cfg = OmegaConf.load(cls.default_config_path("tiny")).model
    for key, value in temporal.items():
        cfg.temporal[key] = value
    return cls.from_config(cfg)


def _open_gates(model, value=0.5, pos=0.3, seed=0):
    """Non-zero gates and position embeddings (a trained-looking temporal module)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in temporal_modules(model):
            m.gate.fill_(value)
            if m.pos_embed is not None:
                m.pos_embed.copy_(torch.randn(m.pos_embed.shape, generator=g) * pos)


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory):
    """An evlgen_opt tiny model and a checkpoint of its trainable weights (what the runner writes)."""
    torch.manual_seed(1)
    image = registry.get_model_class("evlgen_opt").from_pretrained("tiny").eval()
    path = tmp_path_factory.mktemp("image_ckpt") / "checkpoint_6.pth"
    torch.save({"model": image.trainable_state_dict(), "iters": 6}, path)
    return image, str(path)


# -- registration and configs ---------------------------------------------------------------------------

def test_registered_video_names_and_types():
    assert set(registry.get_model_class("evlgen_video_opt").PRETRAINED_MODEL_CONFIG_DICT) == {
        "caption_msrvtt_opt2.7b", "tiny"}
    assert set(registry.get_model_class("evlgen_video_llama").PRETRAINED_MODEL_CONFIG_DICT) == {"demo"}
    for name in ("evlgen_video_train", "evlgen_video_eval"):
        assert registry.get_processor_class(name) is not None
    for name in ("local_video_caption", "evlgen_msrvtt_caption", "evlgen_msvd_caption", "motion_shapes_caption"):
        assert registry.get_builder_class(name) is not None


@pytest.mark.parametrize("video_arch, video_type, image_arch, image_type", [
    ("evlgen_video_opt", "tiny", "evlgen_opt", "tiny"),
    ("evlgen_video_llama", "demo", "evlgen_llama", "demo"),
    ("evlgen_video_opt", "caption_msrvtt_opt2.7b", "evlgen_opt", "pretrain_opt2.7b"),
])
def test_video_types_have_the_image_types_image_parts(video_arch, video_type, image_arch, image_type):
    video = OmegaConf.load(registry.get_model_class(video_arch).default_config_path(video_type)).model
    image = OmegaConf.load(registry.get_model_class(image_arch).default_config_path(image_type)).model
    skip = {"arch", "model_type", "temporal", "vit_precision"}
    assert {k: v for k, v in video.items() if k not in skip} == {k: v for k, v in image.items() if k not in skip}
    assert video.temporal.hidden_dim in (16, 256) and "placement" in video.temporal


PAPER_FT = {"max_iters": 50000, "iters_per_inner_epoch": 1000, "lr_sched": "linear_warmup_cosine_lr",
            "init_lr": 1e-5, "min_lr": 1e-6, "warmup_lr": 1e-8, "warmup_steps": 1000, "weight_decay": 0.05,
            "batch_size_train": 4, "batch_size_eval": 4, "max_len": 20, "min_len": 5, "num_beams": 5, "amp": True}


@pytest.mark.parametrize("rel, builder", [("caption_msrvtt_opt2.7b_ft.yaml", "evlgen_msrvtt_caption"),
                                          ("caption_msvd_opt2.7b_ft.yaml", "evlgen_msvd_caption"),
                                          ("caption_msrvtt_opt2.7b_eval.yaml", "evlgen_msrvtt_caption"),
                                          ("caption_msvd_opt2.7b_eval.yaml", "evlgen_msvd_caption")])
def test_paper_video_configs(rel, builder):
    from evlgen_lavis.runners import load_config
    from evlgen_lavis.runners.settings import RunSettings

    import argparse

    cfg = Config(argparse.Namespace(cfg_path=str(VIDEO_PROJECT / rel), options=None))
    model, run = cfg.model_cfg, cfg.run_cfg
    assert (model.arch, model.model_type, model.vision_encoder, model.llm) == (
        "evlgen_video_opt", "caption_msrvtt_opt2.7b", "eva_clip_g", "facebook/opt-2.7b")
    assert (model.tomeformer.num_layers, model.tomeformer.r, model.temporal.placement) == (12, 19, "blocks")
    assert (model.temporal.hidden_dim, model.temporal.num_heads, model.temporal.order_aware) == (256, 8, False)
    assert list(cfg.datasets_cfg) == [builder] and cfg.datasets_cfg[builder].data_type == "videos"
    for split, proc in cfg.datasets_cfg[builder].vis_processor.items():
        assert (proc.name, proc.n_frms, proc.image_size) == (f"evlgen_video_{split}", 4, 224)
    assert (run.num_beams, run.max_len, run.min_len) == (5, 20, 5)
    if rel.endswith("_ft.yaml"):
        assert {k: run[k] for k in PAPER_FT} == PAPER_FT
    else:
        assert run.evaluate and list(run.test_splits) == ["test"] and run.batch_size_eval == 12
    RunSettings.from_run_cfg(load_config(["--cfg-path", str(VIDEO_PROJECT / rel)]).run_cfg)


def test_msrvtt_builder_reads_lavis_layout(tmp_path, monkeypatch):
    """Our MSR-VTT defaults are LAVIS's storage paths; LAVIS's annotation format builds."""
    ours = OmegaConf.load(registry.get_builder_class("evlgen_msrvtt_caption").default_config_path())
    lavis = OmegaConf.load(registry.get_builder_class("msrvtt_caption").default_config_path())
    ours_info, lavis_info = ours.datasets.evlgen_msrvtt_caption.build_info, lavis.datasets.msrvtt_cap.build_info
    for split in ("train", "val", "test"):
        assert ours_info.annotations[split].storage == lavis_info.annotations[split].storage
    assert ours_info.videos.storage == lavis_info.videos.storage
    root = tmp_path / "msrvtt"
    (root / "videos").mkdir(parents=True)
    (root / "annotations").mkdir()
    write_mp4(render_clip("red", "circle", "left", np.random.default_rng(0), 32, 4), str(root / "videos" / "video7.mp4"))
    (root / "annotations" / "cap_test.json").write_text(json.dumps(
        [{"video": "video7.mp4", "caption": ["a red ball", "a ball moves"], "image_id": "video7"}]))
    for split in ("train", "val"):
        (root / "annotations" / f"cap_{split}.json").write_text(json.dumps(
            [{"video": "video7.mp4", "caption": "a red ball", "image_id": "video7"}]))
    monkeypatch.chdir(tmp_path)  # relative storage resolves against the working directory first
    cfg = OmegaConf.merge(ours.datasets.evlgen_msrvtt_caption, {
        "vis_processor": {"train": {"name": "evlgen_video_train", "image_size": 32, "n_frms": 3},
                          "eval": {"name": "evlgen_video_eval", "image_size": 32, "n_frms": 3}},
        "build_info": {"splits": ["train", "test"]}})
    datasets = registry.get_builder_class("evlgen_msrvtt_caption")(cfg).build_datasets()
    assert sorted(datasets) == ["test", "train"]
    sample = datasets["test"][0]
    assert sample["video"].shape == (3, 3, 32, 32) and sample["image_id"] == "video7"
    assert datasets["test"].annotation[0]["caption"] == ["a red ball", "a ball moves"]
    train = datasets["train"][0]
    assert train["text_input"] == "a red ball" and train["video"].shape == (3, 3, 32, 32)


def test_lavis_own_video_datasets_feed_the_model(tmp_path):
    """LAVIS's msrvtt_caption / msvd_caption datasets with our processors give batches the model takes."""
    from lavis.datasets.datasets.video_caption_datasets import VideoCaptionDataset, VideoCaptionEvalDataset
    from lavis.processors.blip_processors import BlipCaptionProcessor

    from evlgen_lavis.processors.video import EVLGenVideoEvalProcessor

    (tmp_path / "videos").mkdir()
    write_mp4(render_clip("red", "circle", "left", np.random.default_rng(0), 32, 5), str(tmp_path / "videos" / "v.mp4"))
    (tmp_path / "a.json").write_text(json.dumps([{"video": "v.mp4", "caption": "a red ball", "image_id": "v"}]))
    args = (EVLGenVideoEvalProcessor(32, 3), BlipCaptionProcessor(), str(tmp_path / "videos"), [str(tmp_path / "a.json")])
    train, test = VideoCaptionDataset(*args), VideoCaptionEvalDataset(*args)
    model = _tiny_video().eval()
    with torch.no_grad():
        assert torch.isfinite(model(train.collater([train[0], train[0]]))["loss"])
    assert len(model.generate(test.collater([test[0]]), num_beams=1, max_length=3)) == 1


# -- the temporal module -----------------------------------------------------------------------------------

def test_temporal_attention_shapes_identity_and_order():
    torch.manual_seed(0)
    x = torch.randn(2 * 4, 5, 16)  # (B*T, N, C), clip-major
    paper, ordered = TemporalAttention(16, 8, 2), TemporalAttention(16, 8, 2, order_aware=True)
    ordered.load_state_dict({**paper.state_dict(), "pos_embed": ordered.pos_embed}, strict=True)
    for m in (paper, ordered):
        with frames([m], 4):
            assert torch.equal(m(x), x)  # gate at zero: exactly the identity
    with torch.no_grad():
        for m in (paper, ordered):
            m.gate.fill_(1.0)
        ordered.pos_embed.normal_()
    reverse = x.view(2, 4, 5, 16).flip(1).reshape(8, 5, 16)
    with frames([paper, ordered], 4):
        out, out_rev = paper(x).view(2, 4, 5, 16), paper(reverse).view(2, 4, 5, 16)
        torch.testing.assert_close(out_rev, out.flip(1))  # the paper's module: permutation-equivariant
        torch.testing.assert_close(out.mean(1), out_rev.mean(1))  # ... so the frame mean is order-blind
        o, o_rev = ordered(x).view(2, 4, 5, 16), ordered(reverse).view(2, 4, 5, 16)
        assert (o.mean(1) - o_rev.mean(1)).abs().max() > 1e-3  # order-aware: a clip and its reverse differ
        assert not torch.equal(paper(x).view(2, 4, 5, 16)[:, 0], x.view(2, 4, 5, 16)[:, 0])  # frames mix
    with frames([paper], 3), pytest.raises(ValueError, match="multiple of 3"):
        paper(x)
    with frames([ordered], 17), pytest.raises(ValueError, match="max_frames"):
        ordered(torch.randn(17, 5, 16))


def _tiny_timm_vit():
    from timm.models.vision_transformer import ResPostBlock, VisionTransformer

    torch.manual_seed(0)
    return (VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0),
            VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                              block_fn=ResPostBlock))


def _tiny_clip_vit():
    from lavis.models.clip_vit import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(input_resolution=32, patch_size=8, width=32, layers=3, heads=2,
                             use_grad_checkpointing=False)


@pytest.mark.parametrize("family", ["eva", "timm", "timm_post", "clip"])
def test_insertion_into_vit_blocks(family):
    from evlgen_lavis.models.vision import build_tiny_vit

    if family == "eva":
        vit = build_tiny_vit()
    elif family == "clip":
        vit = _tiny_clip_vit()
    else:
        vit = _tiny_timm_vit()[family == "timm_post"]
    vit.eval()
    run = (lambda m, x: m.forward_features(x)) if family.startswith("timm") else (lambda m, x: m(x))
    names_before = set(vit.state_dict())
    images = torch.randn(2 * 3, 3, 32, 32)  # 2 clips of 3 frames
    with torch.no_grad():
        before = run(vit, images)
    modules = insert_into_blocks(vit, 32, hidden_dim=8, num_heads=2)
    assert len(modules) == 2
    new = set(vit.state_dict()) - names_before
    assert names_before <= set(vit.state_dict()) and all(".temporal." in n for n in new)  # frozen names kept
    with torch.no_grad(), frames(modules, 3):
        assert torch.equal(run(vit, images), before)  # gates at zero: the image model, frame by frame
        for m in modules:
            m.gate.fill_(1.0)
        mixed = run(vit, images)
        other = images.clone()
        other[1] = torch.randn(3, 32, 32)  # change frame 1 of clip 0
        changed = run(vit, other)
    assert not torch.allclose(mixed[0], changed[0])  # frame 0 now sees frame 1
    torch.testing.assert_close(mixed[3:], changed[3:])  # clip 1 does not
    with pytest.raises(ValueError, match="already has temporal modules"):
        insert_into_blocks(vit, 32)


def test_unsupported_blocks_and_placements_are_named():
    from evlgen_lavis.models.temporal import build_temporal
    from evlgen_lavis.models.vision import FrozenVisionEncoder

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(ValueError, match="placement=output"):
        insert_into_blocks(Odd(), 4)
    cnn = FrozenVisionEncoder(torch.nn.Conv2d(3, 8, 3), lambda m, x: m(x).flatten(2).transpose(1, 2), 8, 4,
                              False, "a_cnn")
    with pytest.raises(ValueError, match="has no ViT blocks"):
        build_temporal(cnn, placement="blocks")
    with pytest.raises(ValueError, match="not one of"):
        build_temporal(cnn, placement="everywhere")
    with pytest.raises(ValueError, match="unknown model.temporal keys"):
        _tiny_video(heads=3)


# -- the video model -----------------------------------------------------------------------------------------

def test_one_frame_clip_with_closed_gates_is_the_image_model(image_ckpt):
    image, path = image_ckpt
    cls = registry.get_model_class("evlgen_video_opt")
    cfg = OmegaConf.load(cls.default_config_path("tiny")).model
    cfg.pretrained = path  # an image checkpoint: only the temporal parameters are missing
    video = cls.from_config(cfg).eval()
    frames_ = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a = image({"image": frames_, "text_input": CAPTIONS[:3]})["loss"]
        b = video({"video": frames_.unsqueeze(2), "text_input": CAPTIONS[:3]})["loss"]
        c = video({"image": frames_, "text_input": CAPTIONS[:3]})["loss"]  # a 4-D image is a 1-frame clip
    assert torch.equal(a, b) and torch.equal(a, c)
    assert video.generate({"video": frames_.unsqueeze(2)}, num_beams=2, max_length=6) == image.generate(
        {"image": frames_}, num_beams=2, max_length=6)
    q = ["what is it?", "which colour?", "where?"]
    assert video.predict_answers({"video": frames_.unsqueeze(2), "text_input": q}, num_beams=1, max_len=4) == \
        image.predict_answers({"image": frames_, "text_input": q}, num_beams=1, max_len=4)
    # the same holds for the output placement
    out_video = _tiny_video(placement="output")
    out_video.load_checkpoint(path, allow_missing_temporal=True)
    with torch.no_grad():
        assert torch.equal(out_video.eval()({"video": frames_.unsqueeze(2), "text_input": CAPTIONS[:3]})["loss"], a)


def test_image_checkpoint_needs_the_option_and_video_checkpoints_round_trip(image_ckpt, tmp_path):
    _, path = image_ckpt
    video = _tiny_video()
    with pytest.raises(KeyError, match="temporal"):
        video.load_checkpoint(path)  # strict by default: a video checkpoint must hold the temporal weights
    video.load_checkpoint(path, allow_missing_temporal=True)
    assert all(p.requires_grad for n, p in video.named_parameters() if n in video.temporal_parameter_names())
    _open_gates(video)
    state = video.trainable_state_dict()
    assert any(".temporal." in k for k in state)
    torch.save({"model": state}, tmp_path / "video.pth")
    cls = registry.get_model_class("evlgen_video_opt")
    cfg = OmegaConf.load(cls.default_config_path("tiny")).model
    cfg.finetuned, cfg.load_finetuned = str(tmp_path / "video.pth"), True
    other = cls.from_config(cfg).eval()
    samples = {"video": _clips(), "text_input": CAPTIONS[:2]}
    with torch.no_grad():
        torch.testing.assert_close(other(samples)["loss"], video.eval()(samples)["loss"], rtol=0, atol=0)
    torch.save({"model": {**state, "temporal.bogus": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="temporal.bogus"):
        video.load_checkpoint(str(tmp_path / "bad.pth"), allow_missing_temporal=True)


def test_only_temporal_and_connector_train_and_all_get_gradients():
    model = _tiny_video()
    model.train()
    _open_gates(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    temporal = set(model.temporal_parameter_names())
    assert temporal and temporal <= trainable
    assert all(n.startswith(("tomeformer.", "llm_proj.")) for n in trainable - temporal)
    assert all(".temporal." in n for n in temporal)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    loss = model({"video": _clips(4), "text_input": CAPTIONS})["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and
               (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not no_grad, f"trainable tensors without a gradient: {no_grad}"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)
    assert not model.visual_encoder.training and not model.llm_model.training
    assert set(model.trainable_groups()) == {"temporal", "tomeformer", "llm_proj"}


@pytest.mark.parametrize("order_aware", [False, True])
def test_reversed_clip_features(order_aware):
    """The paper's module cannot tell a clip from its reverse; the order-aware one can."""
    model = _tiny_video(order_aware=order_aware).eval()
    _open_gates(model)
    clip = _clips(2, T=4)
    with torch.no_grad():
        forward = model.video_features({"video": clip})
        backward = model.video_features({"video": clip.flip(2)})
    assert forward.shape == (2, 17, 32)  # (B, N, C): frames averaged, 17 tiny-ViT tokens
    if order_aware:
        assert (forward - backward).abs().max() > 1e-3
    else:
        torch.testing.assert_close(forward, backward, rtol=1e-5, atol=1e-5)


def test_generate_predict_answers_and_input_layouts():
    model = _tiny_video().eval()
    _open_gates(model)
    clip = _clips(2, T=3)
    captions = model.generate({"video": clip}, num_beams=2, max_length=5, num_captions=2)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    assert model.generate({"image": clip}, num_beams=1, max_length=5) == model.generate(
        {"video": clip}, num_beams=1, max_length=5)  # a 5-D samples["image"] is a video
    answers = model.predict_answers({"video": clip, "text_input": ["what moves?", "where?"]}, num_beams=1, max_len=3)
    assert len(answers) == 2
    with pytest.raises(ValueError, match=r"frames first\?"):
        model({"video": _clips(2, T=4).transpose(1, 2), "text_input": CAPTIONS[:2]})
    with pytest.raises(KeyError, match="video"):
        model({"text_input": CAPTIONS[:2]})
    with pytest.raises(ValueError, match="batch-size mismatch: 2 images but 3"):
        model({"video": clip, "text_input": CAPTIONS[:3]})


def test_cached_frame_features_give_the_same_loss():
    model = _tiny_video(placement="output").eval()
    _open_gates(model)
    clip = _clips(2)
    with torch.no_grad():
        feats = model.encode_image(clip)
        assert feats.shape == (2, 4, 17, 32)  # per-frame, before the temporal module
        direct = model({"video": clip, "text_input": CAPTIONS[:2]})["loss"]
        cached = model({"image_embeds": feats, "text_input": CAPTIONS[:2]})["loss"]
    torch.testing.assert_close(direct, cached)
    assert model.vision_cache_key().endswith("-frames")
    with pytest.raises(ValueError, match="placement=blocks"):
        _tiny_video().vision_cache_key()  # trainable modules inside the ViT: nothing frozen to cache


def test_paper_shapes_eva_g_geometry_with_temporal_modules():
    """EVA-CLIP-g's width and token grid (one block instead of 39) with the paper's temporal module: 4 frames
    of 257 tokens -> 257 frame-averaged tokens of width 1408; 721,409 temporal parameters per block."""
    from functools import partial

    from lavis.models.eva_vit import VisionTransformer
    from torch import nn

    vit = VisionTransformer(img_size=224, patch_size=14, embed_dim=1408, depth=1, num_heads=16, mlp_ratio=4.3637,
                            qkv_bias=True, use_mean_pooling=False, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    (module,) = insert_into_blocks(vit, 1408, hidden_dim=256, num_heads=8)
    assert sum(p.numel() for p in module.parameters()) == 2 * (1408 * 256 + 256) + 1
    with torch.no_grad(), frames([module], 4):
        feats = vit(torch.randn(4, 3, 224, 224))
    assert feats.view(1, 4, 257, 1408).mean(1).shape == (1, 257, 1408)


@pytest.mark.slow
def test_demo_video_type_loads_offline():
    model, vis, _ = load_model_and_preprocess("evlgen_video_llama", "demo", is_eval=True, device="cpu")
    image_cfg = OmegaConf.load(registry.get_model_class("evlgen_llama").default_config_path("demo")).model
    assert model.temporal_placement == "output" and model.visual_encoder.num_tokens == 49
    assert model.num_soft_tokens == model.tomeformer.token_counts(49)[-1] and model.tomeformer.schedule[0] == \
        image_cfg.tomeformer.r
    assert vis["eval"].n_frms == 4 and vis["eval"].image_size == 224
    assert set(model.trainable_groups()) == {"temporal", "tomeformer", "llm_proj"}
    assert model.temporal is not None and model.temporal.dim == 1280


# -- processors -------------------------------------------------------------------------------------------

def _write_numbered(path, n, size=(32, 32)):
    """A clip whose frame t is a flat grey of level 20 + 10 t (so frames can be identified after decoding)."""
    frames_ = np.stack([np.full((*size, 3), 20 + 10 * t, np.uint8) for t in range(n)])
    return write_mp4(frames_, str(path))


def _levels(clip, processor):
    """The grey level of each frame of a processed (3, T, S, S) clip, undoing the normalisation."""
    mean, std = torch.tensor(processor.mean), torch.tensor(processor.std)
    pixels = clip.mean(dim=(2, 3)) * std[:, None] + mean[:, None]  # (3, T)
    return [round(v) for v in (pixels.mean(0) * 255).tolist()]


def test_frame_indices():
    assert frame_indices(8, 4) == [1, 3, 5, 7]
    assert frame_indices(2, 4) == [0, 0, 1, 1]  # padded by repeating frames, in order
    assert frame_indices(1, 3) == [0, 0, 0]
    g = torch.Generator().manual_seed(0)
    drawn = frame_indices(100, 4, random=True, generator=g)
    assert drawn == sorted(drawn) and all(25 * i <= d < 25 * (i + 1) for i, d in enumerate(drawn))
    with pytest.raises(ValueError):
        frame_indices(0, 4)


def test_eval_processor_short_long_and_odd_sized_files(tmp_path):
    from evlgen_lavis.processors.video import EVLGenVideoEvalProcessor
    from evlgen_lavis.processors.image import EVLGenImageEvalProcessor

    proc = EVLGenVideoEvalProcessor(image_size=24, n_frms=4)
    short = proc(_write_numbered(tmp_path / "short.mp4", 2))
    assert short.shape == (3, 4, 24, 24)
    levels = _levels(short, proc)
    assert abs(levels[0] - levels[1]) <= 2 and abs(levels[2] - levels[3]) <= 2 and levels[2] - levels[0] >= 8
    long = proc(_write_numbered(tmp_path / "long.mp4", 20))
    assert [round((v - 20) / 10) for v in _levels(long, proc)] == frame_indices(20, 4) == [2, 7, 12, 17]
    import imageio.v2 as imageio  # a true odd size (libx264, 4:4:4): 47 x 63

    odd = tmp_path / "odd.mp4"
    writer = imageio.get_writer(str(odd), fps=8, codec="libx264", macro_block_size=1, pixelformat="yuv444p",
                                ffmpeg_log_level="error")
    for t in range(5):
        writer.append_data(np.full((47, 63, 3), (200, 30 + 40 * t, 30), np.uint8))
    writer.close()
    assert read_frames(odd, 2).shape == (2, 47, 63, 3)
    clip = proc(str(odd))
    assert clip.shape == (3, 4, 24, 24) and torch.isfinite(clip).all()
    # a frame of a clip is processed exactly like the same picture given to the image processor
    from PIL import Image

    frame = read_frames(odd, 1)[0]
    image = EVLGenImageEvalProcessor(image_size=24)(Image.fromarray(frame))
    torch.testing.assert_close(EVLGenVideoEvalProcessor(image_size=24, n_frms=1)(str(odd))[:, 0], image,
                               rtol=0, atol=0)


def test_train_processor_random_sampling_and_shared_crop(tmp_path):
    from evlgen_lavis.processors.video import EVLGenVideoTrainProcessor

    path = _write_numbered(tmp_path / "clip.mp4", 16)
    proc = EVLGenVideoTrainProcessor.from_config(OmegaConf.create({"image_size": 16, "n_frms": 4}))
    torch.manual_seed(0)
    a = proc(path)
    torch.manual_seed(0)
    assert torch.equal(a, proc(path))  # determined by torch's RNG (the runner seeds it per sample)
    assert a.shape == (3, 4, 16, 16)
    levels = [round((v - 20) / 10) for v in _levels(a, proc)]
    assert levels == sorted(levels) and all(4 * i <= v < 4 * (i + 1) for i, v in enumerate(levels))
    uniform = EVLGenVideoTrainProcessor(image_size=16, n_frms=4, sampling="uniform")
    assert [round((v - 20) / 10) for v in _levels(uniform(path), uniform)] == frame_indices(16, 4)
    with pytest.raises(ValueError, match="sampling"):
        EVLGenVideoTrainProcessor(sampling="headtail")


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 20, "truncated", None])
def test_unreadable_files_raise_naming_the_file(tmp_path, content):
    from evlgen_lavis.processors.video import EVLGenVideoEvalProcessor

    path = tmp_path / "bad clip.mp4"
    if content == "truncated":
        good = Path(_write_numbered(tmp_path / "good.mp4", 20)).read_bytes()
        path.write_bytes(good[: len(good) // 3])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UnreadableVideoError, match="bad clip.mp4"):
        EVLGenVideoEvalProcessor(image_size=16, n_frms=4)(str(path))


# -- datasets, the synthetic clips and a training run ---------------------------------------------------------

def make_video_data(root, n_train=8, n_eval=4, n_corrupt=1, size=32):
    """Generated clips in the local_video_caption layout (+ ``n_corrupt`` corrupt train files)."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def entries(n, offset, split):
        out = []
        for i in range(n):
            colour, shape, direction = KINDS[(i * 5 + offset) % len(KINDS)]
            name = f"{split}_{i}.mp4"
            write_mp4(render_clip(colour, shape, direction, rng, size=size, n_frames=6), str(root / "videos" / name))
            out.append({"video": name, "caption": caption_of(colour, shape, direction), "image_id": f"{split}_{i}"})
        return out

    data = {"train": entries(n_train, 0, "train"), "val": entries(n_eval, 1, "val"), "test": entries(n_eval, 2, "test")}
    for i in range(n_corrupt):
        (root / "videos" / f"corrupt_{i}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 broken")
        data["train"].append({"video": f"corrupt_{i}.mp4", "caption": "a broken clip"})
    for split, entries_ in data.items():
        (root / f"{split}.json").write_text(json.dumps(entries_))
    return root


def test_video_dataset_skips_and_counts_unreadable_clips(tmp_path, caplog):
    root = make_video_data(tmp_path, n_train=3, n_eval=2, n_corrupt=1)
    cfg = OmegaConf.load(registry.get_builder_class("local_video_caption").default_config_path())
    cfg = OmegaConf.merge(cfg.datasets.local_video_caption, {
        "vis_processor": {"train": {"name": "evlgen_video_train", "image_size": 16, "n_frms": 2},
                          "eval": {"name": "evlgen_video_eval", "image_size": 16, "n_frms": 2}},
        "build_info": {"annotations": {s: {"storage": str(root / f"{s}.json")} for s in ("train", "val", "test")},
                       "videos": {"storage": str(root / "videos")}}})
    datasets = registry.get_builder_class("local_video_caption")(cfg).build_datasets()
    train = datasets["train"]
    assert len(train) == 4 and train[3] is None and "corrupt_0.mp4" in caplog.text
    batch = train.collater([train[i] for i in range(4)])
    assert batch["video"].shape == (3, 3, 2, 16, 16) and int(batch["n_skipped"]) == 1
    assert batch["image_id"][0] == "train_0"  # annotated ids are kept
    test = datasets["test"]
    assert test[0]["image_id"] == "test_0" and test.annotation[0]["caption"] == [
        json.loads((root / "test.json").read_text())[0]["caption"]]
    cfg.data_type = "images"
    with pytest.raises(ValueError, match="must be 'videos'"):
        registry.get_builder_class("local_video_caption")(cfg).build_datasets()


def test_motion_clips_are_real_mp4_balanced_and_scored(tmp_path):
    directory = prepare_motion_clips(cache_dir=str(tmp_path), n_train=48, n_val=4, n_test=8, n_frames=6, size=32)
    assert prepare_motion_clips(cache_dir=str(tmp_path), n_train=48, n_val=4, n_test=8, n_frames=6, size=32) == directory
    train = json.loads(Path(directory, "caption_train.json").read_text())
    assert sorted((a["colour"], a["shape"], a["direction"]) for a in train) == sorted(KINDS)  # balanced
    clip = read_frames(os.path.join(directory, "videos", train[0]["video"]), 6)
    assert clip.shape == (6, 32, 32, 3)
    ann = next(a for a in train if a["direction"] == "right")
    frames_ = read_frames(os.path.join(directory, "videos", ann["video"]), 6).astype(float)
    shape_mask = np.abs(frames_ - frames_[:, :1, :1]).sum(-1) > 60  # pixels unlike the background corner
    xs = [(m.sum(0) * np.arange(32)).sum() / m.sum() for m in shape_mask]
    assert xs == sorted(xs) and xs[-1] - xs[0] > 8  # it moves right
    assert direction_of("A red circle moves to the LEFT.") == "left" and direction_of("a red circle") is None
    test = json.loads(Path(directory, "caption_test.json").read_text())
    perfect = [{"image_id": a["image_id"], "caption": a["caption"][0]} for a in test]
    assert motion_scores(perfect, test) == {"direction": 1.0, "axis": 1.0, "reversed_direction": 0.0,
                                            "appearance": 1.0, "n": 8}
    from evlgen_lavis.datasets.motion_clips import OPPOSITE

    flipped = [{"image_id": a["image_id"], "caption": caption_of(a["colour"], a["shape"], OPPOSITE[a["direction"]])}
               for a in test]
    assert motion_scores(flipped, test)["reversed_direction"] == 1.0 == motion_scores(flipped, test)["axis"]


def test_tiny_video_training_run_through_train_py(tmp_path):
    make_video_data(tmp_path / "tiny_video_data", n_train=8, n_eval=4, n_corrupt=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(REPO / "train.py"), "--cfg-path", str(VIDEO_PROJECT / "tiny_caption_local.yaml"),
           "--options", f"run.output_dir={tmp_path / 'out'}", "run.job_id=job", "run.max_skip_fraction=0.5"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    run = tmp_path / "out" / "job"
    from evlgen_lavis.runners.checkpoint import load_checkpoint_file
    from evlgen_lavis.runners.metrics_log import read_metrics

    rows = read_metrics(run / "metrics.csv")
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    ckpt = load_checkpoint_file(run / "checkpoint_4.pth")
    assert ckpt["skips"]["skipped"] == sum(r["n_skipped"] for r in rows) > 0  # the corrupt clip, counted
    assert any(".temporal." in k for k in ckpt["model"])
    assert any(ckpt["model"][k].abs().item() > 0 for k in ckpt["model"] if k.endswith("temporal.gate"))
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert {"Bleu_4", "CIDEr", "exact_match"} <= set(metrics)
    results = json.loads(next((run / "result").glob("test_*.json")).read_text())
    assert sorted(r["image_id"] for r in results) == [f"test_{i}" for i in range(4)]
