"""P3M-Net(Swin-T): the blocks against small PyTorch reimplementations, parameter count,
forward passes at sizes the authors' code cannot run, and ImageNet-backbone import."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from p3m_jax.models import build_model, init_variables  # noqa: E402
from p3m_jax.ops.pooling import argmax_to_indices  # noqa: E402
from p3m_jax.models.swin import (
    PoolingPatchMerging,
    StemPoolingPatchEmbed,  # noqa: E402
    SwinBlock,
    window_attention_mask,
)
from p3m_jax.weights.backbone import load_backbone  # noqa: E402
from torch_refs import (
    assert_p3m_outputs,
    filled_variables,
    randomize,
    t,  # noqa: E402
    torch_window_mask,
)
from p3m_jax.weights.torch_import import CheckpointImportError, convert_state_dict  # noqa: E402
from torch_p3mnet import module_reference  # noqa: E402

SWIN_T_PARAMS = 45_128_206  # the authors' model, PyTorch parameters()


# ----------------------------------------------------------------------------- helpers

# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("h,w,shift", [(10, 12, 3), (14, 7, 3), (4, 4, 3), (9, 16, 0), (8, 8, 3)])
def test_window_attention_block_matches_pytorch(h, w, shift):
    """Shifted/non-shifted windows, with and without padding, maps smaller than a window."""
    heads, window, c = 3, 7, 12
    block = SwinBlock(heads, window, shift)
    x = np.random.default_rng(1).normal(size=(2, h, w, c)).astype(np.float32)
    params = randomize(block.init(jax.random.key(0), jnp.asarray(x), False))["params"]
    ours = block.apply({"params": params}, jnp.asarray(x), False)
    ref = module_reference({"params": params}).swin_block(t(x), "m", window, shift)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=2e-5, rtol=1e-5)


def test_attention_mask_regions():
    # No shift and no padding: no mask at all.
    assert window_attention_mask(14, 21, 7, 0) is None
    # The authors' 512x512 first stage (128x128, padded to 133): same mask for every pair of
    # tokens that are both in the image (padding rows are discarded anyway).
    ours = window_attention_mask(128, 128, 7, 3)
    ref = torch_window_mask(128, 128, 7, 3).numpy()
    assert ours.shape == ref.shape == (19 * 19, 49, 49)
    np.testing.assert_array_equal(ours, ref)
    # A 4x4 map in one padded 7x7 window, shifted by 3: the wrapped-around row/column is
    # kept apart from the rest.
    m = window_attention_mask(4, 4, 7, 3)
    assert m.shape == (1, 49, 49)
    token = lambda r, c: r * 7 + c  # noqa: E731  (position in the rolled window)
    assert m[0, token(0, 0), token(4, 0)] == -100.0  # original rows 3 and 0
    assert m[0, token(4, 4), token(5, 6)] == 0.0  # both wrapped around in both axes


def test_pooling_patch_merging_matches_pytorch():
    c = 8
    x = np.random.default_rng(2).normal(size=(2, 6, 10, c)).astype(np.float32)
    mod = PoolingPatchMerging(2 * c)
    params = randomize(mod.init(jax.random.key(0), jnp.asarray(x)))["params"]
    merged, idx, feat = mod.apply({"params": params}, jnp.asarray(x))
    tmerged, tf, tidx = module_reference({"params": params}).pooling_merge(t(x), "m")
    np.testing.assert_allclose(np.asarray(feat), nhwc(tf), atol=1e-5)
    flat = argmax_to_indices(idx, 2, 2, 0, x.shape[2])
    np.testing.assert_array_equal(np.asarray(flat), nhwc(tidx))
    np.testing.assert_allclose(np.asarray(merged), tmerged.numpy(), atol=1e-5)
    assert "bias" not in params["linear"]


def nhwc(a):
    return a.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("relu_last", [True, False])
def test_stem_matches_pytorch(relu_last):
    x = np.random.default_rng(3).normal(size=(1, 16, 12, 3)).astype(np.float32)
    mod = StemPoolingPatchEmbed(8, relu_last=relu_last)
    params = randomize(mod.init(jax.random.key(0), jnp.asarray(x)))["params"]
    tokens, feats, idxs = mod.apply({"params": params}, jnp.asarray(x))
    y, (f0, f1), (i0, i1) = module_reference({"params": params}).stem(t(x).permute(0, 3, 1, 2), "m", relu_last)
    np.testing.assert_allclose(np.asarray(tokens), y.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(feats[0]), nhwc(f0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(feats[1]), nhwc(f1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(argmax_to_indices(idxs[0], 2, 2, 0, x.shape[2])), nhwc(i0))
    np.testing.assert_array_equal(np.asarray(argmax_to_indices(idxs[1], 2, 2, 0, x.shape[2] // 2)), nhwc(i1))


# ----------------------------------------------------------------------------- whole model


def test_parameter_count_matches_authors():
    model = build_model("swin_t")
    shapes = jax.eval_shape(lambda r: init_variables(model, r), jax.random.key(0))
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes["params"])) == SWIN_T_PARAMS
    assert set(shapes) == {"params", "batch_stats"}


@pytest.mark.parametrize("hw", [(64, 64), (96, 160)])
def test_forward_any_multiple_of_32(hw):
    """64x64 (stage maps 16, 8, 4, 2: smaller than a window) and 96x160 (non-square, every
    stage padded): sizes the authors' code cannot run."""
    model = build_model("swin_t")
    variables = filled_variables(model)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, *hw, 3)), jnp.float32)
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert_p3m_outputs(out, 1, hw)


def swin_t_backbone_state_dict(seed=0):
    """An ImageNet Swin-T stem-pooling backbone as the authors' code names it (random values),
    including the derived buffers and a classifier head."""
    rng = np.random.default_rng(seed)
    shapes = {
        "patch_embed.proj1.weight": (48, 3, 3, 3),
        "patch_embed.proj1.bias": (48,),
        "patch_embed.proj2.weight": (96, 48, 3, 3),
        "patch_embed.proj2.bias": (96,),
        "patch_embed.proj3.weight": (96, 96, 3, 3),
        "patch_embed.proj3.bias": (96,),
        "patch_embed.norm.weight": (96,),
        "patch_embed.norm.bias": (96,),
        "norm.weight": (768,),
        "norm.bias": (768,),
        "head.weight": (1000, 768),
        "head.bias": (1000,),
    }
    for i, (depth, heads) in enumerate(zip((2, 2, 6, 2), (3, 6, 12, 24))):
        c = 96 * 2**i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shapes.update(
                {
                    p + "norm1.weight": (c,),
                    p + "norm1.bias": (c,),
                    p + "attn.relative_position_bias_table": (169, heads),
                    p + "attn.relative_position_index": (49, 49),
                    p + "attn.qkv.weight": (3 * c, c),
                    p + "attn.qkv.bias": (3 * c,),
                    p + "attn.proj.weight": (c, c),
                    p + "attn.proj.bias": (c,),
                    p + "norm2.weight": (c,),
                    p + "norm2.bias": (c,),
                    p + "mlp.fc1.weight": (4 * c, c),
                    p + "mlp.fc1.bias": (4 * c,),
                    p + "mlp.fc2.weight": (c, 4 * c),
                    p + "mlp.fc2.bias": (c,),
                }
            )
            if j % 2:
                shapes[p + "attn_mask"] = (4, 49, 49)
        if i < 3:
            p = f"layers.{i}.downsample."
            shapes.update({p + "norm.weight": (c,), p + "norm.bias": (c,), p + "linear.weight": (2 * c, c)})
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_backbone_state_dict_loads_into_encoder(tmp_path):
    model = build_model("swin_t")
    variables = filled_variables(model)
    sd = swin_t_backbone_state_dict()
    path = tmp_path / "swin_t_backbone.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    loaded, report = load_backbone(path, "swin_t", variables)
    enc = loaded["params"]["encoder"]
    np.testing.assert_array_equal(
        enc["layers"]["2"]["blocks"]["5"]["attn"]["qkv"]["kernel"], sd["layers.2.blocks.5.attn.qkv.weight"].T
    )
    np.testing.assert_array_equal(
        enc["patch_embed"]["proj2"]["kernel"], sd["patch_embed.proj2.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        enc["layers"]["1"]["blocks"]["1"]["attn"]["relative_position_bias_table"],
        sd["layers.1.blocks.1.attn.relative_position_bias_table"],
    )
    np.testing.assert_array_equal(enc["norm"]["scale"], sd["norm.weight"])
    # Encoder complete, head and derived buffers ignored, decoder untouched.
    n_encoder = len(jax.tree_util.tree_leaves(variables["params"]["encoder"]))
    assert len(report.loaded) == n_encoder
    assert {"head.weight", "head.bias", "layers.0.blocks.1.attn_mask"} <= set(report.ignored)
    assert report.left_at_init and all("/decoder/" in k for k in report.left_at_init)
    np.testing.assert_array_equal(
        loaded["params"]["decoder"]["decoder4_g"]["0"]["kernel"],
        variables["params"]["decoder"]["decoder4_g"]["0"]["kernel"],
    )


def test_backbone_missing_encoder_tensor_is_an_error():
    model = build_model("swin_t")
    reference = jax.eval_shape(lambda r: init_variables(model, r), jax.random.key(0))
    sd = swin_t_backbone_state_dict()
    del sd["layers.3.blocks.1.mlp.fc2.weight"]
    with pytest.raises(CheckpointImportError, match="layers/3/blocks/1/mlp/fc2/kernel"):
        convert_state_dict(sd, "swin_t", reference, backbone_only=True)
