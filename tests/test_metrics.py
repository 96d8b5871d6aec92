"""Tests of p3m_jax.evaluation.metrics against the authors' reference values and plain NumPy/SciPy/scikit-image versions."""

import json
import pathlib

import numpy as np
import pytest
from scipy import ndimage

from p3m_jax.evaluation.metrics import METRIC_KEYS, PRIVACY_KEYS, largest_component, matting_metrics

DATA = pathlib.Path(__file__).parent / "data"


def _reference_cases():
    vectors = np.load(DATA / "reference_vectors.npz")
    cases = json.loads((DATA / "reference_values.json").read_text())["cases"]
    for case in cases:
        i = case["case"]
        yield (
            vectors[f"case{i}_pred_alpha_u8"].astype(np.float32) / 255.0,
            vectors[f"case{i}_gt_alpha_u8"].astype(np.float32) / 255.0,
            vectors[f"case{i}_trimap_u8"],
            case["metrics"],
        )


def _blobs(rng, shape, sigma=3.0):
    """A smooth random field in [0, 1] quantized to 8 bits: blob-like threshold sets with many components."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    field = (field - field.min()) / (field.max() - field.min())
    return np.round(field * 255).astype(np.float32) / 255.0


def _numpy_connectivity(pred, gt):
    """Conn of docs/design.md section 6 with scikit-image labelling (written from the definition, per image)."""
    from skimage.measure import label

    level = np.full(pred.shape, -1.0, np.float32)
    steps = np.arange(0, 1.1, 0.1)
    for i in range(1, len(steps)):
        both = (pred >= steps[i]) & (gt >= steps[i])
        labels = label(both, connectivity=1)
        if labels.max() == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        component = labels == (np.argmax(sizes) + 1)  # labels are in raster order, argmax takes the first
        level[(level == -1) & ~component] = steps[i - 1]
    level[level == -1] = 1
    d_pred, d_gt = pred - level, gt - level
    phi_pred = 1 - d_pred * (d_pred >= 0.15)
    phi_gt = 1 - d_gt * (d_gt >= 0.15)
    return np.sum(np.abs(phi_pred - phi_gt)) / 1000


def _scipy_grad(pred, gt):
    def magnitude(x):
        gx = ndimage.gaussian_filter(x, 1.4, order=[1, 0], output=np.float32)
        gy = ndimage.gaussian_filter(x, 1.4, order=[0, 1], output=np.float32)
        return np.sqrt(gx.astype(np.float64) ** 2 + gy.astype(np.float64) ** 2)

    return np.sum((magnitude(pred) - magnitude(gt)) ** 2) / 10


@pytest.mark.parametrize("case", list(_reference_cases()), ids=["case0", "case1", "case2"])
def test_reference_values(case):
    pred, gt, trimap, expected = case
    got = matting_metrics(pred, gt, trimap)
    for key in METRIC_KEYS:
        np.testing.assert_allclose(float(got[key]), expected[key], rtol=1e-5, atol=1e-9, err_msg=key)


def test_identical_mattes_score_zero():
    rng = np.random.default_rng(0)
    alpha = np.clip(_blobs(rng, (40, 56)) * 1.5 - 0.25, 0, 1)
    # a trimap consistent with the matte (the trimap metrics force p to 1 / 0 where it says 255 / 0)
    trimap = np.where(alpha == 1, 255, np.where(alpha == 0, 0, 128)).astype(np.uint8)
    facemask = np.zeros_like(trimap)
    facemask[5:20, 10:30] = 255
    got = matting_metrics(alpha, alpha, trimap, facemask=facemask)
    assert set(got) == set(METRIC_KEYS) | set(PRIVACY_KEYS)
    for key, value in got.items():
        assert float(value) == 0.0, key


def test_batch_and_single_agree_and_uint8_input():
    rng = np.random.default_rng(1)
    gts = [_blobs(rng, (48, 40)) for _ in range(3)]
    preds = [np.clip(g + rng.normal(0, 0.1, g.shape), 0, 1).astype(np.float32) for g in gts]
    trimaps = [np.where(g > 0.8, 255, np.where(g < 0.2, 0, 128)).astype(np.uint8) for g in gts]
    batch = matting_metrics(np.stack(preds), np.stack(gts), np.stack(trimaps)[..., None][..., 0])
    for i in range(3):
        single = matting_metrics(preds[i], gts[i], trimaps[i])
        for key in METRIC_KEYS:
            np.testing.assert_allclose(float(batch[key][i]), float(single[key]), rtol=1e-6, err_msg=key)
    # uint8 mattes are read as value / 255
    as_u8 = matting_metrics(
        np.round(preds[0] * 255).astype(np.uint8), np.round(gts[0] * 255).astype(np.uint8), trimaps[0]
    )
    quantized = matting_metrics(np.round(preds[0] * 255) / 255, gts[0], trimaps[0])
    for key in METRIC_KEYS:
        np.testing.assert_allclose(float(as_u8[key]), float(quantized[key]), rtol=1e-6, err_msg=key)


def test_connectivity_against_scikit_image_on_random_blobs():
    rng = np.random.default_rng(2)
    shape = (64, 72)
    preds = np.stack([_blobs(rng, shape, sigma) for sigma in (1.5, 2.5, 4.0, 2.0)])
    gts = np.stack([_blobs(rng, shape, sigma) for sigma in (2.0, 1.5, 3.0, 2.0)])
    gts[3] = preds[3]  # one pair whose threshold sets coincide
    trimap = np.full(preds.shape, 128, np.uint8)
    got = matting_metrics(preds, gts, trimap)["CONN"]
    for i in range(len(preds)):
        expected = _numpy_connectivity(preds[i], gts[i])
        np.testing.assert_allclose(float(got[i]), expected, rtol=1e-5, err_msg=f"pair {i}")


def test_largest_component_matches_scikit_image_and_breaks_ties_in_raster_order():
    from skimage.measure import label

    rng = np.random.default_rng(3)
    masks = rng.random((6, 33, 47)) < np.array([0.3, 0.45, 0.55, 0.6, 0.7, 0.0])[:, None, None]
    component, non_empty = largest_component(masks)
    for i, mask in enumerate(masks):
        labels = label(mask, connectivity=1)
        if labels.max() == 0:
            assert not non_empty[i] and not np.asarray(component[i]).any()
            continue
        expected = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
        np.testing.assert_array_equal(np.asarray(component[i]), expected)
    # two equal squares and a diagonal (not 4-connected) neighbour: the first square in raster order wins
    tie = np.zeros((1, 12, 12), bool)
    tie[0, 6:9, 1:4] = True
    tie[0, 1:4, 7:10] = True
    tie[0, 4, 10] = True  # touches the second square only diagonally
    component, _ = largest_component(tie)
    expected = np.zeros_like(tie)
    expected[0, 1:4, 7:10] = True
    np.testing.assert_array_equal(np.asarray(component), expected)


@pytest.mark.parametrize("shape", [(50, 61), (5, 9)])  # (5, 9): smaller than the filter radius 6
def test_gradient_against_scipy(shape):
    rng = np.random.default_rng(4)
    pred = rng.random(shape).astype(np.float32)
    gt = _blobs(rng, shape, 1.0)
    trimap = np.full(shape, 128, np.uint8)
    got = float(matting_metrics(pred, gt, trimap)["GRAD"])
    np.testing.assert_allclose(got, _scipy_grad(pred, gt), rtol=1e-5)


def test_padded_batch_with_sizes_equals_unpadded():
    """Bucketed evaluation: metrics of a padded image with its size equal those of the image itself."""
    rng = np.random.default_rng(5)
    gt = _blobs(rng, (37, 45))
    pred = np.clip(gt + rng.normal(0, 0.2, gt.shape), 0, 1).astype(np.float32)
    trimap = np.where(gt > 0.8, 255, np.where(gt < 0.2, 0, 128)).astype(np.uint8)
    facemask = np.zeros_like(trimap)
    facemask[3:12, 4:20] = 1
    exact = matting_metrics(pred, gt, trimap, facemask=facemask)

    def pad(x, value):
        out = np.full((2, 48, 64), value, x.dtype)
        out[:, : x.shape[0], : x.shape[1]] = x
        return out

    # the padding holds values that would change every metric if they were counted
    padded = matting_metrics(
        pad(pred, 1.0), pad(gt, 0.0), pad(trimap, 128), facemask=pad(facemask, 1), sizes=[[37, 45], [37, 45]]
    )
    for key in exact:
        np.testing.assert_allclose(np.asarray(padded[key]), float(exact[key]), rtol=2e-6, err_msg=key)


def test_privacy_group():
    gt = np.zeros((20, 30), np.float32)
    pred = np.zeros_like(gt)
    pred[2:6, 3:8] = 0.5  # 20 pixels inside the face region, error 0.5
    pred[15, 20] = 1.0  # outside
    facemask = np.zeros((20, 30), np.uint8)
    facemask[0:10, 0:10] = 255  # 100 pixels
    trimap = np.zeros((20, 30), np.uint8)
    got = matting_metrics(pred, gt, trimap, facemask=facemask)
    np.testing.assert_allclose(float(got["SAD_PRIVACY"]), 10.0 / 1000, rtol=1e-6)
    np.testing.assert_allclose(float(got["MAD_PRIVACY"]), 10.0 / 100, rtol=1e-6)
    np.testing.assert_allclose(float(got["MSE_PRIVACY"]), 5.0 / 100, rtol=1e-6)
    empty = matting_metrics(pred, gt, trimap, facemask=np.zeros_like(facemask))
    assert all(np.isnan(float(empty[k])) for k in PRIVACY_KEYS)
    # a trimap without unknown pixels: MSE_T / MAD_T are defined as 0 (the authors divide by zero)
    assert float(got["MSE_T"]) == 0.0 and float(got["MAD_T"]) == 0.0


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="shape mismatch"):
        matting_metrics(np.zeros((8, 8)), np.zeros((8, 9)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="pred"):
        matting_metrics(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)))


def _snake(height, width):
    """One 4-connected snake: every other row filled, joined alternately at the right and the left end."""
    mask = np.zeros((height, width), bool)
    mask[::2] = True
    for row in range(1, height, 2):
        mask[row, width - 1 if row % 4 == 1 else 0] = True
    return mask


def _spiral(size):
    """A one-pixel-wide square spiral (walls two pixels apart): long, with a turn every few pixels."""
    mask = np.zeros((size, size), bool)
    top, left, bottom, right = 0, 0, size - 1, size - 1
    while top <= bottom and left <= right:
        mask[top, left : right + 1] = True
        mask[top : bottom + 1, right] = True
        if top + 2 <= bottom:
            mask[bottom, left : right + 1] = True
        if left + 2 <= right:
            mask[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            mask[top, left - 1] = True  # joins the next, inner ring to this one
    return mask


def test_largest_component_of_long_snakes_and_full_images():
    """Components whose labels must travel far and turn often, one covering every pixel, and odd widths."""
    from skimage.measure import label

    snake = _snake(63, 63)
    spiral = _spiral(63)
    full = np.ones((63, 63), bool)
    # a snake with a block of noise cut into it: the snake breaks into pieces of different sizes
    broken = _snake(63, 63)
    broken[20:23, 10:40] = np.random.default_rng(6).random((3, 30)) < 0.5
    masks = np.stack([snake, spiral, full, broken, ~spiral])
    component, non_empty = largest_component(masks)
    assert np.asarray(non_empty).all()
    for i, mask in enumerate(masks):
        labels = label(mask, connectivity=1)
        expected = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
        np.testing.assert_array_equal(np.asarray(component[i]), expected, err_msg=f"mask {i}")
    assert label(spiral, connectivity=1).max() == 1  # the spiral is one component
    np.testing.assert_array_equal(np.asarray(component[0]), snake)
    np.testing.assert_array_equal(np.asarray(component[2]), full)


def test_largest_component_tie_between_components_starting_at_odd_columns():
    # pixels are labelled in horizontal pairs: components starting in the right pixel of a pair keep raster order
    tie = np.zeros((1, 4, 9), bool)
    tie[0, 1, 1:3] = True  # starts at column 1 (right pixel of pair 0), 3 pixels
    tie[0, 2, 2] = True
    tie[0, 0, 4:7] = True  # first in raster order, 3 pixels: wins the tie
    tie[0, 3, 7:9] = True  # 2 pixels
    component, _ = largest_component(tie)
    expected = np.zeros_like(tie)
    expected[0, 0, 4:7] = True
    np.testing.assert_array_equal(np.asarray(component), expected)


def test_padded_batch_with_an_image_smaller_than_the_filter_radius():
    """Bucketed Grad: sizes below the Gaussian radius (6) take the gather path, the others shifted slices."""
    rng = np.random.default_rng(7)
    images = [
        (rng.random((37, 45)).astype(np.float32), _blobs(rng, (37, 45), 1.0)),
        (rng.random((4, 11)).astype(np.float32), _blobs(rng, (4, 11), 1.0)),
    ]
    pred = np.ones((2, 40, 48), np.float32)
    gt = np.zeros((2, 40, 48), np.float32)
    for i, (p, g) in enumerate(images):
        pred[i, : p.shape[0], : p.shape[1]] = p
        gt[i, : g.shape[0], : g.shape[1]] = g
    trimap = np.full(pred.shape, 128, np.uint8)
    got = matting_metrics(pred, gt, trimap, sizes=[[37, 45], [4, 11]])
    for i, (p, g) in enumerate(images):
        np.testing.assert_allclose(float(got["GRAD"][i]), _scipy_grad(p, g), rtol=1e-5, err_msg=f"image {i}")
        np.testing.assert_allclose(float(got["CONN"][i]), _numpy_connectivity(p, g), rtol=1e-5, err_msg=f"image {i}")
    # without the tiny image, the whole batch takes the shifted-slice path: same value for the first image
    alone = matting_metrics(pred[:1], gt[:1], trimap[:1], sizes=[[37, 45]])
    np.testing.assert_allclose(float(alone["GRAD"][0]), float(got["GRAD"][0]), rtol=1e-6)
