"""Bad input to the p3m10k builder: clear errors naming the files, nothing written.

Each case copies the generated dummy release (tfds_p3m10k/dummy_data) into a temp
folder, breaks it, and builds. Also: skipping bad examples, zip input, separately
shipped facemasks, an interrupted build, and the build CLI.
"""

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from tfds_p3m10k import build
from tfds_p3m10k import release_layout
from tfds_p3m10k import make_dummy_data
from tfds_p3m10k import p3m10k_dataset_builder as builder_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DUMMY_RELEASE = os.path.join(REPO, "tfds_p3m10k", "dummy_data", "P3M-10k")
TRAIN = "train"
P500 = os.path.join("validation", "P3M-500-P")
NP500 = os.path.join("validation", "P3M-500-NP")


@pytest.fixture
def release(tmp_path):
    """A fresh copy of the dummy release: returns its P3M-10k folder."""
    root = tmp_path / "manual" / "P3M-10k"
    shutil.copytree(DUMMY_RELEASE, root)
    return root


def _name(split_index, index):
    return make_dummy_data.dummy_name(split_index, index)


def _build(release_root, data_dir, **kwargs):
    builder = builder_lib.Builder(data_dir=os.fspath(data_dir), config="default", num_workers=1, **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(release_root.parent), compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )
    return builder


def _expect_bad_input(release_root, tmp_path, *fragments):
    """Builds, expects BadInputError mentioning each fragment, and nothing left in data_dir."""
    data_dir = tmp_path / "data"
    with pytest.raises(release_layout.BadInputError) as info:
        _build(release_root, data_dir)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    # Nothing final, nothing half-written: no version dir, no incomplete.* dir.
    leftovers = [os.path.join(d, x) for d, ds, fs in os.walk(data_dir) for x in ds + fs]
    assert not [p for p in leftovers if "1.0.0" in p or "array_record" in p], leftovers
    return message


def test_missing_folders_are_named(release, tmp_path):
    shutil.rmtree(release / NP500 / "trimap")
    shutil.rmtree(release / TRAIN / "mask")
    message = _expect_bad_input(
        release, tmp_path, str(release / "validation/P3M-500-NP/trimap"), str(release / "train/mask"), "missing"
    )
    assert "skip_bad_examples" not in message  # skipping cannot fix a missing folder


def test_no_release_found(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "notes.txt").write_text("nothing here")
    _expect_bad_input(tmp_path / "manual" / "P3M-10k", tmp_path, "no P3M-10k release found", str(tmp_path / "manual"))


def test_image_without_mask_and_mask_without_image(release, tmp_path):
    os.remove(release / TRAIN / "mask" / f"{_name(0, 2)}.png")
    os.remove(release / P500 / "blurred_image" / f"{_name(1, 1)}.jpg")
    _expect_bad_input(
        release,
        tmp_path,
        str(release / TRAIN / "blurred_image" / f"{_name(0, 2)}.jpg"),
        "has no mask",
        str(release / P500 / "mask" / f"{_name(1, 1)}.png"),
        "has no image",
    )


def test_test_image_without_trimap(release, tmp_path):
    os.remove(release / NP500 / "trimap" / f"{_name(2, 0)}.png")
    _expect_bad_input(
        release, tmp_path, str(release / NP500 / "original_image" / f"{_name(2, 0)}.jpg"), "has no trimap"
    )


def test_unreadable_and_truncated_files(release, tmp_path):
    garbage = release / TRAIN / "blurred_image" / f"{_name(0, 0)}.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    truncated_jpeg = release / P500 / "blurred_image" / f"{_name(1, 0)}.jpg"
    truncated_jpeg.write_bytes(truncated_jpeg.read_bytes()[:300])
    truncated_png = release / NP500 / "mask" / f"{_name(2, 1)}.png"
    truncated_png.write_bytes(truncated_png.read_bytes()[:-40])
    _expect_bad_input(
        release, tmp_path, f"{garbage}: unreadable", f"{truncated_jpeg}: unreadable", f"{truncated_png}: unreadable"
    )


def test_mask_size_differs_from_image(release, tmp_path):
    mask = release / TRAIN / "mask" / f"{_name(0, 3)}.png"
    Image.new("L", (make_dummy_data.DUMMY_WIDTH + 1, make_dummy_data.DUMMY_HEIGHT)).save(mask)
    _expect_bad_input(release, tmp_path, f"{mask}: mask is 33x40 but its image")


def test_trimap_values_outside_0_128_255(release, tmp_path):
    trimap_path = release / P500 / "trimap" / f"{_name(1, 1)}.png"
    trimap = np.asarray(Image.open(trimap_path)).copy()
    trimap[0, :3] = [1, 127, 254]
    Image.fromarray(trimap).save(trimap_path)
    _expect_bad_input(release, tmp_path, f"{trimap_path}: trimap has values outside", "1, 127, 254")


def test_every_problem_is_named_at_once(release, tmp_path):
    a = release / TRAIN / "mask" / f"{_name(0, 0)}.png"
    b = release / NP500 / "original_image" / f"{_name(2, 1)}.jpg"
    Image.new("L", (5, 5)).save(a)
    b.write_bytes(b"")
    message = _expect_bad_input(release, tmp_path, str(a), str(b), "2 problem(s)", "--skip_bad_examples")
    assert "nothing was written" in message


def test_skip_bad_examples_leaves_them_out_and_logs_them(release, tmp_path, caplog):
    (release / TRAIN / "blurred_image" / f"{_name(0, 0)}.jpg").write_bytes(b"broken")
    os.remove(release / P500 / "trimap" / f"{_name(1, 1)}.png")
    with caplog.at_level(logging.WARNING):
        builder = _build(release, tmp_path / "data", skip_bad_examples=True)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "p3m_500_p": 1, "p3m_500_np": 2}
    assert builder.skipped_examples == {"train": [_name(0, 0)], "p3m_500_p": [_name(1, 1)], "p3m_500_np": []}
    assert "left out 2 example(s)" in caplog.text and _name(0, 0) in caplog.text


def test_skipping_every_example_of_a_split_is_one_error_and_writes_nothing(release, tmp_path):
    for path in (release / P500 / "blurred_image").iterdir():
        path.write_bytes(b"broken")
    data_dir = tmp_path / "data"
    with pytest.raises(release_layout.BadInputError, match="no example left in p3m_500_p after skipping 2 bad"):
        _build(release, data_dir, skip_bad_examples=True)
    leftovers = [os.path.join(d, x) for d, ds, fs in os.walk(data_dir) for x in ds + fs]
    assert not [p for p in leftovers if "1.0.0" in p or "array_record" in p], leftovers


def _zip_folder(folder, zip_path, arc_prefix):
    with zipfile.ZipFile(zip_path, "w") as archive:
        for directory, _, files in os.walk(folder):
            for filename in sorted(files):
                path = os.path.join(directory, filename)
                archive.write(path, arc_prefix + os.path.relpath(path, folder).replace(os.sep, "/"))


def test_zip_input_and_separate_facemask_zip_give_the_same_examples(release, tmp_path):
    folder_build = _build(release, tmp_path / "from_folder")
    # The release as a zip, with its facemasks moved to a separate facemask zip.
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    masks = tmp_path / "masks"
    for split_dir in (TRAIN, P500):
        shutil.move(release / split_dir / "facemask", masks / "P3M-10k_facemask" / split_dir / "facemask")
    _zip_folder(release, zipped / "P3M-10k.zip", "P3M-10k/")
    _zip_folder(masks, zipped / "P3M-10k_facemask.zip", "")
    zip_build = builder_lib.Builder(data_dir=os.fspath(tmp_path / "from_zip"), config="default", num_workers=1)
    zip_build.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(zipped), compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )
    for split in ("train", "p3m_500_p", "p3m_500_np"):
        a = folder_build.as_data_source(split=split)
        b = zip_build.as_data_source(split=split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            ex_a, ex_b = a[i], b[i]
            assert ex_a.keys() == ex_b.keys()
            for key in ex_a:
                np.testing.assert_array_equal(ex_a[key], ex_b[key], err_msg=f"{split} {i} {key}")
    facemasks = {
        split: sum(bool(ex["has_facemask"]) for ex in zip_build.as_data_source(split=split))
        for split in ("train", "p3m_500_p", "p3m_500_np")
    }
    assert facemasks == {"train": 2, "p3m_500_p": 2, "p3m_500_np": 0}


def test_bad_file_inside_zip_is_named_with_the_archive(release, tmp_path):
    (release / TRAIN / "mask" / f"{_name(0, 1)}.png").write_bytes(b"xx")
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    _zip_folder(release, zipped / "P3M-10k.zip", "P3M-10k/")
    builder = builder_lib.Builder(data_dir=os.fspath(tmp_path / "data"), config="default", num_workers=1)
    with pytest.raises(
        release_layout.BadInputError, match=r"P3M-10k\.zip!P3M-10k/train/mask/" + _name(0, 1) + r"\.png: unreadable"
    ):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(zipped), compute_stats=tfds.download.ComputeStatsMode.SKIP
            )
        )


def test_failure_while_writing_leaves_no_dataset(release, tmp_path, monkeypatch):
    from tfds_p3m10k import encode  # pylint: disable=g-import-not-at-top

    calls = []

    def flaky(job):
        calls.append(job)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return original(job)

    original = encode.encode_record
    monkeypatch.setattr(encode, "encode_record", flaky)
    data_dir = tmp_path / "data"
    with pytest.raises(RuntimeError, match="disk on fire"):
        _build(release, data_dir)
    assert not (data_dir / "p3m10k" / "default" / "1.0.0").exists()
    assert not [d for d in os.listdir(data_dir / "p3m10k" / "default") if "incomplete" in d]
    with pytest.raises(Exception):
        tfds.data_source("p3m10k/default", split="train", data_dir=os.fspath(data_dir))


def test_killed_build_does_not_read_as_complete(release, tmp_path):
    """A process killed mid-write leaves only an `incomplete.*` folder that TFDS ignores."""
    data_dir = tmp_path / "data"
    script = textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {REPO!r})
      import tensorflow_datasets as tfds
      from tfds_p3m10k import encode, p3m10k_dataset_builder as lib
      original, calls = encode.encode_record, []
      def dying(job):
        calls.append(job)
        if len(calls) == 3:
          os._exit(9)  # like a kill: no cleanup runs
        return original(job)
      encode.encode_record = dying
      lib.Builder(data_dir={os.fspath(data_dir)!r}, config='default', num_workers=1
                  ).download_and_prepare(download_config=tfds.download.DownloadConfig(
                      manual_dir={os.fspath(release.parent)!r}))
  """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 9, result.stderr[-2000:]
    config_dir = data_dir / "p3m10k" / "default"
    assert [d for d in os.listdir(config_dir) if d.startswith("incomplete.")]
    assert not (config_dir / "1.0.0").exists()
    with pytest.raises(Exception):
        tfds.data_source("p3m10k/default", split="train", data_dir=os.fspath(data_dir))
    # A later build succeeds next to the leftover.
    builder = _build(release, data_dir)
    assert builder.info.splits["train"].num_examples == 4


def test_cli_reports_bad_input_and_builds(release, tmp_path, capsys):
    os.remove(release / NP500 / "mask" / f"{_name(2, 0)}.png")
    code = build.main([f"--release_dir={release.parent}", f"--data_dir={tmp_path / 'data'}", "--num_workers=1"])
    assert code == 1
    assert f"{_name(2, 0)}.jpg: has no mask" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # a refused build leaves no folder behind
    code = build.main(
        [f"--release_dir={release.parent}", f"--data_dir={tmp_path / 'data'}", "--num_workers=1", "--skip_bad_examples"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "train: 4, p3m_500_p: 2, p3m_500_np: 1" in out and "examples/s" in out
    assert f"skipped in p3m_500_np: 1 ({_name(2, 0)})" in out


def test_parallel_scan_of_a_zip_matches_the_inline_scan(release, tmp_path):
    """Worker processes read zip members through their own handles (not the parent's)."""
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    _zip_folder(release, zipped / "P3M-10k.zip", "P3M-10k/")
    records, problems, _ = release_layout.pair_files(release_layout.locate_release(os.fspath(zipped)))
    assert not problems
    items = [r for split in release_layout.SPLIT_NAMES for r in records[split]] * 20
    inline = list(release_layout.parallel_map(release_layout.check_record, items, 1, None))
    pooled = list(release_layout.parallel_map(release_layout.check_record, items, 2, None, inline_below=0))
    assert pooled == inline
    assert all(facts is not None and not found for facts, found in pooled)


def test_estimate_fg_bg_config_stores_estimates_for_train(release, tmp_path, monkeypatch):
    """Wiring of the estimate config; pymatting itself is swapped for a fast stand-in
    (its numba compilation takes ~30 s on first use; the real run is checked ad hoc)."""
    from tfds_p3m10k import encode  # pylint: disable=g-import-not-at-top

    calls = []

    def fake_estimate(image, alpha):
        calls.append(image.shape)
        return np.full_like(image, 200), np.full_like(image, 30)

    monkeypatch.setattr(encode, "estimate_fg_bg", fake_estimate)
    builder = builder_lib.Builder(data_dir=os.fspath(tmp_path / "data"), config="estimate_fg_bg", num_workers=1)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(release.parent), compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )
    assert len(calls) == 4  # train only
    for split in ("train", "p3m_500_p", "p3m_500_np"):
        for ex in builder.as_data_source(split=split):
            assert ex["has_fg_bg"] == (split == "train")
            if split == "train":
                assert ex["fg"].shape == ex["image"].shape
                assert np.abs(ex["fg"].astype(int) - 200).max() <= 2  # JPEG q95 of a flat image
                assert np.abs(ex["bg"].astype(int) - 30).max() <= 2
