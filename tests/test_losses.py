"""p3m_jax.train.losses against the public code's values (shared/reference) and the loss's contract."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from p3m_jax.train import losses

DATA = pathlib.Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "reference_values.json").read_text())["cases"]
VECTORS = np.load(DATA / "reference_vectors.npz")
RTOL = 1e-5


def _case(i):
    """The reference case as NHWC float32 arrays (batch of one)."""
    hw = lambda a: jnp.asarray(a, jnp.float32)[None, ..., None]
    chw = lambda a: jnp.asarray(np.transpose(a, (1, 2, 0)), jnp.float32)[None]
    return {
        "pred": hw(VECTORS[f"case{i}_pred_alpha_u8"] / 255.0),
        "alpha": hw(VECTORS[f"case{i}_gt_alpha_u8"] / 255.0),
        "trimap": hw(VECTORS[f"case{i}_trimap_u8"]),
        "image": chw(VECTORS[f"case{i}_image_normalized_chw"]),
        "fg": chw(VECTORS[f"case{i}_fg_normalized_chw"]),
        "bg": chw(VECTORS[f"case{i}_bg_normalized_chw"]),
        "logits": chw(VECTORS[f"case{i}_global_logits_chw"]),
    }


def _terms(c):
    unknown = losses.unknown_mask(c["trimap"])
    return {
        "crossentropy": losses.cross_entropy_loss(c["logits"], c["trimap"]),
        "alpha_unknown": losses.alpha_loss(c["pred"], c["alpha"], unknown),
        "laplacian_unknown": losses.laplacian_loss(c["pred"], c["alpha"], unknown),
        "alpha_whole": losses.alpha_loss(c["pred"], c["alpha"]),
        "laplacian_whole": losses.laplacian_loss(c["pred"], c["alpha"]),
        "composition_whole": losses.composition_loss(c["pred"], c["image"], c["fg"], c["bg"]),
    }


@pytest.mark.parametrize("case", range(len(REFERENCE)))
def test_every_term_matches_the_public_code(case):
    ref = REFERENCE[case]["losses"]
    got = _terms(_case(case))
    assert set(got) == set(ref)
    for name, value in got.items():
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(float(value), ref[name], rtol=RTOL, err_msg=name)


def _outputs_and_batch(c, **batch_extra):
    outputs = {k: c["logits"] for k in ("global", "side2", "side1", "side0")}
    outputs.update(local=c["pred"], fusion=c["pred"])
    batch = {k: c[k] for k in ("image", "fg", "bg", "alpha", "trimap")}
    batch.update(batch_extra)
    return outputs, batch


@pytest.mark.parametrize("case", range(len(REFERENCE)))
def test_total_and_parts_match_the_public_code(case):
    ref = REFERENCE[case]["losses"]
    outputs, batch = _outputs_and_batch(_case(case))
    total, parts = losses.p3m_loss(outputs, batch)
    expected = {
        "global": 6 * ref["crossentropy"],  # three sides + 3x global, all the same logits here
        "local": ref["alpha_unknown"] + ref["laplacian_unknown"],
        "fusion": ref["alpha_whole"] + ref["laplacian_whole"],
        "composition": ref["composition_whole"],
    }
    assert set(parts) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(float(parts[name]), value, rtol=RTOL, err_msg=name)
    want = expected["global"] / 6 + 2 * expected["local"] + 3 * expected["fusion"] + expected["composition"]
    np.testing.assert_allclose(float(total), want, rtol=RTOL)


def test_laplacian_kernel_is_the_public_sum_of_exponentials():
    k = losses._laplacian_kernel()
    g = np.exp(-np.square(np.arange(5) - 2.0))
    np.testing.assert_allclose(k, (g[:, None] + g[None, :]) / (g[:, None] + g[None, :]).sum(), rtol=1e-6)
    # not the separable Gaussian (the product)
    assert not np.allclose(k, np.outer(g, g) / np.outer(g, g).sum(), atol=1e-3)


def test_sums_run_over_the_whole_batch_not_per_sample():
    a, b = _case(0), _case(0)
    # second sample: a trimap with far fewer unknown pixels, so per-sample means differ
    t2 = np.asarray(b["trimap"]).copy()
    t2[:, 32:] = 255.0
    b["trimap"] = jnp.asarray(t2)
    b["pred"] = 1.0 - b["alpha"]  # and a much larger error there
    cat = lambda k: jnp.concatenate([a[k], b[k]])
    w = losses.unknown_mask(cat("trimap"))
    got = float(losses.alpha_loss(cat("pred"), cat("alpha"), w))
    diff = np.asarray(cat("pred") - cat("alpha")) * np.asarray(w)
    want = np.sqrt(diff**2 + 1e-12).sum() / (np.asarray(w).sum() + 1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    per_sample = np.mean(
        [float(losses.alpha_loss(s["pred"], s["alpha"], losses.unknown_mask(s["trimap"]))) for s in (a, b)]
    )
    assert abs(got - per_sample) > 1e-3


def test_composition_masks_samples_without_fg_bg():
    c0, c1 = _case(0), _case(0)
    c1["fg"] = c1["fg"] + 5.0  # garbage: would change the loss if it counted
    cat = lambda k: jnp.concatenate([c0[k], c1[k]])
    outputs = {k: cat("logits") for k in ("global", "side2", "side1", "side0")}
    outputs.update(local=cat("pred"), fusion=cat("pred"))
    batch = {k: cat(k) for k in ("image", "fg", "bg", "alpha", "trimap")}
    _, parts = losses.p3m_loss(outputs, {**batch, "has_fg_bg": jnp.array([1.0, 0.0])})
    np.testing.assert_allclose(float(parts["composition"]), REFERENCE[0]["losses"]["composition_whole"], rtol=RTOL)
    _, parts_all = losses.p3m_loss(outputs, {**batch, "has_fg_bg": jnp.array([1.0, 1.0])})
    assert float(parts_all["composition"]) > float(parts["composition"]) + 1.0
    total_none, parts_none = losses.p3m_loss(outputs, {**batch, "has_fg_bg": jnp.zeros(2)})
    assert float(parts_none["composition"]) == 0.0 and np.isfinite(float(total_none))


def test_runs_in_float32_for_bfloat16_outputs():
    outputs, batch = _outputs_and_batch(_case(1))
    total32, _ = losses.p3m_loss(outputs, batch)
    total16, parts16 = losses.p3m_loss({k: v.astype(jnp.bfloat16) for k, v in outputs.items()}, batch)
    assert total16.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in parts16.values())
    np.testing.assert_allclose(float(total16), float(total32), rtol=2e-2)
