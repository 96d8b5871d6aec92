"""Tests of the predict CLI and robust image reading."""

import numpy as np
import pytest
from PIL import Image

from p3m_jax import predict
from p3m_jax.common import image_io


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from p3m_jax.inference.predictor import Predictor

    return Predictor.random("resnet34", seed=0).save(tmp_path_factory.mktemp("ckpt") / "model")


def _gradient_image(height, width):
    yy, xx = np.mgrid[:height, :width]
    return np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), np.full_like(xx, 90)], -1).astype(
        np.uint8
    )


def predict_resize(checkpoint, inputs, out, tmp_path):
    """`python -m p3m_jax.predict` with the RESIZE strategy and a cache in ``tmp_path``; its exit status."""
    return predict.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--input",
            str(inputs),
            "--output",
            str(out),
            "--strategy",
            "resize",
            "--cache_dir",
            str(tmp_path / "cache"),
        ]
    )


def test_image_loading_variants(tmp_path):
    rgb = _gradient_image(45, 67)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((45, 67), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "b.webp", lossless=True)
    np.testing.assert_array_equal(image_io.load_rgb(tmp_path / "a.png"), rgb)
    np.testing.assert_array_equal(image_io.load_rgb(tmp_path / "gray.png"), np.repeat(rgb[..., :1], 3, 2))
    np.testing.assert_array_equal(image_io.load_rgb(tmp_path / "rgba.png"), rgb)
    np.testing.assert_array_equal(image_io.load_rgb(tmp_path / "b.webp"), rgb)
    # EXIF orientation 6 (rotate 90 clockwise to display): the stored 45x67 image is read as 67x45
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif, quality=100)
    upright = image_io.load_rgb(tmp_path / "rot.jpg")
    assert upright.shape == (67, 45, 3)
    np.testing.assert_allclose(upright.astype(float), np.rot90(rgb, k=-1).astype(float), atol=12)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(image_io.ImageReadError, match="bad.jpg"):
        image_io.load_rgb(tmp_path / "bad.jpg")


def test_predict_cli_on_mixed_inputs(checkpoint, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(_gradient_image(61, 83)).save(inputs / "odd.jpg")  # odd size, not a multiple of 32
    Image.fromarray(_gradient_image(70, 50)[..., 1]).save(inputs / "gray.png")
    Image.fromarray(np.dstack([_gradient_image(33, 97), np.full((33, 97), 9, np.uint8)])).save(inputs / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 counter-clockwise
    Image.fromarray(_gradient_image(40, 72)).save(inputs / "rotated.jpg", exif=exif)
    Image.fromarray(_gradient_image(48, 64)).save(inputs / "web.webp")
    (inputs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out = tmp_path / "out"
    code = predict_resize(checkpoint, inputs, out, tmp_path)
    assert code == 1  # one file failed, the others were processed
    expected = {"odd": (61, 83), "gray": (70, 50), "rgba": (33, 97), "rotated": (72, 40), "web": (48, 64)}
    for name, shape in expected.items():
        alpha = np.asarray(Image.open(out / f"{name}_alpha.png"))
        rgba = np.asarray(Image.open(out / f"{name}_rgba.png"))
        assert alpha.shape == shape and alpha.dtype == np.uint8, name
        assert rgba.shape == shape + (4,), name
        np.testing.assert_array_equal(rgba[..., 3], alpha)
    assert not (out / "corrupt_alpha.png").exists()
    assert not list(out.glob(".tmp_*"))


def test_predict_large_image_is_downscaled_and_scaled_back(checkpoint, tmp_path):
    class Recorder:
        def __init__(self, inner):
            self.inner, self.shapes = inner, []

        def forward(self, x):
            self.shapes.append(x.shape[1:3])
            return self.inner.forward(x)

    from p3m_jax.inference.loading import load_pretrained

    recorder = Recorder(load_pretrained(checkpoint))
    path = tmp_path / "big.jpg"
    Image.fromarray(_gradient_image(1100, 1210)).save(path)
    written, failed = predict.run(recorder, [path], tmp_path / "out", strategy="resize", bucket=None, progress=False)
    assert not failed and len(written) == 1
    assert np.asarray(Image.open(written[0])).shape == (1100, 1210)
    assert recorder.shapes == [(512, 576)]  # short side 1080 first (1080 x 1188), then half size


def test_missing_input_is_reported(tmp_path, capsys, compilation_cache):
    code = predict.main(
        ["--checkpoint", str(tmp_path), "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]
    )
    assert code == 2 and "does not exist" in capsys.readouterr().err
    # Without --cache_dir the command keeps the cache folder JAX has (here JAX_COMPILATION_CACHE_DIR's).
    import jax

    assert jax.config.jax_compilation_cache_dir == compilation_cache


def test_missing_checkpoint_is_reported(tmp_path, capsys):
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    code = predict.main(
        [
            "--checkpoint",
            str(tmp_path / "nope"),
            "--input",
            str(path),
            "--output",
            str(tmp_path / "o"),
            "--cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 2 and f"no checkpoint at {tmp_path / 'nope'}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_get_the_usual_permissions(tmp_path, umask, expected):
    import os

    from p3m_jax.common import fileio

    previous = os.umask(umask)
    try:
        image_io.save_png(tmp_path / "alpha.png", np.zeros((4, 5), np.uint8))
        with fileio.atomic_write(tmp_path / "metrics.json") as handle:
            handle.write("{}")
    finally:
        os.umask(previous)
    for name in ("alpha.png", "metrics.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_bfloat16_option(checkpoint, tmp_path):
    from p3m_jax.inference.loading import load_pretrained

    full = load_pretrained(checkpoint)
    half = load_pretrained(checkpoint, dtype="bfloat16")
    x = np.random.default_rng(1).standard_normal((1, 64, 96, 3)).astype(np.float32)
    a, b = full.forward(x), half.forward(x)
    assert all(v.dtype == np.float32 for v in b.values())
    assert np.abs(a["local"] - b["local"]).mean() < 0.02  # close, but really computed in bfloat16
    assert not np.array_equal(a["local"], b["local"])
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        load_pretrained(checkpoint, dtype="float16")
    Image.fromarray(_gradient_image(64, 80)).save(tmp_path / "a.png")
    code = predict.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--input",
            str(tmp_path / "a.png"),
            "--output",
            str(tmp_path / "out"),
            "--dtype",
            "bfloat16",
            "--cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 0 and np.asarray(Image.open(tmp_path / "out" / "a_alpha.png")).shape == (64, 80)


def test_inputs_sharing_a_stem_get_their_own_outputs(checkpoint, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(_gradient_image(64, 64)).save(inputs / "portrait.jpg")
    Image.fromarray(_gradient_image(64, 64)[::-1].copy()).save(inputs / "portrait.png")
    Image.fromarray(_gradient_image(32, 64)).save(inputs / "solo.png")
    out = tmp_path / "out"
    code = predict_resize(checkpoint, inputs, out, tmp_path)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "portrait.jpg_alpha.png",
        "portrait.jpg_rgba.png",
        "portrait.png_alpha.png",
        "portrait.png_rgba.png",
        "solo_alpha.png",
        "solo_rgba.png",
    ]
    err = capsys.readouterr().err
    assert "share a stem" in err and "portrait.jpg, portrait.png" in err


def test_unwritable_output_is_reported_before_the_model_loads(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    # The checkpoint does not exist either: the output folder is checked first.
    code = predict.main(
        [
            "--checkpoint",
            str(tmp_path / "nope"),
            "--input",
            str(image),
            "--output",
            str(blocker / "out"),
            "--cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"error: output folder {blocker / 'out'} is not writable" in err


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody can write to: a read-only bind mount as root (root ignores permissions)."""
    import os
    import subprocess

    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only folder here (root without mount)")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot make a read-only folder here (no read-only remount)")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_output_folder_is_reported_at_once(checkpoint, tmp_path, read_only_folder, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    code = predict.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--input",
            str(image),
            "--output",
            str(read_only_folder),
            "--cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"output folder {read_only_folder} is not writable" in err


def test_nothing_is_created_when_every_input_fails(checkpoint, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out = tmp_path / "out"
    assert predict_resize(checkpoint, inputs, out, tmp_path) == 1 and not out.exists()


def test_a_failed_write_leaves_neither_file_of_the_pair(checkpoint, tmp_path, monkeypatch):
    from p3m_jax.inference.loading import load_pretrained

    Image.fromarray(_gradient_image(64, 64)).save(tmp_path / "a.png")
    save_png = image_io.save_png

    def failing(path, array):
        if str(path).endswith("_rgba.png"):
            raise OSError(28, "No space left on device")
        save_png(path, array)

    monkeypatch.setattr(image_io, "save_png", failing)
    out = tmp_path / "out"
    written, failed = predict.run(load_pretrained(checkpoint), [tmp_path / "a.png"], out, "resize", progress=False)
    assert written == [] and len(failed) == 1 and "No space left" in failed[0][1]
    assert not out.exists()  # created by this run, left empty: removed


def test_a_folder_shares_padded_sizes_and_one_image_runs_at_its_exact_size(checkpoint, tmp_path, monkeypatch, capsys):
    shapes = []

    class RecordingRunner(predict.strategies.NetworkRunner):
        def __call__(self, x, outputs=None):
            shapes.append(self.network_shape(*x.shape[:2]))
            return super().__call__(x, outputs)

    monkeypatch.setattr(predict.strategies, "NetworkRunner", RecordingRunner)
    folder = tmp_path / "in"
    folder.mkdir()
    for width in (161, 170, 181):  # nearly equal sizes
        Image.fromarray(_gradient_image(64, width)).save(folder / f"w{width}.png")
    assert predict_resize(checkpoint, folder, tmp_path / "out", tmp_path) == 0
    assert len(shapes) == 3 and len(set(shapes)) == 1  # one padded size (multiples of 128): one compilation
    assert all(h % predict.strategies.BUCKET == 0 and w % predict.strategies.BUCKET == 0 for h, w in shapes)
    assert f"loaded resnet34 (float32) from model checkpoint {checkpoint}" in capsys.readouterr().out

    shapes.clear()
    assert predict_resize(checkpoint, folder / "w161.png", tmp_path / "one", tmp_path) == 0
    assert len(shapes) == 1 and shapes[0][1] % predict.strategies.BUCKET != 0  # not padded to the bucket
