"""The one way p3m-jax opens evaluation data: the test splits and the validation slice.

Either from a TFDS build (`test_dataset`, `validation_dataset`: the ArrayRecord files of `p3m10k/<config>`
or `portrait_folder/<name>`, read without TensorFlow, strided over processes) or from a folder in one of
the layouts of `tfds_p3m10k.folder_layout` (`FolderDataset`: the P3M-10k release, PPM-100, AIM-500, your
own `images/` + `alphas/`), read as it is. `open_test_split` picks between the two for the command line. Every item is a dict with ``name``,
``image`` (H, W, 3) uint8 RGB, ``alpha`` / ``trimap`` (H, W, 1) uint8, ``has_facemask`` and, when it
is true, ``facemask`` (H, W, 1) uint8; `plain_example` turns one into (H, W) maps for scoring.
"""

from __future__ import annotations

import collections.abc
import os
from typing import Sequence

import ml_collections
import numpy as np

from p3m_jax.data import builds, decoding, holdout, raw_records
from p3m_jax.data.raw_records import BadExampleError
from tfds_p3m10k import folder_layout

RELEASE_SPLITS = {
    # split name -> (folder under the release root, image folder)
    "p3m_500_p": ("validation/P3M-500-P", "blurred_image"),
    "p3m_500_np": ("validation/P3M-500-NP", "original_image"),
}


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
        self._source = raw_records.RawSource(raw_records.open_split(data_config, split), indices)
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
            array = decoding.decode_rgb(raw[key]) if key == "image" else decoding.decode_grey(raw[key])
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
    process_index, process_count = builds.resolve_process(process_index, process_count)
    order = list(order)[process_index::process_count]
    return order, [names[i] for i in order]


def validation_dataset(
    data_config, *, process_index: int | None = None, process_count: int | None = None
) -> EvalDataset:
    """The held-out validation slice of train (full size), in name order, this process's share."""
    names = holdout.split_names(data_config, raw_records.TRAIN_SPLIT)
    held_out, _ = holdout.validation_split(names, holdout.validation_count(data_config, len(names)))
    order = sorted(held_out.tolist(), key=lambda i: names[i])
    indices, share = _share(order, names, process_index, process_count)
    return EvalDataset(data_config, raw_records.TRAIN_SPLIT, indices, share)


def test_dataset(
    data_config, split: str, *, process_index: int | None = None, process_count: int | None = None
) -> EvalDataset:
    """A test split of the build (p3m10k: 'p3m_500_p' / 'p3m_500_np'; a folder build: 'test', 'validation';
    full size), in name order, this process's share."""
    splits = test_splits(data_config)
    if split not in splits:
        raise ValueError(f"unknown test split {split!r} of {data_config.tfds_name}; expected one of {splits}")
    names = holdout.split_names(data_config, split)
    order = sorted(range(len(names)), key=lambda i: names[i])
    indices, share = _share(order, names, process_index, process_count)
    return EvalDataset(data_config, split, indices, share)


def test_splits(data_config) -> list[str]:
    """The splits of the build other than train, in their build order."""
    return [s for s in builds.get_builder(data_config).info.splits if s != raw_records.TRAIN_SPLIT]


test_dataset.__test__ = False  # not a pytest test when imported into a test module


# ------------------------------------------------------------------------------------- layout folder
FOLDER_FRACTIONS = (("test", 1.0),)  # a `folder` layout without split subfolders is scored whole, as `test`


class FolderDataset(collections.abc.Sequence):
    """One test split of a folder in a layout of `tfds_p3m10k.folder_layout`, read as it is; items are
    dicts like the TFDS examples, with the trimap derived from the alpha where the folder has none
    (`trimaps_derived` counts them once read). A `folder` layout without split subfolders is one split,
    `test`. Every file is paired when the dataset opens; each is decoded when its item is read."""

    def __init__(self, root, split: str, layout: str = "p3m10k"):
        splits = layout_test_splits(layout)
        if split not in splits:
            raise ValueError(f"unknown split {split!r} of the {layout} layout; expected one of {splits}")
        self.split, self.layout = split, layout
        try:
            examples = folder_layout.scan(root, layout, fractions=FOLDER_FRACTIONS, splits=[split])
        except folder_layout.LayoutNotFoundError as error:
            raise FileNotFoundError(str(error)) from None
        self.examples = examples[split]
        self.names = [e.name for e in self.examples]
        self.derived = set()

    @property
    def trimaps_derived(self) -> int:
        return len(self.derived)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        example = self.examples[index]
        arrays = folder_layout.load_example(example)
        if arrays["trimap_derived"]:
            self.derived.add(example.name)
        out = {"name": example.name, "has_facemask": "facemask" in arrays}
        for key in ("image", "alpha", "trimap", "facemask"):
            if key in arrays:
                out[key] = arrays[key] if key == "image" else arrays[key][..., None]
        return out


def layout_test_splits(layout: str) -> list[str]:
    return [s for s in folder_layout.get_layout(layout).splits if s != raw_records.TRAIN_SPLIT]


def open_test_split(
    split: str, *, release_dir=None, tfds_data_dir=None, tfds_config: str = "default", folder=None, layout=None
):
    """A test split for scoring, the whole split in this process: from a folder in a layout (`folder` and
    `layout`; `release_dir` is the P3M-10k release layout) or a TFDS build (`tfds_data_dir` holding
    ``p3m10k/<tfds_config>``, or ``portrait_folder/<name>`` when `tfds_config` names one)."""
    if release_dir is not None:
        folder, layout = release_dir, "p3m10k"
    if (folder is None) == (tfds_data_dir is None):
        raise ValueError("give exactly one of a layout folder and a TFDS data folder")
    if folder is not None:
        return FolderDataset(folder, split, layout or "folder")
    tfds_name = tfds_config if "/" in tfds_config else f"p3m10k/{tfds_config}"
    dataset = tfds_name.split("/")[0]
    data_config = ml_collections.ConfigDict({"data_dir": os.fspath(tfds_data_dir), "tfds_name": tfds_name})
    # Without this check TFDS would try to build the dataset here and fail on its manual download folder.
    built = builds.built_configs(tfds_data_dir, dataset)
    there = f"built there: {', '.join(built)}" if built else f"no {dataset} config is built there"
    try:
        builder = builds.get_builder(data_config)
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
