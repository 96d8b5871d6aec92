"""P3M-Net(ViTAE-S): Performer and global attention, the PCM branch and the normal cell
against small PyTorch reimplementations, parameter count, forward passes, and imports
(ImageNet backbone, the Performer's random features, round trip of an authors' state dict)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from p3m_jax.models import build_model, init_variables  # noqa: E402
from p3m_jax.models.attention import LayerNorm, gelu, global_attention  # noqa: E402
from p3m_jax.models.vitae import (
    PCM,
    Attention,
    NormalCell,  # noqa: E402
    PerformerAttention,
    performer_features_init,
)
from p3m_jax.weights.backbone import load_backbone  # noqa: E402
from torch_refs import assert_p3m_outputs, filled_variables, randomize, t  # noqa: E402
from p3m_jax.weights.torch_import import convert_state_dict  # noqa: E402
from torch_p3mnet import authors_state_dict, module_reference  # noqa: E402


VITAE_S_PARAMS = 27_463_052  # the authors' model, PyTorch parameters(), head included


# ----------------------------------------------------------------------------- blocks


def test_performer_features_are_scaled_orthogonal_and_deterministic():
    w = np.asarray(performer_features_init(jax.random.key(3), 2, 32, 64))
    assert w.shape == (2, 32, 64)
    for head in w:
        np.testing.assert_allclose(head @ head.T, 32 * np.eye(32), atol=1e-3)
    np.testing.assert_array_equal(w, performer_features_init(jax.random.key(3), 2, 32, 64))
    assert not np.allclose(w, performer_features_init(jax.random.key(4), 2, 32, 64))


def test_performer_attention_matches_pytorch():
    heads, c = 2, 16
    x = np.random.default_rng(0).normal(size=(2, 20, c)).astype(np.float32)
    mod = PerformerAttention(heads)
    variables = mod.init(jax.random.key(0), jnp.asarray(x))
    assert variables["constants"]["w"].shape == (heads, 4, 8)
    # The never-applied LayerNorm exists (state dict / parameter count), as the authors'.
    assert set(variables["params"]) == {"kqv", "proj", "norm1"}
    params = randomize(variables["params"])
    params = dict(params, kqv={"kernel": params["kqv"]["kernel"] * 0.3, "bias": params["kqv"]["bias"] * 0.1})
    ours = mod.apply({"params": params, "constants": variables["constants"]}, jnp.asarray(x))
    ref = module_reference({"params": params, "constants": variables["constants"]}).performer(t(x), "m")
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=2e-5, rtol=1e-4)


def test_global_attention_matches_pytorch_and_chunking_is_exact():
    heads, c = 2, 16
    x = np.random.default_rng(1).normal(size=(2, 37, c)).astype(np.float32)
    mod = Attention(heads)
    params = randomize(mod.init(jax.random.key(0), jnp.asarray(x))["params"])
    ours = mod.apply({"params": params}, jnp.asarray(x))
    ref = module_reference({"params": params}).attention(t(x), "m", heads)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=2e-5, rtol=1e-5)
    # Query chunks (37 queries in chunks of <= 10, padded) give the same result.
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 37, 3, 8)), jnp.float32) for _ in range(3))
    full = global_attention(q, k, v)
    chunked = global_attention(q, k, v, max_logits_per_chunk=2 * 3 * 37 * 10)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=1e-6)
    grads = [
        jax.grad(lambda q: jnp.sum(global_attention(q, k, v, max_logits_per_chunk=m) ** 2))(q)
        for m in (2**26, 2 * 3 * 37 * 10)
    ]
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]), atol=1e-5)
    # Its gradients (a hand-written softmax backward) are PyTorch autograd's.
    tq, tk, tv = (torch.from_numpy(np.asarray(a)).transpose(1, 2).requires_grad_(True) for a in (q, k, v))
    tout = torch.softmax(tq @ tk.transpose(-1, -2) / math.sqrt(8), dim=-1) @ tv
    (tout**2).sum().backward()
    ours = jax.grad(lambda q, k, v: jnp.sum(global_attention(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(ours, (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(np.asarray(got), want.transpose(1, 2).numpy(), atol=1e-5, rtol=1e-5)


def test_layer_norm_and_gelu_gradients_match_pytorch():
    """The LayerNorm's hand-written backward pass and the erf GELU against PyTorch autograd
    (input, scale and bias gradients), on tokens with a large mean (where a variance taken as
    E[x^2] - E[x]^2 loses digits), and in bfloat16 (statistics in float32)."""
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(2, 5, 7, 24)) * 3 + 40).astype(np.float32)
    weight = rng.normal(size=(2, 5, 7, 24)).astype(np.float32)
    scale, bias = rng.normal(size=24).astype(np.float32), rng.normal(size=24).astype(np.float32)
    norm = LayerNorm(1e-6)

    def loss(x, scale, bias):
        y = norm.apply({"params": {"scale": scale, "bias": bias}}, x)
        return jnp.sum(gelu(y) * weight)

    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    tx, ts, tb = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (x, scale, bias))
    tvalue = (F.gelu(F.layer_norm(tx, (24,), ts, tb, 1e-6)) * torch.from_numpy(weight)).sum()
    tvalue.backward()
    np.testing.assert_allclose(float(value), float(tvalue), rtol=1e-5)
    for got, want in zip(grads, (tx.grad, ts.grad, tb.grad)):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-5, rtol=1e-4)
    # bfloat16 input and output, float32 statistics: float32's result on the same (rounded)
    # input, rounded once to bfloat16.
    x_low = jnp.asarray(x, jnp.bfloat16)
    low = LayerNorm(1e-6, dtype=jnp.bfloat16).apply({"params": {"scale": scale, "bias": bias}}, x_low)
    assert low.dtype == jnp.bfloat16
    full = norm.apply({"params": {"scale": scale, "bias": bias}}, x_low.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(full), atol=1e-6, rtol=2**-8)
    g_low = jax.grad(
        lambda x: jnp.sum(norm.apply({"params": {"scale": scale, "bias": bias}}, x).astype(jnp.float32) * weight)
    )(jnp.asarray(x, jnp.bfloat16))
    assert g_low.dtype == jnp.bfloat16


def test_pcm_branch_matches_pytorch():
    c, groups = 16, 4
    x = np.random.default_rng(3).normal(size=(2, 6, 5, c)).astype(np.float32)
    mod = PCM(groups)
    variables = randomize(mod.init(jax.random.key(0), jnp.asarray(x), False))
    variables["batch_stats"] = jax.tree_util.tree_map(jnp.abs, variables["batch_stats"])
    ours = mod.apply(variables, jnp.asarray(x), False)
    assert variables["params"]["0"]["kernel"].shape == (3, 3, c // groups, 4 * c)
    ref = module_reference(variables).pcm(t(x).permute(0, 3, 1, 2), "m", groups)
    np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("performer", [False, True])
def test_normal_cell_matches_pytorch(performer):
    c, heads, groups = 16, 2, 4
    x = np.random.default_rng(4).normal(size=(2, 4, 6, c)).astype(np.float32)
    cell = NormalCell(heads, groups, performer)
    variables = cell.init(jax.random.key(0), jnp.asarray(x), False)
    params = randomize(variables["params"])
    if performer:
        params["attn"] = dict(
            params["attn"],
            kqv={"kernel": params["attn"]["kqv"]["kernel"] * 0.3, "bias": params["attn"]["kqv"]["bias"] * 0.1},
        )
    bs = jax.tree_util.tree_map(lambda v: jnp.abs(v) + 0.5, randomize(variables["batch_stats"]))
    consts = variables.get("constants", {})
    ours = cell.apply({"params": params, "batch_stats": bs, "constants": consts}, jnp.asarray(x), False)
    ref = module_reference({"params": params, "batch_stats": bs, "constants": consts}).normal_cell(
        t(x), "m", groups, heads
    )
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=5e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- whole model


def test_parameter_count_matches_authors():
    model = build_model("vitae_s")
    shapes = jax.eval_shape(lambda r: init_variables(model, r), jax.random.key(0))
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes["params"])) == VITAE_S_PARAMS
    consts = shapes["constants"]["encoder"]["layers"]["0"]["NC"]
    assert {k: v["attn"]["w"].shape for k, v in consts.items()} == {"0": (1, 32, 64), "1": (1, 32, 64)}


def test_performer_features_come_from_the_init_rng():
    model = build_model("vitae_s")
    init = jax.jit(lambda r: init_variables(model, r)["constants"])
    a, b, c = init(jax.random.key(0)), init(jax.random.key(0)), init(jax.random.key(1))
    w = lambda v: np.asarray(v["encoder"]["layers"]["0"]["NC"]["0"]["attn"]["w"])  # noqa: E731
    np.testing.assert_array_equal(w(a), w(b))
    assert not np.allclose(w(a), w(c))


@pytest.mark.parametrize("hw", [(64, 64), (96, 160)])
def test_forward_any_multiple_of_32(hw):
    model = build_model("vitae_s")
    variables = filled_variables(model)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, *hw, 3)), jnp.float32)
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert_p3m_outputs(out, 1, hw)


def vitae_s_backbone_state_dict(seed=0):
    """An ImageNet ViTAE-S backbone (``state_dict_ema``) as the authors' code names it."""
    rng = np.random.default_rng(seed)
    shapes = {
        "layers.0.RC.proj1.weight": (32, 3, 3, 3),
        "layers.0.RC.proj1.bias": (32,),
        "layers.0.RC.proj2.weight": (64, 32, 3, 3),
        "layers.0.RC.proj2.bias": (64,),
        "layers.0.RC.proj3.weight": (64, 64, 3, 3),
        "layers.0.RC.proj3.bias": (64,),
        "layers.0.RC.norm.weight": (64,),
        "layers.0.RC.norm.bias": (64,),
        "head.weight": (1000, 512),
        "head.bias": (1000,),
    }
    dims, depths, groups = (64, 128, 256, 512), (2, 2, 12, 2), (1, 32, 64, 128)
    for i in range(4):
        c, g = dims[i], groups[i]
        if i:
            p = f"layers.{i}.RC."
            shapes.update(
                {
                    p + "norm.weight": (dims[i - 1],),
                    p + "norm.bias": (dims[i - 1],),
                    p + "linear.weight": (c, dims[i - 1]),
                }
            )
        for j in range(depths[i]):
            p = f"layers.{i}.NC.{j}."
            qkv = "kqv" if i == 0 else "qkv"
            shapes.update(
                {
                    p + "norm1.weight": (c,),
                    p + "norm1.bias": (c,),
                    p + f"attn.{qkv}.weight": (3 * c, c),
                    p + f"attn.{qkv}.bias": (3 * c,),
                    p + "attn.proj.weight": (c, c),
                    p + "attn.proj.bias": (c,),
                    p + "norm2.weight": (c,),
                    p + "norm2.bias": (c,),
                    p + "mlp.fc1.weight": (4 * c, c),
                    p + "mlp.fc1.bias": (4 * c,),
                    p + "mlp.fc2.weight": (c, 4 * c),
                    p + "mlp.fc2.bias": (c,),
                    p + "PCM.0.weight": (4 * c, c // g, 3, 3),
                    p + "PCM.0.bias": (4 * c,),
                    p + "PCM.3.weight": (c, 4 * c // g, 3, 3),
                    p + "PCM.3.bias": (c,),
                    p + "PCM.6.weight": (c, c // g, 3, 3),
                    p + "PCM.6.bias": (c,),
                }
            )
            for bn, width in (("PCM.1.", 4 * c), ("PCM.4.", c)):
                shapes.update({p + bn + leaf: (width,) for leaf in ("weight", "bias", "running_mean", "running_var")})
                shapes[p + bn + "num_batches_tracked"] = ()
            if i == 0:
                shapes.update({p + "attn.norm1.weight": (c,), p + "attn.norm1.bias": (c,)})
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_backbone_state_dict_loads_into_encoder(tmp_path):
    model = build_model("vitae_s")
    variables = filled_variables(model)
    sd = vitae_s_backbone_state_dict()
    path = tmp_path / "vitae_s_backbone.pth.tar"
    torch.save({"state_dict_ema": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
    loaded, report = load_backbone(path, "vitae_s", variables)
    enc = loaded["params"]["encoder"]
    np.testing.assert_array_equal(
        enc["layers"]["2"]["NC"]["11"]["PCM"]["3"]["kernel"], sd["layers.2.NC.11.PCM.3.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        enc["layers"]["0"]["NC"]["1"]["attn"]["kqv"]["kernel"], sd["layers.0.NC.1.attn.kqv.weight"].T
    )
    np.testing.assert_array_equal(
        loaded["batch_stats"]["encoder"]["layers"]["3"]["NC"]["0"]["PCM"]["4"]["var"],
        sd["layers.3.NC.0.PCM.4.running_var"],
    )
    n_encoder = len(jax.tree_util.tree_leaves(variables["params"]["encoder"])) + len(
        jax.tree_util.tree_leaves(variables["batch_stats"]["encoder"])
    )
    assert len(report.loaded) == n_encoder
    # The backbone carries no random features: ours stay as initialized, and are reported.
    w_key = "constants/encoder/layers/0/NC/0/attn/w"
    assert w_key in report.left_at_init
    np.testing.assert_array_equal(
        loaded["constants"]["encoder"]["layers"]["0"]["NC"]["0"]["attn"]["w"],
        variables["constants"]["encoder"]["layers"]["0"]["NC"]["0"]["attn"]["w"],
    )
    constants = {k for k in report.left_at_init if k.startswith("constants/")}
    assert constants == {w_key, w_key.replace("NC/0", "NC/1")}
    assert all(k.split("/")[1] == "decoder" for k in set(report.left_at_init) - constants)
    assert "head.weight" not in report.ignored  # the head is part of the encoder, loaded
    assert all(k.endswith("num_batches_tracked") for k in report.ignored)


def test_authors_state_dict_round_trip_uses_stored_performer_features():
    model = build_model("vitae_s")
    variables = filled_variables(model, seed=5)
    sd = authors_state_dict(variables, "vitae_s")
    assert "encoder.layers.0.NC.1.attn.w" in sd and "encoder.head.weight" in sd
    reference = jax.eval_shape(lambda r: init_variables(model, r), jax.random.key(0))
    converted, report = convert_state_dict(sd, "vitae_s", reference)
    assert report.left_at_init == [] and report.ignored == []
    for a, b in zip(jax.tree_util.tree_leaves(converted), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(a, b)
    # Without the features the import still succeeds; they are left to the caller's init.
    del sd["encoder.layers.0.NC.0.attn.w"], sd["encoder.layers.0.NC.1.attn.w"]
    _, report = convert_state_dict(sd, "vitae_s", reference)
    assert report.left_at_init == ["constants/encoder/layers/0/NC/0/attn/w", "constants/encoder/layers/0/NC/1/attn/w"]
