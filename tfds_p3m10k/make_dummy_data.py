"""Writes `dummy_data/`: a tiny fake P3M-10k release for the builder tests.

  python -m tfds_p3m10k.make_dummy_data [--output=tfds_p3m10k/dummy_data]

The files are synthetic portraits (synthetic.py), not the authors' images, in the
release layout of docs/design.md section 2, with a few twists the builder must handle:
one 3-channel mask (stored as channel 0), facemasks for some train and P3M-500-P
examples, and `train/fg_blurred/` + `train/bg/` for every train example.
Deterministic: rerunning rewrites identical bytes. Total size is a few tens of kB.
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
from PIL import Image

from tfds_p3m10k import synthetic

# (split folder, image folder, count, has trimap, facemask count)
DUMMY_SPLITS = (
    ("train", "blurred_image", 4, False, 2),
    ("validation/P3M-500-P", "blurred_image", 2, True, 2),
    ("validation/P3M-500-NP", "original_image", 2, True, 0),
)
DUMMY_HEIGHT, DUMMY_WIDTH = 40, 32  # not square, so transposed sizes would show
JPEG_QUALITY = 90


def dummy_name(split_index: int, index: int) -> str:
    return f"p_{split_index:02d}{index:02d}dd{index:02x}"


def _save(array: np.ndarray, path: str, **kwargs) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def write_dummy_release(out_dir: str, height: int = DUMMY_HEIGHT, width: int = DUMMY_WIDTH) -> str:
    """Writes `<out_dir>/P3M-10k/...`; returns that release folder."""
    root = os.path.join(out_dir, "P3M-10k")
    if os.path.exists(root):
        shutil.rmtree(root)
    for split_index, (folder, image_folder, count, has_trimap, facemasks) in enumerate(DUMMY_SPLITS):
        base = os.path.join(root, *folder.split("/"))
        for index in range(count):
            name = dummy_name(split_index, index)
            portrait = synthetic.render_portrait(
                synthetic.sample_seed(1234, split_index, index),
                height,
                width,
                blur_face=image_folder == "blurred_image",
            )
            _save(portrait.image, os.path.join(base, image_folder, f"{name}.jpg"), quality=JPEG_QUALITY)
            mask = portrait.alpha
            if split_index == 0 and index == 1:
                # A 3-channel mask whose other channels differ: only channel 0 counts.
                mask = np.stack([portrait.alpha, 255 - portrait.alpha, portrait.alpha // 2], axis=-1)
            _save(mask, os.path.join(base, "mask", f"{name}.png"))
            if has_trimap:
                _save(portrait.trimap, os.path.join(base, "trimap", f"{name}.png"))
            if index < facemasks:
                _save(portrait.facemask, os.path.join(base, "facemask", f"{name}.png"))
            if folder == "train":
                _save(portrait.fg, os.path.join(base, "fg_blurred", f"{name}.png"))
                _save(portrait.bg, os.path.join(base, "bg", f"{name}.png"))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--output", default=os.path.join(os.path.dirname(__file__), "dummy_data"), help="folder to write"
    )
    args = parser.parse_args()
    root = write_dummy_release(args.output)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    print(f"wrote {root} ({total / 1024:.1f} kB)")


if __name__ == "__main__":
    main()
