"""Tests of the p3m10k builder over the generated dummy_data/ and the synthetic config.

`tfds.testing.DatasetBuilderTestCase` needs TensorFlow in TFDS 4.9.10 (it builds
`tf.data` datasets, `tf.data.DatasetSpec`, graph/eager modes, and imports `dill`),
which this project does not install: those classes run only where TensorFlow is
present and are skipped with that reason otherwise. The pytest tests below do the
same checks without TensorFlow (split sizes, reload, no split overlap, config
descriptions, default config) plus exact content checks, reading through
`tfds.data_source`.
"""

import importlib.util
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from tfds_p3m10k import make_dummy_data
from tfds_p3m10k import p3m10k_dataset_builder as builder_lib
from tfds_p3m10k import synthetic

DUMMY_DIR = os.path.join(os.path.dirname(builder_lib.__file__), "dummy_data")
DUMMY_SPLITS = {"train": 4, "p3m_500_p": 2, "p3m_500_np": 2}
SYNTHETIC_SPLITS = {"train": 48, "p3m_500_p": 8, "p3m_500_np": 8}
FEATURE_KEYS = {"image", "alpha", "trimap", "facemask", "has_facemask", "fg", "bg", "has_fg_bg", "name", "is_blurred"}
HAS_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None


# --- The TFDS test case (needs TensorFlow) ------------------------------------

if HAS_TENSORFLOW:

    class P3m10kDefaultTest(tfds.testing.DatasetBuilderTestCase):
        """DatasetBuilderTestCase over dummy_data/ (the default config)."""

        DATASET_CLASS = builder_lib.Builder
        BUILDER_CONFIG_NAMES_TO_TEST = ["default"]
        SPLITS = DUMMY_SPLITS
        SKIP_CHECKSUMS = True
        MOCK_OUT_FORBIDDEN_OS_FUNCTIONS = False  # the builder reads folders and zips with os/zipfile

    class P3m10kSyntheticTest(tfds.testing.DatasetBuilderTestCase):
        """DatasetBuilderTestCase for the synthetic config (no download)."""

        DATASET_CLASS = builder_lib.Builder
        BUILDER_CONFIG_NAMES_TO_TEST = ["synthetic"]
        SPLITS = SYNTHETIC_SPLITS
        SKIP_CHECKSUMS = True
        MOCK_OUT_FORBIDDEN_OS_FUNCTIONS = False  # the builder reads folders and zips with os/zipfile

else:

    @pytest.mark.skip(
        reason="tfds.testing.DatasetBuilderTestCase needs TensorFlow (tf.data, "
        "tf.data.DatasetSpec) in TFDS 4.9.10; TensorFlow is not installed. The "
        "TF-free tests in this file cover the same checks."
    )
    def test_dataset_builder_test_case():
        pass


# --- TF-free equivalents -------------------------------------------------------


def _build(data_dir, config, manual_dir=None, **kwargs):
    builder = builder_lib.Builder(data_dir=os.fspath(data_dir), config=config, num_workers=1, **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )
    return builder


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds_default")
    _build(data_dir, "default", manual_dir=DUMMY_DIR)
    return data_dir


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds_synthetic")
    _build(data_dir, "synthetic")
    return data_dir


def _read_all(data_dir, config, split):
    source = tfds.data_source(f"p3m10k/{config}", split=split, data_dir=os.fspath(data_dir))
    return [source[i] for i in range(len(source))]


def _pil(path, mode=None):
    with Image.open(path) as image:
        return np.asarray(image.convert(mode) if mode else image)


def test_dummy_data_is_small_and_matches_the_generator(tmp_path):
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DUMMY_DIR) for f in fs)
    assert total < 1_000_000
    regenerated = make_dummy_data.write_dummy_release(os.fspath(tmp_path))
    committed = os.path.join(DUMMY_DIR, "P3M-10k")
    for directory, _, files in os.walk(regenerated):
        for filename in files:
            path = os.path.join(directory, filename)
            with open(path, "rb") as a, open(os.path.join(committed, os.path.relpath(path, regenerated)), "rb") as b:
                assert a.read() == b.read(), f"dummy_data out of date: rerun make_dummy_data ({path})"


@pytest.mark.parametrize("config, splits", [("default", DUMMY_SPLITS), ("synthetic", SYNTHETIC_SPLITS)])
def test_split_sizes_reload_and_no_overlap(config, splits, default_dir, synthetic_dir):
    data_dir = default_dir if config == "default" else synthetic_dir
    reloaded = builder_lib.Builder(data_dir=os.fspath(data_dir), config=config)
    assert {k: v.num_examples for k, v in reloaded.info.splits.items()} == splits
    assert reloaded.info.file_format.value == "array_record"
    names = {}
    for split, count in splits.items():
        examples = _read_all(data_dir, config, split)
        assert len(examples) == count
        names[split] = {ex["name"] for ex in examples}
        assert len(names[split]) == count
    assert not names["train"] & names["p3m_500_p"]
    assert not names["train"] & names["p3m_500_np"]
    assert not names["p3m_500_p"] & names["p3m_500_np"]
    assert reloaded.builder_config.description


def test_default_config_is_default():
    assert builder_lib.Builder(data_dir="/nonexistent").builder_config.name == "default"


def test_default_config_content_equals_the_files(default_dir):
    root = os.path.join(DUMMY_DIR, "P3M-10k")
    folders = {
        "train": ("train", "blurred_image"),
        "p3m_500_p": ("validation/P3M-500-P", "blurred_image"),
        "p3m_500_np": ("validation/P3M-500-NP", "original_image"),
    }
    for split, (folder, image_folder) in folders.items():
        base = os.path.join(root, folder)
        for ex in _read_all(default_dir, "default", split):
            assert set(ex) == FEATURE_KEYS
            name = ex["name"].decode()
            image = _pil(os.path.join(base, image_folder, f"{name}.jpg"), "RGB")
            mask = _pil(os.path.join(base, "mask", f"{name}.png"))
            mask0 = mask[..., 0] if mask.ndim == 3 else mask
            h, w = image.shape[:2]
            assert (h, w) == (make_dummy_data.DUMMY_HEIGHT, make_dummy_data.DUMMY_WIDTH)
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (h, w, 3)
            np.testing.assert_array_equal(ex["image"], image)
            assert ex["alpha"].dtype == np.uint8 and ex["alpha"].shape == (h, w, 1)
            np.testing.assert_array_equal(ex["alpha"][..., 0], mask0)
            assert ex["trimap"].shape == (h, w, 1)
            assert set(np.unique(ex["trimap"])) <= {0, 128, 255}
            if split != "train":
                np.testing.assert_array_equal(ex["trimap"][..., 0], _pil(os.path.join(base, "trimap", f"{name}.png")))
            else:  # derived from alpha: certain where alpha is certain
                assert np.all(ex["alpha"][ex["trimap"] == 255] == 255)
                assert np.all(ex["alpha"][ex["trimap"] == 0] == 0)
            facemask_path = os.path.join(base, "facemask", f"{name}.png")
            assert ex["has_facemask"] == os.path.exists(facemask_path)
            if ex["has_facemask"]:
                np.testing.assert_array_equal(ex["facemask"][..., 0], _pil(facemask_path))
            else:
                assert ex["facemask"].shape == (1, 1, 1)
            assert ex["has_fg_bg"] == (split == "train")
            if split == "train":
                np.testing.assert_array_equal(ex["fg"], _pil(os.path.join(base, "fg_blurred", f"{name}.png")))
                np.testing.assert_array_equal(ex["bg"], _pil(os.path.join(base, "bg", f"{name}.png")))
            else:
                assert ex["fg"].shape == ex["bg"].shape == (1, 1, 3)
            assert ex["is_blurred"] == (split != "p3m_500_np")


def test_three_channel_mask_is_reduced_to_channel_0(default_dir):
    name = make_dummy_data.dummy_name(0, 1)
    mask = _pil(os.path.join(DUMMY_DIR, "P3M-10k", "train", "mask", f"{name}.png"))
    assert mask.ndim == 3 and not np.array_equal(mask[..., 0], mask[..., 1])
    (ex,) = [e for e in _read_all(default_dir, "default", "train") if e["name"] == name.encode()]
    np.testing.assert_array_equal(ex["alpha"][..., 0], mask[..., 0])


def test_image_bytes_are_stored_unchanged(default_dir):
    """The ArrayRecord holds the release's JPEG bytes as they are (no re-encoding)."""
    name = make_dummy_data.dummy_name(1, 0)
    with open(os.path.join(DUMMY_DIR, "P3M-10k", "validation", "P3M-500-P", "blurred_image", f"{name}.jpg"), "rb") as f:
        jpeg = f.read()
    builder = builder_lib.Builder(data_dir=os.fspath(default_dir), config="default")
    source = builder.as_data_source(split="p3m_500_p")
    raw = [source.data_source[i] for i in range(len(source))]  # serialized records
    assert any(jpeg in record for record in raw)


def test_synthetic_content(synthetic_dir):
    for split in SYNTHETIC_SPLITS:
        for ex in _read_all(synthetic_dir, "synthetic", split)[:3]:
            assert set(ex) == FEATURE_KEYS
            assert ex["image"].shape == (128, 128, 3) and ex["alpha"].shape == (128, 128, 1)
            assert ex["has_fg_bg"] and ex["fg"].shape == ex["bg"].shape == (128, 128, 3)
            np.testing.assert_array_equal(ex["image"], synthetic.composite(ex["fg"], ex["bg"], ex["alpha"][..., 0]))
            assert ex["has_facemask"] == ex["is_blurred"] == (split != "p3m_500_np")
            assert set(np.unique(ex["trimap"])) == {0, 128, 255}


def test_synthetic_size_and_count_are_configurable(tmp_path):
    builder = _build(tmp_path, "synthetic", synthetic_image_size=(48, 64), synthetic_num_train=3, synthetic_num_test=2)
    name = builder.builder_config.name
    assert name == "synthetic_48x64_3_2_2"
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "p3m_500_p": 2, "p3m_500_np": 2}
    (ex, *_) = _read_all(tmp_path, name, "train")
    assert ex["image"].shape == (48, 64, 3)


def test_data_source_reads_without_tensorflow(default_dir):
    if HAS_TENSORFLOW:
        pytest.skip("TensorFlow is installed here; this test checks reading without it")
    assert importlib.util.find_spec("tensorflow") is None
    source = tfds.data_source("p3m10k/default", split="p3m_500_np", data_dir=os.fspath(default_dir))
    ex = source[0]
    assert isinstance(ex["image"], np.ndarray) and ex["image"].dtype == np.uint8
    assert isinstance(ex["trimap"], np.ndarray) and ex["trimap"].shape[-1] == 1
    import sys  # pylint: disable=g-import-not-at-top

    assert "tensorflow" not in sys.modules
