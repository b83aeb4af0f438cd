"""A tiny generated captioning dataset (coloured shapes on 32x32 PNGs) in the ``local_caption`` layout.

As a script: ``python tests/helpers_data.py OUT_DIR`` writes OUT_DIR/{images/, train.json, val.json,
test.json} (what projects/evlgen/tiny/caption_local.yaml expects under ``tiny_caption_data``).
In tests: the ``tiny_caption_data`` fixture of tests/conftest.py.
"""
import json
import os
import sys

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}
SHAPES = ("square", "circle")
BUILDER = "local_caption"


def _draw(path, colour, shape, size=32):
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (6, 6, size - 6, size - 6)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    image.save(path)


def make_caption_data(root, n_train=16, n_val=4, n_test=4, n_corrupt=0):
    """Write the dataset under ``root``; returns ``{"root", "images", "train", "val", "test"}`` paths.

    Train entries cycle through colour x shape ("a red square", ...); ``n_corrupt`` extra train entries
    point at files that are not images (for the skip-unreadable path).
    """
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    for colour, shape in kinds:
        _draw(os.path.join(images, f"{colour}_{shape}.png"), colour, shape)

    def entries(n, offset=0):
        out = []
        for i in range(n):
            colour, shape = kinds[(i + offset) % len(kinds)]
            out.append({"image": f"{colour}_{shape}.png", "caption": f"a {colour} {shape}"})
        return out

    train = entries(n_train)
    for i in range(n_corrupt):
        name = f"corrupt_{i}.png"
        with open(os.path.join(images, name), "wb") as f:
            f.write(b"this is not a png file")
        train.append({"image": name, "caption": "a broken image"})
    paths = {"root": str(root), "images": images}
    for split, data in (("train", train), ("val", entries(n_val, 1)), ("test", entries(n_test, 3))):
        paths[split] = os.path.join(root, f"{split}.json")
        with open(paths[split], "w") as f:
            json.dump(data, f)
    return paths


def data_options(paths, builder=BUILDER):
    """``--options`` entries that point the tiny config at ``paths`` (from :func:`make_caption_data`)."""
    key = f"datasets.{builder}.build_info"
    return [f"{key}.annotations.{split}.storage={paths[split]}" for split in ("train", "val", "test")] + [
        f"{key}.images.storage={paths['images']}"
    ]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/helpers_data.py OUT_DIR")
    written = make_caption_data(sys.argv[1])
    print("\n".join(data_options(written)))
