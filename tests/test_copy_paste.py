"""P3M-CP: face sources, image-level copy and paste (ICP), feature-level copy and paste (FCP)."""

import dataclasses
import os
import pickle

import cv2
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p3m_jax.common.errors import ConfigError
from p3m_jax.configs.default import get_config
from p3m_jax.data.cp_transforms import (
    CopyPasteOptions,
    FeatureCopyPasteInputs,
    ImageCopyPaste,
    aligned_source,
    make_copy_paste_transforms,
    paste_face,
    place_face,
)
from p3m_jax.data.faces import CelebAMaskHQFaces, FaceSourceError, PairedFaces, SyntheticFaces, open_face_source
from p3m_jax.models.fcp import FCP_LAYERS, fcp_inputs, mask_at, replace_features
from p3m_jax.models.decoder import EncoderOutput
from tfds_p3m10k import synthetic

S = 64


def make_example(seed, facemask=True):
    """A training-size example as the pipeline hands it to the copy-paste transforms."""
    p = synthetic.render_portrait(seed, S, S)
    fm = p.facemask if facemask else np.zeros_like(p.facemask)
    return {
        "image": p.image,
        "alpha": p.alpha[..., None],
        "trimap": p.trimap[..., None],
        "fg": p.fg,
        "bg": p.bg,
        "has_fg_bg": np.bool_(True),
        "facemask": fm[..., None],
        "has_facemask": np.bool_(facemask),
        "name": f"p_{seed}",
    }


FACES = SyntheticFaces(count=8, size=48, seed=3)
SOURCE_SIZES = dict(num_synthetic_faces=4, synthetic_face_size=32, seed=0)  # unused by folder sources
ICP = CopyPasteOptions.from_config("icp", get_config().copy_paste.icp)  # the recipe's (the paper's) numbers
FCP = CopyPasteOptions.from_config("fcp", get_config().copy_paste.fcp)
AUGMENT = ICP.augment()


def with_prob(options, prob):
    return dataclasses.replace(options, prob=prob)


# ---------------------------------------------------------------- face sources


def test_synthetic_faces_are_sharp_normal_faces():
    assert len(FACES) == 8
    a, b = FACES[2], FACES[2]
    np.testing.assert_array_equal(a["image"], b["image"])  # pure function of (seed, index)
    assert a["image"].shape == (48, 48, 3) and a["image"].dtype == np.uint8
    assert a["mask"].shape == (48, 48) and set(np.unique(a["mask"])) == {0, 255}
    assert not np.array_equal(FACES[0]["image"], FACES[1]["image"])
    # Sharp detail inside the face: blurring it loses a lot of Laplacian energy.
    gray = cv2.cvtColor(a["image"], cv2.COLOR_RGB2GRAY).astype(np.float32)
    inside = a["mask"] > 0
    sharp = np.abs(cv2.Laplacian(gray, cv2.CV_32F))[inside].mean()
    blurred = np.abs(cv2.Laplacian(cv2.GaussianBlur(gray, (0, 0), 1.5), cv2.CV_32F))[inside].mean()
    assert sharp > 2 * blurred
    with pytest.raises(IndexError):
        FACES[8]


def _write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), array)


def test_celebamask_hq_layout_union_of_face_parts(tmp_path):
    rng = np.random.default_rng(0)
    for i in (0, 1):
        _write(tmp_path / "CelebA-HQ-img" / f"{i}.png", rng.integers(0, 255, (32, 32, 3), np.uint8))
        skin = np.zeros((16, 16), np.uint8)
        skin[4:12, 4:10] = 255
        nose = np.zeros((16, 16), np.uint8)
        nose[6:8, 10:13] = 255
        hair = np.full((16, 16), 255, np.uint8)  # not a face part: ignored
        for part, m in (("skin", skin), ("nose", nose), ("hair", hair)):
            _write(tmp_path / "CelebAMask-HQ-mask-anno" / "0" / f"{i:05d}_{part}.png", m)
    faces = CelebAMaskHQFaces(str(tmp_path), reduce=1)
    assert len(faces) == 2
    face = faces[1]
    assert face["image"].shape == (32, 32, 3)
    expected = cv2.resize(np.maximum(skin, nose), (32, 32), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(face["mask"], expected)
    assert len(open_face_source(str(tmp_path), "celebamask_hq", **SOURCE_SIZES)) == 2


def test_celebamask_hq_missing_files_are_named(tmp_path):
    _write(tmp_path / "CelebA-HQ-img" / "0.png", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / "CelebA-HQ-img" / "7.png", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / "CelebAMask-HQ-mask-anno" / "0" / "00000_skin.png", np.zeros((8, 8), np.uint8))
    _write(tmp_path / "CelebAMask-HQ-mask-anno" / "0" / "00003_nose.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(FaceSourceError) as error:
        CelebAMaskHQFaces(str(tmp_path))
    assert "7.png" in str(error.value) and "00003_nose.png" in str(error.value)
    assert "0.png" not in str(error.value).replace("00000", "")
    with pytest.raises(FaceSourceError, match="not found"):
        CelebAMaskHQFaces(str(tmp_path / "nowhere"))


def test_paired_faces_and_unpaired_files_are_named(tmp_path):
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 6:14] = 200
    for stem in ("a", "b"):
        _write(tmp_path / "ok" / "images" / f"{stem}.jpg", np.full((40, 40, 3), 90, np.uint8))
        _write(tmp_path / "ok" / "masks" / f"{stem}.png", mask)
    faces = open_face_source(str(tmp_path / "ok"), "pair", **SOURCE_SIZES)
    assert isinstance(faces, PairedFaces) and len(faces) == 2
    face = faces[0]
    assert face["image"].shape == (40, 40, 3) and face["mask"].shape == (40, 40)
    assert set(np.unique(face["mask"])) == {0, 255} and (face["mask"] > 0).sum() == 20 * 16

    _write(tmp_path / "bad" / "images" / "lonely.jpg", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / "bad" / "images" / "c.jpg", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / "bad" / "masks" / "c.png", mask)
    _write(tmp_path / "bad" / "masks" / "orphan.png", mask)
    with pytest.raises(FaceSourceError) as error:
        PairedFaces(str(tmp_path / "bad"))
    assert "lonely.jpg" in str(error.value) and "orphan.png" in str(error.value)


# ---------------------------------------------------------------- ICP


def _changed(a, b):
    keys = ("image", "alpha", "trimap", "fg", "bg")
    return np.any(np.stack([np.any(a[k] != b[k], axis=-1) for k in keys]), axis=0)


def test_icp_changes_only_the_target_facemask_and_stays_consistent():
    pasted_any = 0
    for seed in range(12):
        ex = make_example(seed)
        face = FACES[seed % len(FACES)]
        out, pasted = paste_face(ex, face["image"], face["mask"], np.random.default_rng(seed), **AUGMENT)
        assert pasted
        changed = _changed(ex, out)
        inside = ex["facemask"][..., 0] >= 128
        assert changed.any() and not (changed & ~inside).any()
        pasted_any += changed.sum()
        np.testing.assert_array_equal(out["bg"], ex["bg"])
        np.testing.assert_array_equal(out["facemask"], ex["facemask"])
        # The face is foreground: alpha never drops; trimap stays a valid trimap of alpha.
        assert (out["alpha"] >= ex["alpha"]).all()
        assert set(np.unique(out["trimap"])) <= {0, 128, 255}
        assert (out["alpha"][out["trimap"] == 255] == 255).all()
        assert (out["alpha"][out["trimap"] == 0] == 0).all()
        # Compositing still reproduces the image (the inputs compose exactly in uint8).
        a = out["alpha"].astype(np.float64) / 255
        comp = a * out["fg"] + (1 - a) * out["bg"]
        assert np.abs(comp - out["image"]).max() <= 2.0
    assert pasted_any > 12 * 50


def test_icp_alignment_on_the_facemask_centre():
    ex = make_example(0)
    fm = np.zeros((S, S, 1), np.uint8)
    fm[10:40, 20:44] = 255  # a box-shaped target face region, centre (y, x) = (24.5, 31.5)
    ex["facemask"] = fm
    face_mask = np.zeros((48, 48), np.uint8)
    cv2.ellipse(face_mask, (24, 24), (12, 18), 0, 0, 360, 255, -1)
    face_image = np.full((48, 48, 3), 200, np.uint8)
    for scale in (0.8, 1.0):
        placed = place_face(
            fm,
            face_image,
            face_mask,
            np.random.default_rng(0),
            rotation_deg=0,
            scale_range=(scale, scale),
            flip_prob=0.0,
            keep_aspect=False,
        )
        _, weight = placed
        ys, xs = np.nonzero(weight > 0.5)
        assert abs(ys.mean() - 24.5) < 0.6 and abs(xs.mean() - 31.5) < 0.6
        # Scaled to fill the box: the face spans ~scale x the box's sides.
        assert abs((ys.max() - ys.min() + 1) - 30 * scale) <= 2
        assert abs((xs.max() - xs.min() + 1) - 24 * scale) <= 2


def test_icp_leaves_examples_without_facemask_untouched():
    ex = make_example(1, facemask=False)
    face = FACES[0]
    out, pasted = paste_face(ex, face["image"], face["mask"], np.random.default_rng(0), **AUGMENT)
    assert out is ex and not pasted
    transform = ImageCopyPaste(FACES, with_prob(ICP, 1.0))
    out = transform.random_map(ex, np.random.default_rng(0))
    assert not out["icp_pasted"]
    for key in ex:
        np.testing.assert_array_equal(out[key], ex[key])
    # A facemask flag with an empty mask (face cropped away) is not pasted either.
    ex = make_example(1)
    ex["facemask"] = np.zeros_like(ex["facemask"])
    assert not transform.random_map(ex, np.random.default_rng(0))["icp_pasted"]


def test_icp_frequency_matches_prob():
    examples = [make_example(i) for i in range(8)]
    n = 400
    for prob in (0.0, 0.5, 1.0):
        transform = ImageCopyPaste(FACES, with_prob(ICP, prob))
        rng = np.random.default_rng(123)
        count = sum(bool(transform.random_map(examples[i % 8], rng)["icp_pasted"]) for i in range(n))
        tolerance = 4.5 * np.sqrt(n * prob * (1 - prob))  # binomial, ~1e-5 false-failure rate
        assert abs(count - n * prob) <= tolerance, (prob, count)


def test_icp_and_fcp_transforms_in_grain():
    examples = [make_example(i) for i in range(6)] + [make_example(6, facemask=False)]
    icp = ImageCopyPaste(FACES, with_prob(ICP, 1.0))
    fcp = pickle.loads(pickle.dumps(FeatureCopyPasteInputs(FACES, with_prob(FCP, 1.0))))  # worker-safe
    ds = grain.MapDataset.source(examples).seed(5).random_map(icp).random_map(fcp)
    outs = [ds[i] for i in range(len(examples))]
    again = [ds[i] for i in range(len(examples))]
    for out, out2, ex in zip(outs, again, examples):
        np.testing.assert_array_equal(out["image"], out2["image"])  # deterministic per index
        inside = ex["facemask"][..., 0] >= 128
        assert bool(out["icp_pasted"]) == bool(ex["has_facemask"])
        assert bool(out["fcp_apply"]) == bool(ex["has_facemask"])
        assert out["fcp_source"].shape == (S, S, 3) and out["fcp_mask"].shape == (S, S, 1)
        mask = out["fcp_mask"][..., 0] > 0
        assert not (mask & ~inside).any()
        assert mask.any() == bool(ex["has_facemask"])
        differs = np.any(out["fcp_source"] != out["image"], axis=-1)
        assert not (differs & ~inside).any()


def test_aligned_source_matches_the_icp_geometry():
    ex = make_example(3)
    face = FACES[1]
    src, mask = aligned_source(ex, face["image"], face["mask"], np.random.default_rng(9), **AUGMENT)
    icp, _ = paste_face(ex, face["image"], face["mask"], np.random.default_rng(9), **AUGMENT)
    np.testing.assert_array_equal(src, icp["image"])  # same draws -> same placement
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert (
        aligned_source(
            make_example(3, facemask=False), face["image"], face["mask"], np.random.default_rng(0), **AUGMENT
        )
        is None
    )


def test_make_copy_paste_transforms_from_config():
    cp = get_config().copy_paste
    assert make_copy_paste_transforms(cp) == []  # off by default
    cp.icp.enabled = cp.fcp.enabled = True
    icp, fcp = make_copy_paste_transforms(cp, seed=1)
    assert isinstance(icp, ImageCopyPaste) and isinstance(fcp, FeatureCopyPasteInputs)
    assert icp.face_source is fcp.face_source and len(icp.face_source) == cp.icp.num_synthetic_faces
    assert icp.options == ICP and fcp.options == FCP


@pytest.mark.parametrize(
    "field, value",
    [("prob", 1.5), ("prob", -0.1), ("flip_prob", 2.0), ("rotation_deg", -1.0), ("scale_range", (1.2, 0.8))],
)
def test_copy_paste_options_name_the_bad_field(field, value):
    cp = get_config().copy_paste
    cp.fcp[field] = value
    with pytest.raises(ConfigError, match=rf"config\.copy_paste\.fcp\.{field}: "):
        CopyPasteOptions.from_config("fcp", cp.fcp)
    cp.fcp.enabled = True
    with pytest.raises(ConfigError, match=rf"config\.copy_paste\.fcp\.{field}: "):
        make_copy_paste_transforms(cp)  # before any face source is opened


# ---------------------------------------------------------------- FCP


def _encoder_output(seed, n=2, size=S, channels=(4, 4, 8, 8, 16, 16)):
    rng = np.random.default_rng(seed)
    feats = tuple(jnp.asarray(rng.normal(size=(n, size >> k, size >> k, channels[k])), jnp.float32) for k in range(5))
    deep = jnp.asarray(rng.normal(size=(n, size >> 5, size >> 5, channels[5])), jnp.float32)
    indices = tuple(
        jnp.asarray(rng.integers(0, 9, (n, size >> (k + 1), size >> (k + 1), 1)), jnp.int32) for k in range(5)
    )
    return EncoderOutput(deep=deep, features=feats, indices=indices)


def _np_mask_at(mask, size):
    """Reference: positions whose footprint is more than half masked."""
    n, h = mask.shape[0], mask.shape[1]
    f = h // size
    return mask[..., 0].reshape(n, size, f, size, f).mean(axis=(2, 4)) > 0.5


def test_replace_features_changes_only_masked_positions_and_no_source_gradient():
    target = _encoder_output(0)
    source = _encoder_output(1)
    mask_np = np.zeros((2, S, S, 1), np.float32)
    mask_np[:, 8:40, 16:56] = 1.0
    mask_np[:, 40:44, 16:20] = 0.6
    mask = jnp.asarray(mask_np)
    apply = jnp.array([True, False])
    layers = ("e1", "e3", "deep")

    def loss(src, tgt):  # differentiable parts only: (deep, features)
        r = replace_features(
            EncoderOutput(*tgt, target.indices), EncoderOutput(*src, source.indices), mask, apply, layers
        )
        return sum(jnp.sum(x) for x in jax.tree.leaves((r.deep, r.features))), r

    (_, out), (g_src, g_tgt) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        (source.deep, source.features), (target.deep, target.features)
    )
    for a, b in zip(out.indices, target.indices):
        np.testing.assert_array_equal(a, b)  # pooling indices stay the target's
    for name, k in FCP_LAYERS.items():
        t, s, o = (np.asarray(e.deep if k is None else e.features[k]) for e in (target, source, out))
        changed = np.any(o != t, axis=-1)
        if name not in layers:
            assert not changed.any(), name
            continue
        expected = _np_mask_at(mask_np, t.shape[1])
        expected[1] = False  # apply is false for example 1
        np.testing.assert_array_equal(changed, expected)
        np.testing.assert_array_equal(o[expected], s[expected])
    np.testing.assert_array_equal(mask_at(mask, 8, 8)[..., 0], _np_mask_at(mask_np, 8))
    # At 1/2 the 2x2 footprints of the 0.6 strip count (mean 0.6 > 0.5); at 1/32 only the
    # top-right 32x32 footprint is more than half masked (24 x 24 of 32 x 32).
    assert _np_mask_at(mask_np, 32)[0].sum() == 16 * 20 + 2 * 2
    assert _np_mask_at(mask_np, 2)[0].tolist() == [[False, True], [False, False]]
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_src))
    e3 = _np_mask_at(mask_np, 8) & np.array([True, False])[:, None, None]
    np.testing.assert_array_equal(np.asarray(g_tgt[1][3][..., 0]), (~e3).astype(np.float32))


def test_fcp_inputs_from_a_batch():
    batch = {
        "fcp_source": np.full((2, S, S, 3), 255, np.uint8),
        "fcp_mask": np.full((2, S, S, 1), 255, np.uint8),
        "fcp_apply": np.array([True, False]),
    }
    fcp = fcp_inputs(batch, step=3, start_step=5, layers=("e2",))
    assert not bool(fcp["apply"].any())
    fcp = fcp_inputs(batch, step=5, start_step=5, layers=("e2",))
    np.testing.assert_array_equal(fcp["apply"], [True, False])
    np.testing.assert_allclose(
        fcp["source_image"][0, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-5
    )
    assert float(fcp["mask"].min()) == 1.0 and fcp["layers"] == ("e2",)
    with pytest.raises(ValueError, match="FCP layers"):
        fcp_inputs(batch, 0, 0, layers=("e9",))


def test_p3mnet_fcp_resnet34(resnet34_variables):
    """P3MNet with FCP: same variables tree, only FCP examples change (an example with apply
    false is bit-identical to fcp=None), the source image gets no gradient and the encoder's
    running statistics no update from the source pass."""
    from p3m_jax.models import build_model

    model = build_model("resnet34")
    variables = resnet34_variables
    x = jax.random.normal(jax.random.key(1), (2, S, S, 3))
    src = jax.random.normal(jax.random.key(2), (2, S, S, 3))
    mask = jnp.zeros((2, S, S, 1)).at[:, 8:56, 8:56].set(1.0)
    layers = ("e2", "e4", "deep")

    def fcp(apply, source=src):
        return {"source_image": source, "mask": mask, "apply": apply, "layers": layers}

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, fcp=fcp(jnp.ones(2, bool))))
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)

    @jax.jit
    def run(variables):
        plain = model.apply(variables, x, False)
        on = model.apply(variables, x, False, fcp=fcp(jnp.array([True, False])))

        def loss(source):
            out, new_state = model.apply(
                variables, x, True, fcp=fcp(jnp.array([True, True]), source), mutable=["batch_stats"]
            )
            return jnp.sum(out["fusion"]) + jnp.sum(out["global"]), new_state

        (_, state_fcp), g_src = jax.value_and_grad(loss, has_aux=True)(src)
        _, state_plain = model.apply(variables, x, True, mutable=["batch_stats"])
        return plain, on, state_fcp, state_plain, g_src

    plain, on, state_fcp, state_plain, g_src = run(variables)
    for k in plain:
        np.testing.assert_array_equal(on[k][1], plain[k][1])  # apply false: untouched
    assert float(jnp.abs(on["local"][0] - plain["local"][0]).max()) > 0  # apply true: changed
    assert float(jnp.abs(g_src).max()) == 0.0  # no gradient into the source path
    # The source pass does not update the encoder's running statistics (an update would move
    # them by 0.1 x the source/target batch-statistics difference, orders above this tolerance).
    enc_fcp = state_fcp["batch_stats"]["encoder"]
    enc_plain = state_plain["batch_stats"]["encoder"]
    for a, b in zip(jax.tree.leaves(enc_fcp), jax.tree.leaves(enc_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The decoder's statistics do see the replaced features.
    dec = [
        float(jnp.abs(a - b).max())
        for a, b in zip(
            jax.tree.leaves(state_fcp["batch_stats"]["decoder"]), jax.tree.leaves(state_plain["batch_stats"]["decoder"])
        )
    ]
    assert max(dec) > 1e-4
