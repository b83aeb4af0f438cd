"""Image processors that accept any PIL image.

LAVIS's ``blip_image_*`` processors assume an RGB image, and ``blip_image_train`` applies RandomAugment,
whose Posterize op crashes under numpy 2. These convert every PIL mode (grayscale, 16-bit, RGBA,
palette, CMYK, ...) to RGB first, compositing transparency onto white, and return (3, H, W) floats.
"""
from typing import Optional, Sequence

import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from lavis.processors.base_processor import BaseProcessor

from evlgen_lavis.common import registry_once

# OpenAI CLIP / EVA-CLIP statistics, LAVIS's default for BLIP-2.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image) -> Image.Image:
    """Any PIL image -> RGB. Transparent pixels become white; 16/32-bit and float images are rescaled."""
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"expected a PIL.Image.Image, got {type(image).__name__}: open files with PIL.Image.open(path)"
        )
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        import numpy as np

        arr = np.asarray(image, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


class _ImageProcessor(BaseProcessor):
    def __init__(self, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        self.mean = tuple(mean) if mean is not None else CLIP_MEAN
        self.std = tuple(std) if std is not None else CLIP_STD
        self.normalize = transforms.Normalize(self.mean, self.std)

    def __call__(self, item) -> torch.Tensor:
        return self.transform(to_rgb(item))

    @staticmethod
    def _cfg(cfg):
        return OmegaConf.create() if cfg is None else cfg


@registry_once("processor", "evlgen_image_train")
class EVLGenImageTrainProcessor(_ImageProcessor):
    """Random resized crop (scale ``[min_scale, max_scale]``) and optional horizontal flip.
    Flip is off by default: captions that say "left"/"right" would become wrong."""

    def __init__(self, image_size=224, mean=None, std=None, min_scale=0.5, max_scale=1.0, hflip=False):
        super().__init__(mean, std)
        ops = [
            transforms.RandomResizedCrop(
                image_size, scale=(min_scale, max_scale), interpolation=InterpolationMode.BICUBIC
            )
        ]
        if hflip:
            ops.append(transforms.RandomHorizontalFlip())
        self.transform = transforms.Compose(ops + [transforms.ToTensor(), self.normalize])

    @classmethod
    def from_config(cls, cfg=None):
        cfg = cls._cfg(cfg)
        return cls(
            image_size=cfg.get("image_size", 224),
            mean=cfg.get("mean", None),
            std=cfg.get("std", None),
            min_scale=cfg.get("min_scale", 0.5),
            max_scale=cfg.get("max_scale", 1.0),
            hflip=cfg.get("hflip", False),
        )


@registry_once("processor", "evlgen_image_eval")
class EVLGenImageEvalProcessor(_ImageProcessor):
    """Deterministic square resize (bicubic), as LAVIS's ``blip_image_eval``. Having no randomness, its
    outputs can be cached as frozen-encoder features."""

    deterministic = True

    def __init__(self, image_size=224, mean=None, std=None):
        super().__init__(mean, std)
        self.transform = transforms.Compose(
            [
                transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
                transforms.ToTensor(),
                self.normalize,
            ]
        )

    @classmethod
    def from_config(cls, cfg=None):
        cfg = cls._cfg(cfg)
        return cls(image_size=cfg.get("image_size", 224), mean=cfg.get("mean", None), std=cfg.get("std", None))
