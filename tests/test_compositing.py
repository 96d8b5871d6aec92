"""Cutouts with the person's own colours and composites over new backgrounds (`p3m_jax.inference.compositing`)."""

import numpy as np
import pytest

from p3m_jax.inference import compositing


def _scene(height=96, width=80, seed=0):
    """A soft-edged person (smooth warm colours) over a textured green background, and its exact parts."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    radius = np.hypot((yy - height * 0.55) / (height * 0.35), (xx - width / 2) / (width * 0.3))
    alpha = np.clip((1.1 - radius) * 5, 0, 1)
    fg = np.stack([200 + 30 * yy / height, 90 + 40 * xx / width, 60 + 0 * xx], -1)
    bg = np.stack([20 + 0 * xx, 160 + 60 * (yy % 8 < 4), 40 + 0 * xx], -1) + rng.integers(-15, 15, (height, width, 3))
    image = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    u8 = lambda a: np.clip(np.round(a), 0, 255).astype(np.uint8)  # noqa: E731
    return u8(image), u8(alpha * 255), u8(fg), u8(bg)


def test_the_estimated_foreground_is_closer_to_the_person_than_the_photo_at_the_edge():
    image, alpha, fg, _ = _scene()
    estimate = compositing.estimate_foreground(image, alpha)
    edge = (alpha > 25) & (alpha < 230)
    assert edge.sum() > 100
    error = lambda colours: np.abs(colours[edge].astype(float) - fg[edge]).mean()  # noqa: E731
    assert error(estimate) < 0.5 * error(image), (error(estimate), error(image))


def test_a_composite_is_alpha_times_foreground_plus_the_rest_of_the_background():
    image, alpha, fg, bg = _scene()
    a = alpha[..., None] / 255.0
    expected = np.clip(np.round(a * fg + (1 - a) * bg), 0, 255).astype(np.uint8)
    got = compositing.composite(fg, alpha, bg)
    assert np.abs(got.astype(int) - expected).max() <= 1  # float32 against float64 rounding
    white = compositing.composite(fg, alpha, (255, 255, 255))
    np.testing.assert_array_equal(white[alpha == 0], 255)
    np.testing.assert_array_equal(white[alpha == 255], fg[alpha == 255])


def test_a_background_image_is_scaled_to_cover_and_cropped_at_its_centre():
    background = np.zeros((50, 200, 3), np.uint8)
    background[:, 90:110] = 255  # a white band at the centre
    fitted = compositing.fit_background(background, 100, 100)
    assert fitted.shape == (100, 100, 3)
    assert fitted[50, 50].min() > 200 and fitted[50, 0].max() == 0  # the band stays centred, the sides are cut


@pytest.mark.parametrize(
    "text, colour",
    [("white", (255, 255, 255)), ("#00B140", (0, 177, 64)), ("0, 177, 64", (0, 177, 64)), ("photo.jpg", None)],
)
def test_colours_are_read_by_name_hex_or_numbers(text, colour):
    assert compositing.parse_colour(text) == colour
