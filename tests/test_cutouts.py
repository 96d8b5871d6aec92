"""The colours `python -m p3m_jax.predict` writes: `--foreground estimate` puts the estimated foreground
(not the photo's own colours, and in RGB order) into `<name>_rgba.png`, and `--background white|IMAGE`
composites it as `alpha * foreground + (1 - alpha) * background` into `<name>_composite.png`.

The network is the small stand-in (`tests/train_helpers.py`) with weights set so that its matte is soft
everywhere: its `global` head says "unknown" at every pixel, so the fusion is the `local` head, whose
last layer is scaled up so that its alpha spreads over most of (0, 1). The command runs unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from p3m_jax import predict
from p3m_jax.inference import compositing
from train_helpers import TinyP3M

HEIGHT, WIDTH = 96, 80


def _photo() -> np.ndarray:
    """A portrait-like photo: a warm figure over a cool gradient, with noise; red, green and blue differ."""
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    radius = np.hypot((yy - HEIGHT * 0.55) / (HEIGHT * 0.35), (xx - WIDTH / 2) / (WIDTH * 0.3))
    alpha = np.clip((1.1 - radius) * 3, 0, 1)[..., None]
    background = np.stack([40 + xx * 150 // WIDTH, 200 - yy * 100 // HEIGHT, np.full_like(xx, 60)], -1)
    person = np.stack([np.full_like(xx, 220), 120 + yy * 60 // HEIGHT, 30 + xx * 100 // WIDTH], -1)
    noise = np.random.default_rng(0).normal(0, 4, (HEIGHT, WIDTH, 3))
    return np.clip(np.round(alpha * person + (1 - alpha) * background + noise), 0, 255).astype(np.uint8)


def _background() -> np.ndarray:
    """A new background of the photo's size (so it is used as it is, not fitted): stripes, channels apart."""
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    return np.stack([(xx * 7) % 256, np.full_like(xx, 30), 255 - (yy * 5) % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def soft_checkpoint(tiny_model, tmp_path_factory):
    """A stand-in checkpoint whose matte is soft: `global` is "unknown" everywhere (kernel 0, bias
    favouring class 1), and `local`'s last convolution is 20x its initial one (alpha from ~0.07 to ~0.98)."""
    from p3m_jax.inference.predictor import Predictor

    variables = jax.tree_util.tree_map(
        np.asarray, TinyP3M().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    params = variables["params"]
    params["global"]["kernel"] = np.zeros_like(params["global"]["kernel"])
    params["global"]["bias"] = np.array([0.0, 10.0, 0.0], np.float32)
    params["local1"]["kernel"] = params["local1"]["kernel"] * 20
    return Predictor("resnet34", variables).save(tmp_path_factory.mktemp("soft") / "model")


def _predict(checkpoint, photo_path, out, background: str) -> dict:
    """Runs the command with the estimated foreground over ``background``; its three files as arrays."""
    argv = ["--checkpoint", str(checkpoint), "--input", str(photo_path), "--output", str(out)]
    argv += ["--strategy", "resize", "--cache_dir", "", "--foreground", "estimate", "--background", background]
    assert predict.main(argv) == 0
    return {kind: np.asarray(Image.open(out / f"photo_{kind}.png")) for kind in ("alpha", "rgba", "composite")}


@pytest.fixture(scope="module")
def cutouts(soft_checkpoint, tmp_path_factory):
    """The photo, the new background, and predict's files over white and over that background."""
    folder = tmp_path_factory.mktemp("cutouts")
    photo, background = _photo(), _background()
    Image.fromarray(photo).save(folder / "photo.png")
    Image.fromarray(background).save(folder / "background.png")
    return {
        "photo": photo,
        "background": background,
        "white": _predict(soft_checkpoint, folder / "photo.png", folder / "white", "white"),
        "image": _predict(soft_checkpoint, folder / "photo.png", folder / "image", str(folder / "background.png")),
    }


def check_cutout(photo, files, background) -> None:
    """The checks of a cutout: RGBA = (estimated foreground, alpha); composite = the alpha-composite of
    that foreground over ``background`` (H, W, 3) where 0 < alpha < 1, and the background where alpha is 0."""
    alpha, rgba, composite = files["alpha"], files["rgba"], files["composite"]
    np.testing.assert_array_equal(rgba[..., 3], alpha)
    np.testing.assert_array_equal(rgba[..., :3], compositing.estimate_foreground(photo, alpha), err_msg="rgba")
    soft = (alpha > 0) & (alpha < 255)
    a = alpha[soft].astype(np.float64)[:, None] / 255
    expected = a * rgba[..., :3][soft] + (1 - a) * background[soft]
    np.testing.assert_allclose(composite[soft], expected, atol=1, err_msg="composite")  # 1: rounding
    np.testing.assert_array_equal(composite[alpha == 0], background[alpha == 0])


def test_the_matte_is_soft_and_the_estimate_differs_from_the_photo_and_from_bgr(cutouts):
    """What makes the checks below bite: most of the matte is strictly between 0 and 1, and there the
    estimate is far from the photo's own colours and from itself with red and blue swapped."""
    alpha = cutouts["white"]["alpha"]
    soft = (alpha > 0) & (alpha < 255)
    assert soft.mean() > 0.9, soft.mean()
    estimate = compositing.estimate_foreground(cutouts["photo"], alpha).astype(int)
    assert (np.abs(estimate - cutouts["photo"]).max(-1)[soft] > 8).mean() > 0.3
    assert (np.abs(estimate[..., 0] - estimate[..., 2])[soft] > 8).mean() > 0.5
    np.testing.assert_array_equal(cutouts["image"]["alpha"], alpha)  # the same matte for both backgrounds


@pytest.mark.parametrize("background", ["white", "image"])
def test_predict_writes_the_estimated_foreground_and_composites_it(cutouts, background):
    colour = np.full((HEIGHT, WIDTH, 3), 255, np.uint8) if background == "white" else cutouts["background"]
    check_cutout(cutouts["photo"], cutouts[background], colour)


@pytest.mark.parametrize("broken", ["photo colours", "bgr"])
def test_the_checks_fail_on_a_cutout_of_the_photos_own_colours_or_in_bgr(cutouts, broken):
    """The files a broken command would write (the photo's colours instead of the estimate, or the
    estimate with red and blue swapped) fail both the RGBA check and the composite check."""
    photo, background, alpha = cutouts["photo"], cutouts["background"], cutouts["image"]["alpha"]
    good = cutouts["image"]["rgba"][..., :3]
    colours = photo if broken == "photo colours" else good[..., ::-1]
    rgba = np.dstack([colours, alpha])
    composite = compositing.composite(colours, alpha, background)
    with pytest.raises(AssertionError, match="rgba"):
        check_cutout(photo, {"alpha": alpha, "rgba": rgba, "composite": composite}, background)
    # With the right RGBA but the broken composite, the composite check fails on its own.
    with pytest.raises(AssertionError, match="composite"):
        check_cutout(photo, {**cutouts["image"], "composite": composite}, background)
