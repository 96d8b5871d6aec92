"""The per-example training transform (p3m_jax/data/transforms.py), on hand-made and synthetic records."""

import cv2
import numpy as np
import pytest

from p3m_jax.data import decoding, morphology, transforms
from p3m_jax.data.raw_records import BadExampleError
from tfds_p3m10k import maps, synthetic


def _png(array):
    ok, data = cv2.imencode(".png", array)
    assert ok
    return data.tobytes()


def _portrait(seed=3, height=96, width=72):
    return synthetic.render_portrait(seed, height, width)


def _raw(portrait, *, name="ex", index=7, jpeg_image=False, with_fg_bg=True, with_facemask=True):
    bgr = lambda rgb: np.ascontiguousarray(rgb[..., ::-1])  # noqa: E731
    image = (
        cv2.imencode(".jpg", bgr(portrait.image), [cv2.IMWRITE_JPEG_QUALITY, 98])[1].tobytes()
        if jpeg_image
        else _png(bgr(portrait.image))
    )
    return {
        "image": image,
        "alpha": _png(portrait.alpha),
        "trimap": _png(portrait.trimap),
        "facemask": _png(portrait.facemask),
        "has_facemask": with_facemask,
        "fg": _png(bgr(portrait.fg)),
        "bg": _png(bgr(portrait.bg)),
        "has_fg_bg": with_fg_bg,
        "name": name,
        "index": index,
    }


def _transform(**kwargs):
    defaults = dict(
        image_size=32,
        crop_sizes=(32, 48, 64),
        trimap_kernel_range=(3, 6),
        transition_crop_prob=0.5,
        flip_prob=0.5,
        use_fg_bg=True,
        use_facemask=True,
        reduced_dct_decode=True,
        skip_bad_examples=False,
    )
    defaults.update(kwargs)
    return transforms.TrainTransform(**defaults)


def test_crop_inside_image_and_size_rule():
    alpha = _portrait(height=80, width=120).alpha
    rng = np.random.default_rng(0)
    sides = set()
    for _ in range(300):
        crop = transforms.sample_crop(
            alpha, rng, crop_sizes=(32, 64, 96, 128), kernel_range=(3, 6), transition_crop_prob=0.5
        )
        assert 0 <= crop.y0 and crop.y0 + crop.height <= 80
        assert 0 <= crop.x0 and crop.x0 + crop.width <= 120
        assert 3 <= crop.kernel <= 6
        sides.add((crop.height, crop.width))
    # 96 and 128 are not smaller than the short side (80): they fall back to the smallest size.
    assert sides == {(32, 32), (64, 64)}


def test_transition_centred_crops_about_half_the_time():
    alpha = _portrait().alpha
    rng = np.random.default_rng(1)
    n, on = 600, 0
    for _ in range(n):
        crop = transforms.sample_crop(
            alpha, rng, crop_sizes=(32, 48, 64), kernel_range=(3, 6), transition_crop_prob=0.5
        )
        if crop.on_transition:
            on += 1
            # Small images use the full-resolution band: the centre is an unknown pixel of the trimap.
            assert maps.derive_trimap(alpha, crop.kernel)[crop.centre] == 128
    assert 0.42 < on / n < 0.58
    # Random centres hit the band far less often than half the time, so the rule is what drives it.
    band = (maps.derive_trimap(alpha, 4) == 128).mean()
    assert band < 0.3


def test_trimap_on_crop_window_equals_full_resolution():
    alpha = _portrait(seed=5, height=120, width=90).alpha
    assert np.array_equal(transforms.elliptical_trimap(alpha, 5), maps.derive_trimap(alpha, 5))
    rng = np.random.default_rng(2)
    for _ in range(50):
        kernel = int(rng.integers(3, 16))
        full = maps.derive_trimap(alpha, kernel)
        h, w = int(rng.integers(10, 90)), int(rng.integers(10, 90))
        y0, x0 = int(rng.integers(0, 121 - h)), int(rng.integers(0, 91 - w))
        wy0, wx0 = max(0, y0 - kernel), max(0, x0 - kernel)
        window = transforms.elliptical_trimap(alpha[wy0 : y0 + h + kernel, wx0 : x0 + w + kernel], kernel)
        assert np.array_equal(window[y0 - wy0 : y0 - wy0 + h, x0 - wx0 : x0 - wx0 + w], full[y0 : y0 + h, x0 : x0 + w])


def test_output_format_and_trimap_consistent_with_alpha():
    transform = _transform()
    raw = _raw(_portrait())
    rng = np.random.default_rng(3)
    for _ in range(30):
        out = transform.random_map(raw, rng)
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
            "image": ((32, 32, 3), np.uint8),
            "alpha": ((32, 32, 1), np.uint8),
            "trimap": ((32, 32, 1), np.uint8),
            "fg": ((32, 32, 3), np.uint8),
            "bg": ((32, 32, 3), np.uint8),
            "has_fg_bg": ((), np.bool_),
            "facemask": ((32, 32, 1), np.uint8),
            "has_facemask": ((), np.bool_),
        }
        trimap, alpha = out["trimap"], out["alpha"]
        assert set(np.unique(trimap)) <= {0, 128, 255}
        # Re-quantisation bounds: a resized-trimap value < 50 (> 180) leaves < 39% (>= 41%) weight on
        # unknown/solid source pixels, so the resized alpha is bounded there.
        assert np.all(alpha[trimap == 0] <= 101)
        assert np.all(alpha[trimap == 255] >= 100)


def test_one_flip_for_every_map():
    # All maps carry the same left-right asymmetric pattern: after the transform they must still agree.
    yy, xx = np.mgrid[0:80, 0:100]
    pattern = ((xx * 2 + yy) % 256).astype(np.uint8)
    pattern[:, :30] = 255
    pattern[:, 70:] = 0
    rgb = np.repeat(pattern[..., None], 3, axis=2)
    raw = {
        "image": _png(rgb),
        "alpha": _png(pattern),
        "trimap": _png(pattern),
        "facemask": _png(pattern),
        "has_facemask": True,
        "fg": _png(rgb),
        "bg": _png(rgb),
        "has_fg_bg": True,
        "name": "p",
        "index": 0,
    }
    flips = 0
    for seed in range(20):
        out = _transform(flip_prob=0.5).random_map(raw, np.random.default_rng(seed))
        for key in ("image", "fg", "bg"):
            assert np.array_equal(out[key][..., :1], out["alpha"]) and np.array_equal(out[key][..., 1:2], out["alpha"])
        assert np.array_equal(out["facemask"], out["alpha"])
        never = _transform(flip_prob=0.0).random_map(raw, np.random.default_rng(seed))
        always = _transform(flip_prob=1.0).random_map(raw, np.random.default_rng(seed))
        for key in ("image", "alpha", "trimap", "fg", "bg", "facemask"):
            assert np.array_equal(always[key], never[key][:, ::-1]), key
        flipped = np.array_equal(out["alpha"], always["alpha"]) and not np.array_equal(out["alpha"], never["alpha"])
        flips += flipped
        for key in ("image", "trimap", "fg", "bg", "facemask"):
            assert np.array_equal(out[key], (always if flipped else never)[key]), key
    assert 4 <= flips <= 16


def test_transform_is_deterministic_given_the_rng():
    raw = _raw(_portrait())
    transform = _transform()
    a = transform.random_map(raw, np.random.default_rng(11))
    b = transform.random_map(raw, np.random.default_rng(11))
    c = transform.random_map(raw, np.random.default_rng(12))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in ("image", "alpha"))


def test_absent_maps_are_zero_and_not_decoded():
    raw = _raw(_portrait(), with_fg_bg=False, with_facemask=False)
    raw["fg"] = raw["bg"] = raw["facemask"] = b"not an image"  # would fail if decoded
    out = _transform().random_map(raw, np.random.default_rng(0))
    assert not out["has_fg_bg"] and not out["has_facemask"]
    assert not out["fg"].any() and not out["bg"].any() and not out["facemask"].any()
    out = _transform(use_fg_bg=False).random_map(_raw(_portrait()), np.random.default_rng(0))
    assert not out["has_fg_bg"] and not out["fg"].any()


def test_reduced_dct_decode_stays_aligned():
    portrait = _portrait(seed=9, height=256, width=256)
    raw = _raw(portrait, jpeg_image=True)
    crop = transforms.Crop(0, 0, 256, 256, 5, False, (0, 0))
    assert transforms.reduce_factor(crop, 32) == 8 and transforms.reduce_factor(crop, 64) == 4
    full = _transform(image_size=32, crop_sizes=(256,), reduced_dct_decode=False)
    reduced = _transform(image_size=32, crop_sizes=(256,), reduced_dct_decode=True)
    for seed in range(5):
        a = full.random_map(raw, np.random.default_rng(seed))
        b = reduced.random_map(raw, np.random.default_rng(seed))
        assert np.array_equal(a["alpha"], b["alpha"])
        diff = np.abs(a["image"].astype(int) - b["image"].astype(int))
        assert diff.mean() < 6, diff.mean()  # a shifted grid would be far off on this textured image
        # A one-output-pixel shift is clearly worse than the aligned result.
        shifted = np.abs(a["image"][:, 1:].astype(int) - b["image"][:, :-1].astype(int)).mean()
        assert shifted > 1.5 * diff.mean()


def test_jpeg_size_header():
    image = np.zeros((37, 53, 3), np.uint8)
    data = cv2.imencode(".jpg", image)[1].tobytes()
    assert decoding.jpeg_size(data) == (37, 53)
    assert decoding.jpeg_size(b"\xff\xd8\xff") is None


def test_bad_records_name_the_example():
    portrait = _portrait()
    raw = _raw(portrait, name="p_broken", index=5)
    raw["image"] = raw["image"][: len(raw["image"]) // 3]
    with pytest.raises(BadExampleError, match=r"p_broken.*record 5.*image"):
        _transform().random_map(raw, np.random.default_rng(0))
    marker = _transform(skip_bad_examples=True).random_map(raw, np.random.default_rng(0))
    assert marker[transforms.BAD] == "p_broken" and marker["index"] == 5

    small = _raw(_portrait(height=90, width=72), name="p_mismatch")
    small["alpha"] = _raw(portrait)["alpha"]  # 96x72 alpha, 90x72 image
    with pytest.raises(BadExampleError, match=r"p_mismatch.*image is 90x72 .*alpha is 96x72"):
        _transform().random_map(small, np.random.default_rng(0))
    jpeg = _raw(_portrait(height=90, width=72), name="p_mismatch_jpeg", jpeg_image=True)
    jpeg["alpha"] = small["alpha"]
    with pytest.raises(BadExampleError, match=r"p_mismatch_jpeg.*90x72"):
        _transform().random_map(jpeg, np.random.default_rng(0))
    facemask = _raw(portrait, name="p_face")
    facemask["facemask"] = _png(np.zeros((10, 10), np.uint8))
    with pytest.raises(BadExampleError, match=r"p_face.*facemask"):
        _transform().random_map(facemask, np.random.default_rng(0))
    unreadable = {"index": 3, "name": "", "error": "unreadable record: boom"}
    with pytest.raises(BadExampleError, match=r"record 3.*boom"):
        _transform().random_map(unreadable, np.random.default_rng(0))
    # The error survives pickling (grain workers send it to the main process).
    import pickle

    error = pickle.loads(pickle.dumps(BadExampleError("n", 1, "why")))
    assert (error.name, error.index, error.reason) == ("n", 1, "why") and "why" in str(error)


def test_packed_ellipse_morphology_is_opencv_bit_for_bit():
    rng = np.random.default_rng(4)
    for kernel in range(1, 41):
        element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))
        # widths on both sides of the 64-pixel word, sparse and dense masks, borders included
        for shape, density in (((37, 63), 0.01), ((50, 64), 0.3), ((29, 65), 0.05), ((41, 130), 0.7)):
            reach = (rng.random(shape) < density).astype(np.uint8)
            solid = (rng.random(shape) < 1 - density).astype(np.uint8)
            dilated, eroded = morphology.dilate_and_erode(reach, solid, kernel)
            assert np.array_equal(dilated, cv2.dilate(reach, element)), (kernel, shape)
            assert np.array_equal(eroded, cv2.erode(solid, element)), (kernel, shape)
    alpha = _portrait(seed=3, height=200, width=150).alpha
    for kernel in (15, 22, 30):
        element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))
        trimap = transforms.elliptical_trimap(alpha, kernel)
        expected = np.where(
            cv2.erode((alpha == 255).astype(np.uint8), element) > 0,
            255,
            np.where(cv2.dilate((alpha > 0).astype(np.uint8), element) > 0, 128, 0),
        )
        assert np.array_equal(trimap, expected)


def test_aligned_crops_sample_like_cv2_resize():
    rng = np.random.default_rng(6)
    array = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    crop = transforms.Crop(10, 21, 64, 80, 5, False, (0, 0))
    expected = cv2.resize(array[10:74, 21:101], (32, 32), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(transforms.warp_crop(array, crop, 32, False), expected)
    assert np.array_equal(transforms.warp_crop(array, crop, 32, True), expected[:, ::-1])
    # A window starting at `origin` (the trimap's crop-plus-margin window).
    assert np.array_equal(transforms.warp_crop(array[5:, 20:], crop, 32, False, origin=(5, 20)), expected)
    # align_crop moves the origin onto the reduced-DCT grid (factor 2 here: 64 >= 2 * 32), and only then.
    assert transforms.align_crop(crop, 64) == crop
    snapped = transforms.align_crop(crop, 32)
    assert (snapped.y0, snapped.x0, snapped.height, snapped.width) == (10, 20, 64, 80)
    reduced = cv2.resize(array, (60, 45), interpolation=cv2.INTER_AREA)
    on_grid = transforms.warp_crop(reduced, snapped, 32, False, reduce=2)
    assert np.array_equal(on_grid, cv2.resize(reduced[5:37, 10:50], (32, 32), interpolation=cv2.INTER_LINEAR))
    # Off the grid (odd crop sides) the general warpAffine path samples the same places: on a linear ramp,
    # whose 2x area reduction is exact, it matches the full-resolution resize within rounding.
    ramp = np.tile((np.arange(120) * 2).astype(np.uint8)[None, :], (90, 1))
    odd = transforms.Crop(10, 21, 65, 81, 5, False, (0, 0))
    general = transforms.warp_crop(cv2.resize(ramp, (60, 45), interpolation=cv2.INTER_AREA), odd, 32, False, reduce=2)
    full = cv2.resize(ramp[10:75, 21:102], (32, 32), interpolation=cv2.INTER_LINEAR)
    error = np.abs(general.astype(int) - full.astype(int))
    assert error.max() <= 1 and error.mean() < 0.3  # half a pixel off would be about 1 on average
