"""Video processors (decord): a file path in, a clip tensor (3, T, H, W) out.

LAVIS's ``alpro_video_*`` processors return fewer frames than asked for short videos (a batch of such
clips cannot be stacked), flip horizontally during training (which turns "moves left" into a wrong
caption), squash frames while decoding and use RandomAugment ops that break under numpy 2. These:

* sample ``n_frms`` frames: the video is cut into ``n_frms`` equal segments and one frame is taken per
  segment, its middle (``evlgen_video_eval``, and ``evlgen_video_train`` with ``sampling: uniform``) or a
  random frame of it (``evlgen_video_train``, ``sampling: random``, the default). A video with fewer
  frames than ``n_frms`` is padded by repeating frames, in temporal order (2 frames, 4 asked: 0 0 1 1);
* process every frame as the image processors do (bicubic square resize for eval; one random resized
  crop shared by all frames of a clip for training; horizontal flip only if ``hflip: true``), so a frame
  of a clip and the same picture as an image give the same tensor;
* raise :class:`UnreadableVideoError` (an ``OSError`` naming the file) for a missing, empty, corrupt or
  undecodable file. Our video datasets catch it, skip the sample and count it (see
  :mod:`evlgen_lavis.datasets.skipping`).
"""
import os
from typing import Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from lavis.processors.base_processor import BaseProcessor

from evlgen_lavis.common import registry_once
from evlgen_lavis.processors.image import CLIP_MEAN, CLIP_STD


class UnreadableVideoError(OSError):
    """A video file could not be read (missing, empty, corrupt); the message names the file."""


def frame_indices(num_frames: int, n_frms: int, random: bool = False, generator: Optional[torch.Generator] = None):
    """``n_frms`` frame indices of a ``num_frames``-frame video, in order: one per equal segment, its middle
    or (``random``) a uniformly drawn frame of it. Fewer frames than ``n_frms`` repeat frames."""
    if num_frames <= 0:
        raise ValueError("a video with no frames has nothing to sample")
    edges = np.linspace(0.0, num_frames, n_frms + 1)
    if random:
        u = torch.rand(n_frms, generator=generator).double().numpy()
    else:
        u = np.full(n_frms, 0.5)
    idx = np.floor(edges[:-1] + u * (edges[1:] - edges[:-1])).astype(np.int64)
    return np.clip(idx, 0, num_frames - 1).tolist()


def read_frames(path, n_frms: int, random: bool = False) -> np.ndarray:
    """``n_frms`` RGB frames (T, H, W, 3) uint8 of the video at ``path`` (see :func:`frame_indices`).
    Raises :class:`UnreadableVideoError` naming the file when it cannot be read."""
    import decord

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UnreadableVideoError(f"video file {path!r} does not exist")
    try:
        reader = decord.VideoReader(path, num_threads=1)
        count = len(reader)
        if count <= 0:
            raise UnreadableVideoError(f"video file {path!r} has no frames")
        batch = reader.get_batch(frame_indices(count, n_frms, random))
        frames = batch.asnumpy() if hasattr(batch, "asnumpy") else batch.numpy()  # decord or torch bridge
    except UnreadableVideoError:
        raise
    except Exception as err:  # decord raises DECORDError (a RuntimeError subclass) and others
        raise UnreadableVideoError(f"cannot read video file {path!r} ({type(err).__name__}: {err})") from err
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != n_frms:
        raise UnreadableVideoError(f"video file {path!r} decoded to an unexpected shape {frames.shape}")
    return frames


class _VideoProcessor(BaseProcessor):
    def __init__(self, image_size=224, n_frms=4, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None):
        if int(n_frms) < 1:
            raise ValueError(f"n_frms must be at least 1, got {n_frms}")
        self.image_size, self.n_frms = int(image_size), int(n_frms)
        self.mean = tuple(mean) if mean is not None else CLIP_MEAN
        self.std = tuple(std) if std is not None else CLIP_STD
        self._mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None, None]
        self._std = torch.tensor(self.std, dtype=torch.float32)[:, None, None, None]

    @staticmethod
    def _cfg(cfg):
        return OmegaConf.create() if cfg is None else cfg

    def clip(self, frames):
        """(T, H, W, 3) uint8 frames -> (3, T, S, S) float clip."""
        raise NotImplementedError

    def to_clip(self, pictures):
        """Processed PIL frames -> normalised (3, T, S, S): the same numbers as ToTensor + Normalize (the
        image processors), computed on the whole clip at once (ToTensor on PIL images is slow)."""
        array = np.stack([np.asarray(p.convert("RGB"), dtype=np.uint8) for p in pictures])  # (T, S, S, 3)
        clip = torch.from_numpy(array).permute(3, 0, 1, 2).float().div(255)  # (3, T, S, S)
        return clip.sub_(self._mean).div_(self._std)

    def __call__(self, path) -> torch.Tensor:
        return self.clip(read_frames(path, self.n_frms, random=self.random_sampling))


@registry_once("processor", "evlgen_video_eval")
class EVLGenVideoEvalProcessor(_VideoProcessor):
    """Uniform sampling (middle frame of each segment) and a bicubic square resize of every frame, as
    ``evlgen_image_eval``. Deterministic, so its outputs can be cached as frozen-encoder features."""

    deterministic = True
    random_sampling = False

    def __init__(self, image_size=224, n_frms=4, mean=None, std=None):
        super().__init__(image_size, n_frms, mean, std)
        self.resize = transforms.Resize((self.image_size, self.image_size), interpolation=InterpolationMode.BICUBIC)

    def clip(self, frames):
        return self.to_clip([self.resize(Image.fromarray(f)) for f in frames])  # (3, T, S, S)

    @classmethod
    def from_config(cls, cfg=None):
        cfg = cls._cfg(cfg)
        return cls(image_size=cfg.get("image_size", 224), n_frms=cfg.get("n_frms", 4),
                   mean=cfg.get("mean", None), std=cfg.get("std", None))


@registry_once("processor", "evlgen_video_train")
class EVLGenVideoTrainProcessor(_VideoProcessor):
    """Random (default) or uniform frame sampling, one random resized crop (scale ``[min_scale,
    max_scale]``) shared by all frames of the clip, optional horizontal flip (off: captions that say
    left/right would become wrong). Randomness comes from torch's generator (seeded per sample by the
    runner)."""

    def __init__(self, image_size=224, n_frms=4, mean=None, std=None, min_scale=0.5, max_scale=1.0,
                 hflip=False, sampling="random"):
        super().__init__(image_size, n_frms, mean, std)
        if sampling not in ("random", "uniform"):
            raise ValueError(f"sampling must be 'random' or 'uniform', got {sampling!r}")
        self.random_sampling = sampling == "random"
        self.scale = (float(min_scale), float(max_scale))
        self.hflip = bool(hflip)

    def clip(self, frames):
        pictures = [Image.fromarray(f) for f in frames]
        i, j, h, w = transforms.RandomResizedCrop.get_params(pictures[0], self.scale, (3 / 4, 4 / 3))
        flip = self.hflip and bool(torch.rand(()) < 0.5)
        out = []
        for picture in pictures:
            picture = TF.resized_crop(picture, i, j, h, w, [self.image_size, self.image_size],
                                      InterpolationMode.BICUBIC)
            out.append(TF.hflip(picture) if flip else picture)
        return self.to_clip(out)  # (3, T, S, S)

    @classmethod
    def from_config(cls, cfg=None):
        cfg = cls._cfg(cfg)
        return cls(image_size=cfg.get("image_size", 224), n_frms=cfg.get("n_frms", 4),
                   mean=cfg.get("mean", None), std=cfg.get("std", None),
                   min_scale=cfg.get("min_scale", 0.5), max_scale=cfg.get("max_scale", 1.0),
                   hflip=cfg.get("hflip", False), sampling=cfg.get("sampling", "random"))
