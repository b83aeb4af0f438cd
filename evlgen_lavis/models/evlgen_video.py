"""EVLGen-video: an image EVLGen turned into a video captioner without re-aligning vision and language.

    video (B, 3, T, H, W) -> frames (B*T, 3, H, W) -> frozen vision encoder, with a temporal module in
    every ViT block (placement "blocks", the paper) -> (B, T, N, C) -> [temporal module on the output
    tokens, placement "output"] -> mean over frames (B, N, C) -> TomeFormer -> llm_proj -> frozen LLM

The image parts (encoder, TomeFormer, llm_proj, LLM) are those of :class:`~evlgen_lavis.models.evlgen.EVLGen`
with the same names, so an image checkpoint loads with only the temporal parameters missing
(``model.pretrained``; see :meth:`EVLGenVideo.load_checkpoint`). The temporal modules start as the
identity (gates at zero): a 1-frame clip then gives exactly the image model's output. Only the temporal
modules, the TomeFormer and llm_proj train. See :mod:`evlgen_lavis.models.temporal` for the module,
its placements and the order-aware option.

Inputs: ``samples["video"]`` (B, 3, T, H, W) (a 5-D ``samples["image"]`` works too; a 4-D image is a
1-frame clip) or cached per-frame features ``samples["image_embeds"]`` (B, T, N, C) from
:meth:`encode_image`, plus ``text_input``. ``generate`` and ``predict_answers`` as for images.
"""
import inspect
import logging
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

from evlgen_lavis.common import registry_once
from evlgen_lavis.models.evlgen import EVLGen
from evlgen_lavis.models.evlgen_opt import _types
from evlgen_lavis.models.temporal import build_temporal, frames, vit_blocks

# Used when a config does not set model.temporal.order_aware. Decided by the video demo's measurement
# (docs/video.md, `make demo-video`): on the same frozen features, only the order-aware module's output
# tells a direction from its reverse (probe: 0.92 direction accuracy vs 0.60 for the paper's module and
# 0.26 for the frame mean), and caption metrics did not get worse with it; being zero-initialised, it
# changes nothing at the start. The paper's type (caption_msrvtt_opt2.7b) pins False to reproduce the paper.
ORDER_AWARE_DEFAULT = True


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


class EVLGenVideo(EVLGen):
    """EVLGen with temporal modules (see the module docstring).

    ``temporal``: ``placement`` ("blocks" for ViTs, "output" for any encoder, "none"; default: "blocks"
    when the encoder is a ViT, else "output"), ``hidden_dim`` (256), ``num_heads`` (8), ``order_aware``
    (:data:`ORDER_AWARE_DEFAULT`), ``max_frames`` (16, size of the order-aware position table), ``gain``
    (1.0). Every other argument is :class:`EVLGen`'s.
    """

    def __init__(self, temporal: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        cfg = dict(_plain(temporal) or {})
        known = {"placement", "hidden_dim", "num_heads", "order_aware", "max_frames", "gain"}
        if set(cfg) - known:
            raise ValueError(f"unknown model.temporal keys {sorted(set(cfg) - known)}; known: {sorted(known)}")
        try:
            vit_blocks(self.visual_encoder.backbone)
            default_placement = "blocks"
        except ValueError:
            default_placement = "output"
        cfg.setdefault("placement", default_placement)
        cfg.setdefault("order_aware", ORDER_AWARE_DEFAULT)
        self.temporal_config = cfg
        in_blocks, on_output = build_temporal(self.visual_encoder, **cfg)
        self.temporal_placement = cfg["placement"]
        self._block_temporal = in_blocks  # plain list: the modules are registered inside the blocks
        self.temporal = on_output  # a registered module for placement "output", else None

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg):
        """EVLGen's keys (read with EVLGen's defaults) plus ``temporal``. ``pretrained`` is an image (or
        video) checkpoint: temporal parameters it lacks keep their identity initialisation. ``finetuned``
        (with ``load_finetuned``) is a video checkpoint and must hold every trainable parameter."""
        params = inspect.signature(EVLGen.__init__).parameters
        kwargs = {name: cfg.get(name, p.default) for name, p in params.items() if name != "self"}
        model = cls(temporal=cfg.get("temporal", None), **kwargs)
        if cfg.get("load_finetuned", False) and cfg.get("finetuned"):
            model.load_checkpoint(cfg.get("finetuned"))
        elif cfg.get("pretrained"):
            model.load_checkpoint(cfg.get("pretrained"), allow_missing_temporal=True)
        return model

    def temporal_parameter_names(self) -> List[str]:
        """Names of the temporal modules' parameters (what an image checkpoint lacks)."""
        from evlgen_lavis.models.temporal import TemporalAttention

        names = []
        for prefix, module in self.named_modules():
            if isinstance(module, TemporalAttention):
                names += [f"{prefix}.{n}" for n, _ in module.named_parameters()]
        return names

    def load_checkpoint(self, url_or_filename: str, allow_missing_temporal: bool = False):
        """EVLGen's checkpoint loading. With ``allow_missing_temporal`` (used for ``model.pretrained``),
        temporal parameters the file lacks are not an error: they keep their values (the identity at
        initialisation), so an image EVLGen checkpoint starts a video model. Any other missing trainable
        parameter, or a key this model lacks, is still an error."""
        if not allow_missing_temporal:
            return super().load_checkpoint(url_or_filename)
        temporal = dict((n, p) for n, p in self.named_parameters() if n in set(self.temporal_parameter_names()))
        flags = {n: p.requires_grad for n, p in temporal.items()}
        try:
            for p in temporal.values():
                p.requires_grad_(False)  # EVLGen's check then does not require them
            msg = super().load_checkpoint(url_or_filename)
        finally:
            for n, p in temporal.items():
                p.requires_grad_(flags[n])
        absent = [k for k in msg.missing_keys if k in temporal]
        if absent:
            logging.info("%s has no temporal parameters (%d tensors, e.g. %s): they start as the identity",
                         url_or_filename, len(absent), absent[0])
        return msg

    # -- the video path -------------------------------------------------------------------------------

    @staticmethod
    def _as_video(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return x.unsqueeze(2)  # an image is a 1-frame clip (B, 3, 1, H, W)
        if x.dim() != 5 or x.shape[1] != 3:
            hint = " (frames first? permute (B, T, 3, H, W) to (B, 3, T, H, W))" if x.dim() == 5 and x.shape[2] == 3 else ""
            raise ValueError(f"expected a video batch of shape (B, 3, T, H, W), got {tuple(x.shape)}{hint}")
        return x

    def _video(self, samples) -> torch.Tensor:
        for key in ("video", "image"):
            if key in samples:
                return self._as_video(samples[key])
        raise KeyError("samples need 'video' (B, 3, T, H, W), a 5-D 'image', or cached 'image_embeds' (B, T, N, C)")

    def _batch_size(self, samples) -> int:
        for key in ("image_embeds", "video", "image"):
            if key in samples:
                return samples[key].shape[0]
        return len(self._video(samples))  # raises the KeyError above

    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        """Per-frame encoder features (B, T, N, C), through the temporal modules inside the ViT blocks
        (if any). Gradients flow only where those modules are (the encoder itself is frozen)."""
        video = self._as_video(video).to(self.device)
        B, _, T, H, W = video.shape
        flat = video.transpose(1, 2).reshape(B * T, 3, H, W)  # clip-major: the frames of a clip are adjacent
        grad = torch.is_grad_enabled() and any(p.requires_grad for m in self._block_temporal for p in m.parameters())
        with torch.set_grad_enabled(grad), self.maybe_autocast(), frames(self._block_temporal, T):
            feats = self.visual_encoder(flat)  # (B*T, N, C)
        return feats.view(B, T, *feats.shape[1:])

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Per-frame features (B, T, N, C) of a video batch (or an image batch, T = 1): what
        ``samples["image_embeds"]`` takes. Frozen (cacheable) unless temporal modules sit in the blocks."""
        return self.encode_frames(image)

    def vision_cache_key(self) -> str:
        if self._block_temporal:
            raise ValueError(
                "run.cache_vision_features=true needs a frozen vision encoder, but with model.temporal.placement="
                "blocks the temporal modules inside the ViT blocks train: set run.cache_vision_features=false "
                "(or use placement output/none, where the encoder stays frozen and its per-frame features are cached)"
            )
        return f"{super().vision_cache_key()}-frames"

    def video_features(self, samples) -> torch.Tensor:
        """(B, N, C): per-frame features, the output temporal module (if any), then the mean over frames."""
        if "image_embeds" in samples:
            feats = samples["image_embeds"].to(self.device)  # cached per-frame features
            feats = feats.unsqueeze(1) if feats.dim() == 3 else feats  # (B, N, C) = one frame
            if feats.dim() != 4:
                raise ValueError(f"samples['image_embeds'] must be per-frame features (B, T, N, C), got "
                                 f"{tuple(feats.shape)}")
        else:
            feats = self.encode_frames(self._video(samples))  # (B, T, N, C)
        B, T, N, C = feats.shape
        if self.temporal is not None:
            with frames([self.temporal], T):
                feats = self.temporal(feats.reshape(B * T, N, C).float()).view(B, T, N, C)
        return feats.mean(dim=1)  # (B, N, C)

    def soft_prompts(self, samples):
        """The image model's soft prompts, computed from the frame-averaged features."""
        return super().soft_prompts({"image_embeds": self.video_features(samples)})

    def trainable_groups(self) -> Dict[str, int]:
        """Trainable parameter counts by part (temporal / tomeformer / llm_proj / other), for logs."""
        temporal = set(self.temporal_parameter_names())
        counts: Dict[str, int] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                part = "temporal" if name in temporal else name.split(".")[0]
                counts[part] = counts.get(part, 0) + p.numel()
        return counts


@registry_once("model", "evlgen_video_opt")
class EVLGenVideoOPT(EVLGenVideo):
    """EVLGen-video with an OPT LLM: the paper's MSR-VTT finetuning type and the offline ``tiny`` type."""

    PRETRAINED_MODEL_CONFIG_DICT = _types("evlgen_video_opt", ["caption_msrvtt_opt2.7b", "tiny"])


@registry_once("model", "evlgen_video_llama")
class EVLGenVideoLLaMA(EVLGenVideo):
    """EVLGen-video with a LLaMA-family (or any HF causal) LLM: the offline ``demo`` type."""

    PRETRAINED_MODEL_CONFIG_DICT = _types("evlgen_video_llama", ["demo"])
