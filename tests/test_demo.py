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
