"""The one way p3m-jax opens evaluation data: the test splits and the validation slice.

Either from a TFDS build (`test_dataset`, `validation_dataset`: the ArrayRecord files read without
TensorFlow, strided over processes) or from an extracted P3M-10k release folder (`FolderDataset`).
`open_test_split` picks between the two for the command line. Every item is a dict with ``name``,
``image`` (H, W, 3) uint8 RGB, ``alpha`` / ``trimap`` (H, W, 1) uint8, ``has_facemask`` and, when it
is true, ``facemask`` (H, W, 1) uint8; `plain_example` turns one into (H, W) maps for scoring.
"""

from __future__ import annotations

import collections.abc
import os
import pathlib
from typing import Sequence

import ml_collections
import numpy as np

from p3m_jax.common import image_io
from p3m_jax.data import source as source_lib
from p3m_jax.data.source import BadExampleError

RELEASE_SPLITS = {
    # split name -> (folder under the release root, image folder)
    "p3m_500_p": ("validation/P3M-500-P", "blurred_image"),
    "p3m_500_np": ("validation/P3M-500-NP", "original_image"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


# ----------------------------------------------------------------------------------------- TFDS build
class EvalDataset(collections.abc.Sequence):
    """Full-size examples of one split, in name order, this process's share (strided).

    Items: image (H, W, 3) uint8 RGB, alpha / trimap (H, W, 1) uint8, facemask (H, W, 1) uint8 when
    `has_facemask` (else absent), has_facemask bool, name str: what `p3m_jax.evaluation.scoring.evaluate` takes.
    For the validation slice of train the trimap is the stored one (fixed kernel,
    `tfds_p3m10k.maps.trimap_kernel_size`); the test splits carry the released trimaps.
    """

    def __init__(self, data_config, split: str, indices: Sequence[int], names: Sequence[str]):
        self.split = split
        self._source = source_lib.RawSource(source_lib.open_split(data_config, split), indices)
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        raw = self._source[i % len(self)]
        name, index = raw.get("name", ""), raw["index"]
        if "error" in raw:
            raise BadExampleError(name, index, raw["error"])
        example = {"name": name, "has_facemask": raw["has_facemask"]}
        keys = ("image", "alpha", "trimap") + (("facemask",) if raw["has_facemask"] else ())
        for key in keys:
            array = source_lib.decode_rgb(raw[key]) if key == "image" else source_lib.decode_grey(raw[key])
            if array is None:
                raise BadExampleError(name, index, f"{key} does not decode")
            example[key] = array if key == "image" else array[..., None]
        for key in keys[1:]:
            if example[key].shape[:2] != example["image"].shape[:2]:
                raise BadExampleError(
                    name, index, f"{key} is {example[key].shape[:2]} but image is {example['image'].shape[:2]}"
                )
        return example


def _share(order: Sequence[int], names: Sequence[str], process_index, process_count) -> tuple:
    process_index, process_count = source_lib.resolve_process(process_index, process_count)
    order = list(order)[process_index::process_count]
    return order, [names[i] for i in order]


def validation_dataset(
    data_config, *, process_index: int | None = None, process_count: int | None = None
) -> EvalDataset:
    """The held-out validation slice of train (full size), in name order, this process's share."""
    names = source_lib.split_names(data_config, source_lib.TRAIN_SPLIT)
    held_out, _ = source_lib.validation_split(names, source_lib.validation_count(data_config, len(names)))
    order = sorted(held_out.tolist(), key=lambda i: names[i])
    indices, share = _share(order, names, process_index, process_count)
    return EvalDataset(data_config, source_lib.TRAIN_SPLIT, indices, share)


def test_dataset(
    data_config, split: str, *, process_index: int | None = None, process_count: int | None = None
) -> EvalDataset:
    """A test split ('p3m_500_p' / 'p3m_500_np', full size), in name order, this process's share."""
    if split not in source_lib.TEST_SPLITS:
        raise ValueError(f"unknown test split {split!r}; expected one of {source_lib.TEST_SPLITS}")
    names = source_lib.split_names(data_config, split)
    order = sorted(range(len(names)), key=lambda i: names[i])
    indices, share = _share(order, names, process_index, process_count)
    return EvalDataset(data_config, split, indices, share)


test_dataset.__test__ = False  # not a pytest test when imported into a test module


# --------------------------------------------------------------------------------- release folder
class FolderDataset(collections.abc.Sequence):
    """One test split read from a folder in the release layout; items are dicts like the TFDS examples."""

    def __init__(self, root, split: str):
        if split not in RELEASE_SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(RELEASE_SPLITS)}")
        self.split = split
        self.folder = _find_split_folder(pathlib.Path(root), split)
        image_folder = self.folder / RELEASE_SPLITS[split][1]
        self.images = {p.stem: p for p in sorted(image_folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        if not self.images:
            raise FileNotFoundError(f"no images in {image_folder}")
        self.names = sorted(self.images)
        for sub in ("mask", "trimap"):
            missing = [n for n in self.names if not self._map_path(sub, n)]
            if missing:
                raise FileNotFoundError(f"{self.folder / sub}: no file for {len(missing)} image(s), e.g. {missing[0]}")

    def _map_path(self, sub: str, name: str):
        for ext in (".png", ".jpg", ".jpeg"):
            path = self.folder / sub / (name + ext)
            if path.exists():
                return path
        return None

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        name = self.names[index]
        example = {
            "name": name,
            "image": image_io.load_rgb(self.images[name]),
            "alpha": image_io.load_gray(self._map_path("mask", name))[..., None],
            "trimap": image_io.load_gray(self._map_path("trimap", name))[..., None],
        }
        facemask = self._map_path("facemask", name)
        example["has_facemask"] = facemask is not None
        if facemask is not None:
            example["facemask"] = image_io.load_gray(facemask)[..., None]
        return example


def _find_split_folder(root: pathlib.Path, split: str) -> pathlib.Path:
    relative = pathlib.Path(RELEASE_SPLITS[split][0])
    candidates = [root / relative, root / "P3M-10k" / relative, root / relative.name, root]
    for candidate in candidates:
        if (candidate / RELEASE_SPLITS[split][1]).is_dir() and (candidate / "mask").is_dir():
            return candidate
    raise FileNotFoundError(
        f"{root}: no {relative} folder with {RELEASE_SPLITS[split][1]}/ and mask/ (expected the P3M-10k release layout)"
    )


def open_test_split(split: str, *, release_dir=None, tfds_data_dir=None, tfds_config: str = "default"):
    """A test split for scoring: from a release-layout folder (`release_dir`) or a TFDS build
    (`tfds_data_dir` holding ``p3m10k/<tfds_config>``), the whole split in this process."""
    if (release_dir is None) == (tfds_data_dir is None):
        raise ValueError("give exactly one of a release folder and a TFDS data folder")
    if release_dir is not None:
        return FolderDataset(release_dir, split)
    data_config = ml_collections.ConfigDict(
        {"data_dir": os.fspath(tfds_data_dir), "tfds_name": f"p3m10k/{tfds_config}"}
    )
    # Without this check TFDS would try to build the dataset here and fail on its manual download folder.
    built = source_lib.built_configs(tfds_data_dir)
    there = f"built there: {', '.join(built)}" if built else "no p3m10k config is built there"
    try:
        builder = source_lib.get_builder(data_config)
    except ValueError as e:
        raise ValueError(f"{e} ({tfds_data_dir}: {there})") from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{data_config.tfds_name} is not built in {tfds_data_dir} ({there}). Pass one of those as "
            f"--tfds_config, build it with python -m tfds_p3m10k.build --data_dir={tfds_data_dir} ..., or "
            f"score the extracted P3M-10k release folder instead (--release_dir)"
        )
    return test_dataset(data_config, split, process_index=0, process_count=1)


def plain_example(example) -> dict:
    """A TFDS or folder example as numpy (H, W) maps and a str name."""
    squeeze = lambda x: np.asarray(x)[..., 0] if np.ndim(x) == 3 else np.asarray(x)  # noqa: E731
    name = example.get("name", "")
    name = name.decode() if isinstance(name, bytes) else str(name)
    out = {
        "name": name,
        "image": np.asarray(example["image"]),
        "alpha": squeeze(example["alpha"]),
        "trimap": squeeze(example["trimap"]),
    }
    has_facemask = bool(example.get("has_facemask", "facemask" in example))
    if has_facemask and "facemask" in example:
        facemask = squeeze(example["facemask"])
        if facemask.shape == out["alpha"].shape:
            out["facemask"] = facemask
    if out["image"].ndim == 2:
        out["image"] = np.repeat(out["image"][..., None], 3, axis=2)
    if out["image"].shape[:2] != out["alpha"].shape or out["trimap"].shape != out["alpha"].shape:
        raise ValueError(
            f"{name}: image {out['image'].shape}, alpha {out['alpha'].shape} and trimap "
            f"{out['trimap'].shape} differ in size"
        )
    return out
