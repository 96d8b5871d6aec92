"""Tests of the synthetic portrait renderer and the trimap helper (tfds_p3m10k)."""

import cv2
import numpy as np
import pytest

from tfds_p3m10k import maps
from tfds_p3m10k import synthetic


def _render(index=0, height=96, width=80, blur_face=True):
    return synthetic.render_portrait(synthetic.sample_seed(0, 0, index), height, width, blur_face)


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b, c = _render(0), _render(0), _render(1)
    for field in ("image", "alpha", "fg", "bg", "facemask", "trimap"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.alpha, c.alpha)
    assert not np.array_equal(a.bg, c.bg)


def test_seeds_differ_across_splits_and_indices():
    seeds = {synthetic.sample_seed(0, s, i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150


def test_shapes_dtypes_and_exact_composite():
    p = _render(height=72, width=120)
    assert p.image.shape == p.fg.shape == p.bg.shape == (72, 120, 3)
    assert p.alpha.shape == p.facemask.shape == p.trimap.shape == (72, 120)
    for array in (p.image, p.alpha, p.fg, p.bg, p.facemask, p.trimap):
        assert array.dtype == np.uint8
    np.testing.assert_array_equal(p.image, synthetic.composite(p.fg, p.bg, p.alpha))
    # The composite equation itself, in floats: within rounding.
    a = p.alpha[..., None] / 255.0
    assert np.abs(a * p.fg + (1 - a) * p.bg - p.image).max() <= 0.5 + 1e-9


def test_silhouette_with_soft_edges_and_thin_partial_strands():
    for index in range(4):
        alpha = _render(index).alpha
        opaque, partial = alpha == 255, (alpha > 0) & (alpha < 255)
        assert 0.1 < opaque.mean() < 0.7
        assert partial.mean() > 0.01
        # Strands: partial alpha far (> 3 px) from any opaque pixel.
        near_opaque = cv2.dilate(opaque.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        assert (partial & ~near_opaque).sum() >= 10
        assert alpha[0].max() < 255  # the top row is background (head not cut off)


def test_facemask_is_binary_and_inside_the_opaque_head():
    for index in range(4):
        p = _render(index)
        assert set(np.unique(p.facemask)) == {0, 255}
        face = p.facemask == 255
        assert 0.01 < face.mean() < 0.2
        assert (p.alpha[face] == 255).mean() > 0.99


def test_face_blur_only_changes_the_face_region():
    sharp, blurred = _render(2, blur_face=False), _render(2, blur_face=True)
    np.testing.assert_array_equal(sharp.alpha, blurred.alpha)
    np.testing.assert_array_equal(sharp.bg, blurred.bg)
    face = blurred.facemask == 255
    far = cv2.dilate(face.astype(np.uint8), np.ones((9, 9), np.uint8)) == 0
    np.testing.assert_array_equal(sharp.fg[far], blurred.fg[far])

    def detail(fg):
        grey = cv2.cvtColor(fg, cv2.COLOR_RGB2GRAY).astype(np.float32)
        return np.abs(cv2.Laplacian(grey, cv2.CV_32F))[face].mean()

    assert detail(blurred.fg) < 0.6 * detail(sharp.fg)


def test_trimap_agrees_with_alpha():
    p = _render(3)
    assert set(np.unique(p.trimap)) == {0, 128, 255}
    assert np.all(p.alpha[p.trimap == 255] == 255)
    assert np.all(p.alpha[p.trimap == 0] == 0)
    assert np.all(p.trimap[(p.alpha > 0) & (p.alpha < 255)] == 128)


def test_too_small_size_is_rejected():
    with pytest.raises(ValueError, match="at least 16x16"):
        synthetic.render_portrait(0, 8, 64)


def test_derive_trimap_hand_computed():
    alpha = np.zeros((7, 7), np.uint8)
    alpha[2:5, 2:5] = 255
    alpha[0, 0] = 100
    # Kernel 3: the 3x3 ellipse is a cross.
    expected = np.zeros((7, 7), np.uint8)
    expected[1:6, 2:5] = 128
    expected[2:5, 1:6] = 128
    expected[0, 0] = expected[0, 1] = expected[1, 0] = 128
    expected[3, 3] = 255
    np.testing.assert_array_equal(maps.derive_trimap(alpha, 3), expected)


def test_trimap_kernel_scales_with_the_short_side():
    assert maps.trimap_kernel_size(1080, 1620) == 25
    assert maps.trimap_kernel_size(2160, 1440) == 33
    assert maps.trimap_kernel_size(64, 64) == 3
