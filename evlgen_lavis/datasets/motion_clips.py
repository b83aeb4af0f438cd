"""Synthetic motion clips: a coloured shape moving left, right, up or down, as real mp4 files.

Each clip shows one shape (circle, rectangle or triangle; the easy-vqa vocabulary, so the image demo's
words carry over) in one colour on a light background, travelling 40-50% of the frame in one of four
directions. Captions: "a red circle moves to the left", "a blue triangle moves up", ... Splits are
balanced over colour x shape x direction (4 x 3 x 4 = 48 kinds); positions, sizes, speeds and
backgrounds are drawn from a seeded generator, so a given configuration always gives the same files.

Clips are encoded with OpenCV's MPEG-4 encoder (``mp4v``) and read back by the decord-based video
processors. :func:`prepare_motion_clips` writes ``videos/<split>/*.mp4`` and ``caption_<split>.json``
(``{"video", "caption", "image_id", "colour", "shape", "direction"}``; train: one caption string, val /
test: a list) into a temporary directory renamed into place under ``CACHE_ROOT/motion_shapes/<tag>/``,
never into git. A direction played backwards is the opposite direction: the frame *set* of a clip
moving left is that of one moving right, so only an order-aware model can caption both.
"""
import itertools
import json
import os
import re

import numpy as np

from evlgen_lavis.common import CACHE_ROOT, atomic_dir

FORMAT_VERSION = 2
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (225, 195, 25)}
SHAPES = ("circle", "rectangle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PHRASES = {"left": "moves to the left", "right": "moves to the right", "up": "moves up", "down": "moves down"}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
KINDS = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))  # 48


def caption_of(colour, shape, direction):
    return f"a {colour} {shape} {PHRASES[direction]}"


def render_clip(colour, shape, direction, rng, size=64, n_frames=8):
    """Frames (n_frames, size, size, 3) uint8 of one clip (see the module docstring)."""
    from PIL import Image, ImageDraw

    half = rng.uniform(0.13, 0.18) * size  # half the shape's extent
    travel = rng.uniform(0.38, 0.5) * size
    margin = half + 1
    dx, dy = DIRECTIONS[direction]
    along_start = rng.uniform(margin, size - margin - travel)
    across = rng.uniform(margin, size - margin)
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    fill = COLOURS[colour]
    frames = []
    for t in range(n_frames):
        along = along_start + travel * t / max(1, n_frames - 1)
        if dx:  # horizontal: moving left starts on the right
            cx, cy = (along if dx > 0 else size - along), across
        else:
            cx, cy = across, (along if dy > 0 else size - along)
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        box = (cx - half, cy - half, cx + half, cy + half)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "rectangle":
            draw.rectangle((cx - half, cy - 0.7 * half, cx + half, cy + 0.7 * half), fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
        frames.append(np.asarray(image))
    return np.stack(frames)


def write_mp4(frames, path, fps=8):
    """Encode RGB frames (T, H, W, 3) uint8 as an MPEG-4 mp4 with OpenCV (even sizes; odd ones are cropped
    by the encoder)."""
    import cv2

    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV could not open an mp4v writer for {path}: is opencv built with FFmpeg?")
    try:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # RGB -> BGR
    finally:
        writer.release()
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise RuntimeError(f"OpenCV wrote nothing to {path}")
    return path


def split_tag(n_train, n_val, n_test, n_frames, size, seed):
    return f"v{FORMAT_VERSION}_n{n_train}-{n_val}-{n_test}_f{n_frames}_s{size}_seed{seed}"


def _write_split(root, split, n, rng, size, n_frames, offset):
    os.makedirs(os.path.join(root, "videos", split), exist_ok=True)
    order = rng.permutation(len(KINDS))
    entries = []
    for i in range(n):
        colour, shape, direction = KINDS[order[(i + offset) % len(KINDS)]]
        rel = f"{split}/{i:05d}.mp4"
        write_mp4(render_clip(colour, shape, direction, rng, size, n_frames), os.path.join(root, "videos", rel))
        caption = caption_of(colour, shape, direction)
        entries.append({"video": rel, "caption": caption if split == "train" else [caption],
                        "image_id": f"{split}_{i:05d}", "colour": colour, "shape": shape, "direction": direction})
    with open(os.path.join(root, f"caption_{split}.json"), "w", encoding="utf-8") as f:
        json.dump(entries, f)


def prepare_motion_clips(cache_dir=None, n_train=480, n_val=48, n_test=96, n_frames=8, size=64, seed=0):
    """Generate the clips and annotations once (see the module docstring); returns the directory, which
    holds ``videos/`` (the ``videos.storage``) and ``caption_{train,val,test}.json``. Safe to call from
    several processes at once."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or os.path.join(CACHE_ROOT, "motion_shapes")))
    final = os.path.join(cache_dir, split_tag(n_train, n_val, n_test, n_frames, size, seed))

    def fill(tmp):
        rng = np.random.default_rng(seed)
        for split, n, offset in (("train", n_train, 0), ("val", n_val, 7), ("test", n_test, 13)):
            _write_split(tmp, split, n, rng, size, n_frames, offset)

    return atomic_dir(final, fill)


# -- scoring ---------------------------------------------------------------------------------------------

def direction_of(caption):
    """The direction a caption names ("left", "right", "up", "down"), or None."""
    for word in re.findall(r"[a-z]+", str(caption).lower()):
        if word in DIRECTIONS:
            return word
    return None


def appearance_of(caption):
    """(colour, shape) named by a caption; missing parts are None."""
    words = re.findall(r"[a-z]+", str(caption).lower())
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape


def motion_scores(results, annotations):
    """Accuracies (0..1) of generated captions against the clips' true attributes.

    results: ``[{"image_id", "caption"}]``; annotations: entries with ``image_id``, ``colour``, ``shape``,
    ``direction``. Returns ``direction`` (the right one of four), ``axis`` (horizontal vs vertical: what an
    order-blind model can still get), ``reversed_direction`` (the opposite direction named: a model that
    cannot tell time's arrow lands here about as often as on the right one), ``appearance`` (colour and
    shape) and ``n``.
    """
    truth = {str(a["image_id"]): a for a in annotations}
    hits = {"direction": 0, "axis": 0, "reversed_direction": 0, "appearance": 0}
    for r in results:
        ann = truth[str(r["image_id"])]
        said = direction_of(r["caption"])
        hits["direction"] += said == ann["direction"]
        hits["reversed_direction"] += said == OPPOSITE[ann["direction"]]
        hits["axis"] += said is not None and (said in ("left", "right")) == (ann["direction"] in ("left", "right"))
        hits["appearance"] += appearance_of(r["caption"]) == (ann["colour"], ann["shape"])
    n = len(results)
    if not n:
        raise ValueError("motion_scores: no results")
    return {**{k: v / n for k, v in hits.items()}, "n": n}
