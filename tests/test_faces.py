"""Faces on a real photo: the BlazeFace detector finds the astronaut's face of `skimage.data.astronaut()`
(public domain, shipped with scikit-image) where it is, also when pasted into a larger portrait, and the
`portrait_folder` build obfuscates that face only, stores a mask over it, and names every photo kept
with no face found. Nothing here reads files outside the repository."""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image
from skimage import data

from p3m_jax.data import decoding, raw_records
from tfds_p3m10k import build, face_detector

# The astronaut's face as the full-range model finds it (x0, y0, x1, y1), score 0.94.
ASTRONAUT_FACE = (174.0, 70.0, 279.0, 175.0)
# The larger portrait: the astronaut's head and shoulders (rows 0-260, columns 100-360) pasted at
# (x 200, y 300) of a 768 x 640 photo, so that her face moves by (100, 300).
CROP = (100, 0, 360, 260)
PASTE_AT = (200, 300)
SHIFT = (PASTE_AT[0] - CROP[0], PASTE_AT[1] - CROP[1])
FACELESS = 12  # more than ten: the report once named only the first ten


def _iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _shifted(box, shift):
    return (box[0] + shift[0], box[1] + shift[1], box[2] + shift[0], box[3] + shift[1])


def _centre(box):
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def _larger_portrait() -> np.ndarray:
    """The astronaut's head and shoulders pasted into a 768 x 640 photo of a smooth backdrop."""
    yy, xx = np.mgrid[:768, :640]
    photo = np.stack([40 + xx * 160 // 640, 60 + yy * 120 // 768, np.full_like(xx, 130)], -1).astype(np.uint8)
    x0, y0, x1, y1 = CROP
    photo[PASTE_AT[1] : PASTE_AT[1] + y1 - y0, PASTE_AT[0] : PASTE_AT[0] + x1 - x0] = data.astronaut()[y0:y1, x0:x1]
    return photo


def _alpha(height: int, width: int) -> np.ndarray:
    """A soft elliptical matte (the build needs one per photo; its values do not matter here)."""
    yy, xx = np.mgrid[:height, :width]
    radius = np.hypot((yy - height * 0.55) / (height * 0.45), (xx - width / 2) / (width * 0.35))
    return np.round(np.clip((1.1 - radius) * 5, 0, 1) * 255).astype(np.uint8)


def _save(folder: pathlib.Path, name: str, image: np.ndarray) -> None:
    for sub, array in (("images", image), ("alphas", _alpha(*image.shape[:2]))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / sub / f"{name}.png")


@pytest.fixture(scope="module")
def photos():
    return {"astronaut": data.astronaut(), "pasted": _larger_portrait()}


@pytest.fixture(scope="module")
def detected(photos):
    """The face boxes the build's detector finds in each photo."""
    detector = face_detector.shared_detector()
    return {name: detector(image) for name, image in photos.items()}


def test_the_detector_finds_the_astronauts_face_where_it_is(detected):
    faces = detected["astronaut"]
    assert len(faces) == 1, faces
    assert faces[0].score > 0.8 and _iou(faces[0].box, ASTRONAUT_FACE) > 0.5, faces


def test_the_face_pasted_into_a_larger_portrait_is_found_moved_by_the_paste_offset(detected):
    faces = detected["pasted"]
    assert len(faces) == 1, faces
    assert _iou(faces[0].box, _shifted(ASTRONAUT_FACE, SHIFT)) > 0.5, faces
    # Its centre moved by the offset (give or take a few pixels: the face is smaller in the network's input).
    moved = _centre(faces[0].box) - _centre(detected["astronaut"][0].box)
    np.testing.assert_allclose(moved, SHIFT, atol=10)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
    """train/: the two photos with a face and FACELESS flat-coloured ones (no face for any detector);
    test/: one more (the test split is not anonymised by default)."""
    root = tmp_path_factory.mktemp("faces")
    for name, image in photos.items():
        _save(root / "train", name, image)
    rng = np.random.default_rng(0)
    for i in range(FACELESS):
        _save(root / "train", f"faceless_{i:02d}", np.broadcast_to(rng.integers(0, 256, 3, np.uint8), (64, 48, 3)))
    _save(root / "test", "test_0", np.full((64, 48, 3), 90, np.uint8))
    return root


def _read_train(data_dir, name) -> dict:
    config = ml_collections.ConfigDict({"data_dir": str(data_dir), "tfds_name": f"portrait_folder/{name}"})
    records = raw_records.open_split(config, "train")
    return {record["name"].decode(): record for record in (records[i] for i in range(len(records)))}


@pytest.mark.parametrize("method", ["blur", "mosaic", "zero"])
def test_the_build_obfuscates_the_found_face_only_and_names_every_photo_without_one(
    method, folder, photos, detected, tmp_path, capsys
):
    capsys.readouterr()
    argv = ["--folder", str(folder), "--name", method, "--data_dir", str(tmp_path), "--num_workers", "1"]
    assert build.main(argv + ["--anonymize", method, "--missing_face", "keep"]) == 0
    out = capsys.readouterr().out
    # The summary line counts the photos without a face, and the report names every one of them.
    summary = f"faces found: none in {FACELESS}, one in 2, several in 0, 2 anonymised"
    assert f"train: {FACELESS + 2} examples, {FACELESS + 2} trimaps derived from the alpha, {summary}" in out, out
    names = ", ".join(f"faceless_{i:02d}" for i in range(FACELESS))
    assert f"kept with visible faces: {FACELESS} ({names})" in out, out

    records = _read_train(tmp_path, method)
    for name, image in photos.items():
        record = records[name]
        assert record["has_facemask"] and record["is_blurred"], name
        stored = decoding.decode_rgb(record["image"])  # PNG in, PNG out: unchanged pixels are exact
        mask = decoding.decode_grey(record["facemask"]) > 0
        x0, y0, x1, y1 = (int(round(v)) for v in detected[name][0].box)
        # The mask covers the detected box, and not much more than the face: at most 1.6x its sides.
        assert mask[y0:y1, x0:x1].all(), name
        ys, xs = np.nonzero(mask)
        width, height = x1 - x0, y1 - y0
        assert xs.min() > x0 - 0.3 * width and xs.max() < x1 + 0.3 * width, name
        assert ys.min() > y0 - 0.3 * height and ys.max() < y1 + 0.3 * height, name
        # Every pixel outside the face is the photo's own; nearly every one inside the face changed.
        np.testing.assert_array_equal(stored[~mask], image[~mask], err_msg=name)
        changed = (stored != image).any(axis=-1)
        assert changed[y0:y1, x0:x1].mean() > 0.9, (name, changed[y0:y1, x0:x1].mean())
        if method == "zero":
            assert not stored[mask].any(), name
    for i in range(FACELESS):  # kept as they are, not marked as anonymised
        record = records[f"faceless_{i:02d}"]
        assert not record["is_blurred"] and not record["has_facemask"]
