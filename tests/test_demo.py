"""`python -m p3m_jax.demo`: the first command a user runs after installing."""

import numpy as np
from PIL import Image

from p3m_jax import demo


def test_overview_shows_image_matte_and_cutout():
    image = np.full((4, 6, 3), 200, np.uint8)
    alpha = np.zeros((4, 6), np.float32)
    alpha[:, 3:] = 1.0
    panel = demo.overview(image, alpha, square=2)
    assert panel.shape == (4, 18, 3) and panel.dtype == np.uint8
    np.testing.assert_array_equal(panel[:, :6], image)
    assert (panel[:, 6:9] == 0).all() and (panel[:, 9:12] == 255).all()  # the matte
    np.testing.assert_array_equal(panel[:, 15:], image[:, 3:])  # opaque: the person
    assert set(np.unique(panel[:, 12:15])) == {190, 230}  # transparent: the checkerboard


def test_demo_writes_its_pictures(tmp_path, capsys):
    assert demo.main(["--output", str(tmp_path), "--size", "64"]) == 0
    for name in ("image.png", "alpha_true.png", "alpha_pred.png"):
        assert np.asarray(Image.open(tmp_path / name)).shape[:2] == (64, 64)
    assert np.asarray(Image.open(tmp_path / "overview.png")).shape == (64, 192, 3)
    assert "random weights" in capsys.readouterr().out


def test_reading_a_training_workdir_shows_none_of_orbaxs_routine_lines(tmp_path, monkeypatch):
    """orbax logs three absl warnings whenever it opens a training workdir read-only: dropped while the
    weights load, and only then (other warnings still show)."""
    import logging

    from p3m_jax.inference.predictor import Predictor

    absl = logging.getLogger("absl")
    # The records are read by a handler on the absl logger itself, before any handler of the root logger.
    seen: list[str] = []
    collector = logging.Handler(logging.WARNING)
    collector.emit = lambda record: seen.append(record.getMessage())
    absl.addHandler(collector)
    monkeypatch.setattr(absl, "level", logging.WARNING)

    def load(path, arch):
        absl.warning("CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.")
        absl.warning("Given directory is read only=%s", path)
        absl.warning("Metadata file does not exist: %s", path)
        absl.warning("something else")
        return Predictor.random("resnet34", seed=0)

    monkeypatch.setattr(demo, "load_pretrained", load)
    try:
        assert demo.main(["--output", str(tmp_path), "--size", "64", "--checkpoint", "workdir"]) == 0
        absl.warning("Given directory is read only=%s", "after")
    finally:
        absl.removeHandler(collector)
    assert seen == ["something else", "Given directory is read only=after"]
