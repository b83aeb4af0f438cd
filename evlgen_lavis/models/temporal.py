"""Temporal attentive soft-token contextualizing (EVLGen, section "video"), and where it goes.

For every spatial token, attention across the T frames of its clip: query and key are projections of the
token features to ``hidden_dim`` (256) split into ``num_heads`` (8) heads, the values are the token
features themselves (split into the same heads), and the result is added through a learnable scalar
gate initialised to zero::

    x (B*T, N, C) -> per token n: seq (T, C) -> softmax(q k^T * hidden_dim^-0.5) @ seq -> x + gate * out

With the gate at zero the module is the identity, so an image model's weights start a video model that
behaves exactly like the image model frame by frame. The scale ``hidden_dim ** -0.5`` (not the per-head
``head_dim ** -0.5``) is the authors' released code.

Order awareness (``order_aware=True``, beyond the paper): the module above is permutation-equivariant
over frames, and the frame mean that follows is order-invariant, so a clip and the same clip reversed
give the same features ("moves left" vs "moves right" cannot be told apart). The option adds a learnable
temporal position embedding ``pos_embed`` (``max_frames`` x C, zero-initialised) to the inputs of the
query and key projections: attention weights then depend on when a frame was taken, so frames get
time-dependent weights in the mean. Values are unchanged, and at zero the module is the paper's.

Placements (:func:`build_temporal`):

* ``blocks``: one module inside every ViT block, between the attention and the MLP (the paper). Works
  for LAVIS's EVA ViT (``eva_clip_g``, ``tiny_vit``), LAVIS's CLIP ViT (``clip_L``) and timm ViTs
  (``Block``, ``ResPostBlock``): the block's class is swapped for a subclass whose forward calls
  ``self.temporal`` (as ToMe patches timm blocks), so every frozen parameter keeps its name.
* ``output``: one module on the encoder's output tokens (the way to add it to a CNN such as
  EfficientNet-Lite0, which has no blocks of that kind; also a cheap option for ViTs). The frozen
  encoder then runs frame by frame, so its per-frame features can be cached.
* ``none``: no temporal module: frame features are only averaged (the baseline).

``gain`` multiplies the stored gate and position embedding in the forward pass (``gate = gain * raw``).
It changes no function (both start at zero); with Adam-type optimizers, whose steps are about ``lr`` per
parameter whatever the gradient's size, it multiplies their effective learning rate. 1.0 is the paper;
short runs (the CPU demo: a few hundred steps) need more for the gate to leave zero.
"""
import contextlib
from typing import Iterable, List

import torch
import torch.nn.functional as F
from torch import nn

PLACEMENTS = ("blocks", "output", "none")


class TemporalAttention(nn.Module):
    """Attention of each spatial token over the frames of its clip, gated (see the module docstring).

    ``forward(x)`` takes (B*T, N, C) tokens with frames of a clip adjacent (clip-major) and uses
    ``self.num_frames`` (set by :func:`frames`) as T.
    """

    def __init__(self, dim: int, hidden_dim: int = 256, num_heads: int = 8, order_aware: bool = False,
                 max_frames: int = 16, gain: float = 1.0):
        super().__init__()
        if hidden_dim % num_heads or dim % num_heads:
            raise ValueError(f"temporal attention: hidden_dim {hidden_dim} and the token width {dim} must both be "
                             f"divisible by num_heads {num_heads} (values are the tokens split into heads)")
        self.dim, self.hidden_dim, self.num_heads = dim, hidden_dim, num_heads
        self.scale = hidden_dim ** -0.5  # the authors' code: hidden_dim, not head_dim
        self.query = nn.Linear(dim, hidden_dim)
        self.key = nn.Linear(dim, hidden_dim)
        self.gate = nn.Parameter(torch.zeros(()))
        self.order_aware = bool(order_aware)
        self.max_frames = int(max_frames)
        self.pos_embed = nn.Parameter(torch.zeros(self.max_frames, dim)) if self.order_aware else None
        self.gain = float(gain)
        self.num_frames = 1

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, heads={self.num_heads}, "
                f"order_aware={self.order_aware}, max_frames={self.max_frames}, gain={self.gain}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = self.num_frames
        BT, N, C = x.shape
        if BT % T:
            raise ValueError(f"temporal attention: {BT} frames in the batch is not a multiple of {T} frames per clip")
        if self.order_aware and T > self.max_frames:
            raise ValueError(f"clips of {T} frames, but the temporal position embedding has max_frames="
                             f"{self.max_frames}: sample fewer frames or raise model.temporal.max_frames")
        B, h = BT // T, self.num_heads
        dtype = self.query.weight.dtype
        seq = x.to(dtype).view(B, T, N, C).transpose(1, 2).reshape(B * N, T, C)  # (B*N, T, C)
        qk_in = seq + self.gain * self.pos_embed[:T] if self.order_aware else seq
        q = self.query(qk_in).view(B * N, T, h, -1).transpose(1, 2)  # (B*N, h, T, d)
        k = self.key(qk_in).view(B * N, T, h, -1).transpose(1, 2)  # (B*N, h, T, d)
        v = seq.view(B * N, T, h, C // h).transpose(1, 2)  # (B*N, h, T, C/h): the tokens themselves
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B*N, h, T, C/h)
        out = out.transpose(1, 2).reshape(B, N, T, C).transpose(1, 2).reshape(BT, N, C)
        return x + (self.gain * self.gate * out).to(x.dtype)


# -- inside ViT blocks: the block's class becomes a subclass whose forward calls self.temporal ---------

def _eva_forward(self, x, rel_pos_bias=None):
    """LAVIS eva_vit.Block.forward with the temporal module between attention and MLP."""
    if self.gamma_1 is None:
        x = x + self.drop_path(self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
        x = self.temporal(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))
    x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
    x = self.temporal(x)
    return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


def _clip_forward(self, x):
    """LAVIS clip_vit.ResidualAttentionBlock.forward; its tokens are (N, B*T, C) (sequence first)."""
    x = x + self.attention(self.ln_1(x))
    x = self.temporal(x.transpose(0, 1)).transpose(0, 1)
    return x + self.mlp(self.ln_2(x))


def _timm_forward(self, x, *args, **kwargs):
    """timm vision_transformer.Block.forward (pre-norm, layer scale, drop path)."""
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), *args, **kwargs)))
    x = self.temporal(x)
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _timm_post_forward(self, x, *args, **kwargs):
    """timm vision_transformer.ResPostBlock.forward (post-norm)."""
    x = x + self.drop_path1(self.norm1(self.attn(x, *args, **kwargs)))
    x = self.temporal(x)
    return x + self.drop_path2(self.norm2(self.mlp(x)))


def _block_families():
    """``{block class: (name of its temporal subclass, forward)}`` for the ViT families we know."""
    from lavis.models import clip_vit, eva_vit

    families = {
        eva_vit.Block: ("TemporalEvaBlock", _eva_forward),
        clip_vit.ResidualAttentionBlock: ("TemporalClipBlock", _clip_forward),
    }
    try:
        from timm.models import vision_transformer as tv

        families[tv.Block] = ("TemporalTimmBlock", _timm_forward)
        families[tv.ResPostBlock] = ("TemporalTimmResPostBlock", _timm_post_forward)
    except (ImportError, AttributeError):  # an old timm without these classes
        pass
    return families


_TEMPORAL_CLASSES = {}


def _temporal_class(cls, name, forward):
    """The subclass of block class ``cls`` whose forward runs the temporal module; made once, and kept as a
    module-level name (so models pickle)."""
    if cls not in _TEMPORAL_CLASSES:
        sub = type(name, (cls,), {"forward": forward, "__module__": __name__,
                                  "__doc__": f"{cls.__module__}.{cls.__name__} with temporal attention."})
        globals()[name] = sub
        _TEMPORAL_CLASSES[cls] = sub
    return _TEMPORAL_CLASSES[cls]


def vit_blocks(backbone: nn.Module) -> List[nn.Module]:
    """The transformer blocks of a LAVIS EVA / CLIP ViT or a timm ViT, in order."""
    if hasattr(backbone, "blocks"):  # LAVIS EVA ViT, timm ViT
        return list(backbone.blocks)
    transformer = getattr(backbone, "transformer", None)
    if transformer is not None and hasattr(transformer, "resblocks"):  # LAVIS CLIP ViT
        return list(transformer.resblocks)
    raise ValueError(f"{type(backbone).__name__} has no ViT blocks (`blocks` or `transformer.resblocks`): use "
                     "model.temporal.placement=output for this encoder")


def insert_into_blocks(backbone: nn.Module, dim: int, **options) -> List[TemporalAttention]:
    """Put a :class:`TemporalAttention` into every block of ``backbone`` (registered as the block's
    child ``temporal``); returns them in order."""
    families = _block_families()
    blocks = vit_blocks(backbone)
    if any(type(b) in _TEMPORAL_CLASSES.values() for b in blocks):
        raise ValueError(f"{type(backbone).__name__} already has temporal modules in its blocks")
    unknown = sorted({type(b).__qualname__ for b in blocks if type(b) not in families})
    if unknown:
        known = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in families)
        raise ValueError(f"temporal modules cannot be inserted into blocks of type {unknown}; supported: {known}. "
                         "Use model.temporal.placement=output instead")
    modules = []
    for block in blocks:
        block.__class__ = _temporal_class(type(block), *families[type(block)])
        module = TemporalAttention(dim, **options)
        block.temporal = module
        modules.append(module)
    return modules


def set_num_frames(modules: Iterable[TemporalAttention], num_frames: int) -> None:
    for module in modules:
        module.num_frames = int(num_frames)


@contextlib.contextmanager
def frames(modules: Iterable[TemporalAttention], num_frames: int):
    """Within the block, the temporal modules treat their input as clips of ``num_frames`` frames."""
    modules = list(modules)
    previous = [m.num_frames for m in modules]
    set_num_frames(modules, num_frames)
    try:
        yield
    finally:
        for m, n in zip(modules, previous):
            m.num_frames = n


def check_placement(placement: str, encoder_name: str, has_blocks: bool) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"model.temporal.placement={placement!r} is not one of {list(PLACEMENTS)}")
    if placement == "blocks" and not has_blocks:
        raise ValueError(f"model.temporal.placement=blocks needs a ViT, but {encoder_name!r} has no ViT blocks: "
                         "use placement=output (one temporal module on the encoder's output tokens)")
    return placement


def build_temporal(encoder, placement: str = "blocks", hidden_dim: int = 256, num_heads: int = 8,
                   order_aware: bool = False, max_frames: int = 16, gain: float = 1.0):
    """Add temporal modules to a :class:`~evlgen_lavis.models.vision.FrozenVisionEncoder` as ``placement``
    says. Returns ``(modules inserted into blocks, output module or None)``; the new parameters train."""
    try:
        vit_blocks(encoder.backbone)
        has_blocks = True
    except ValueError:
        has_blocks = False
    check_placement(placement, encoder.name, has_blocks)
    options = dict(hidden_dim=hidden_dim, num_heads=num_heads, order_aware=order_aware, max_frames=max_frames,
                   gain=gain)
    if placement == "blocks":
        return insert_into_blocks(encoder.backbone, encoder.num_features, **options), None
    if placement == "output":
        return [], TemporalAttention(encoder.num_features, **options)
    return [], None


def temporal_modules(model: nn.Module) -> List[TemporalAttention]:
    """Every :class:`TemporalAttention` in ``model``."""
    return [m for m in model.modules() if isinstance(m, TemporalAttention)]


__all__ = ["TemporalAttention", "PLACEMENTS", "build_temporal", "insert_into_blocks", "frames", "set_num_frames",
           "temporal_modules", "vit_blocks"]
