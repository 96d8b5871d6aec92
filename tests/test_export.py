"""Exported networks (StableHLO, ONNX) against `Predictor.forward`, their size rule, the export and
predict commands."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from p3m_jax import export as export_command
from p3m_jax import predict
from p3m_jax.inference import export_formats
from p3m_jax.inference.predictor import Predictor

pytestmark = pytest.mark.slow  # exports and runs the three real networks (ONNX, StableHLO)

SIZE = (64, 96)  # a size no other test module compiles for these random-weight networks
OTHER_SIZE = (96, 64)  # ResNet-34's file has symbolic sizes: checked at a second one
TOLERANCE = 1e-4  # float32: the exported program runs XLA's convolution, the predictor the CPU rewrites


def _input(size, batch=2):
    return np.random.default_rng(sum(size)).standard_normal((batch,) + size + (3,)).astype(np.float32)


def trained_looking(arch: str, seed: int) -> Predictor:
    """A predictor whose every BatchNorm and LayerNorm scale and shift, running mean and variance, bias
    and position-bias table is drawn at random (the init has scales 1, shifts, biases and means 0,
    variances 1), as after training: an export that dropped or mixed up any of them would not match."""
    predictor = Predictor.random(arch, seed=seed)
    rng = np.random.default_rng(seed)

    def draw(path, value):
        collection, name = path[0].key, path[-1].key
        value = np.asarray(value)
        if collection == "batch_stats" and name == "var":
            return np.exp(rng.normal(0.0, 0.3, value.shape)).astype(value.dtype)
        if name == "scale":
            return (1.0 + rng.normal(0.0, 0.2, value.shape)).astype(value.dtype)
        if name in ("bias", "mean", "relative_position_bias_table"):
            return rng.normal(0.0, 0.2, value.shape).astype(value.dtype)
        return value

    predictor.set_variables(jax.tree_util.tree_map_with_path(draw, predictor.variables))
    return predictor


@pytest.fixture(scope="module", params=["resnet34", "swin_t", "vitae_s"])
def variant(request):
    """A predictor with trained-looking weights, an input batch and its outputs (one compile per variant)."""
    predictor = trained_looking(request.param, seed=3)
    x = _input(SIZE)
    reference = predictor.forward(x)
    # The drawn weights matter: the local matte is not flat, and not the one the init's weights give.
    # (Untrained, the global branch rarely picks "unknown", so the fusion is mostly 0 and 1: the checks
    # below compare the local and global outputs too.)
    assert reference["local"].std() > 0.01
    untrained = Predictor.random(request.param, seed=3).forward(x, outputs=("local",))["local"]
    assert np.abs(untrained - reference["local"]).max() > 0.05
    return predictor, x, reference


def _assert_close(got: dict, reference: dict, names):
    for name in names:
        assert got[name].shape == reference[name].shape, name
        np.testing.assert_allclose(got[name], reference[name], atol=TOLERANCE, rtol=0, err_msg=name)


def test_stablehlo_round_trip_matches_the_predictor(variant, tmp_path):
    predictor, x, reference = variant
    path = tmp_path / "model.stablehlo"
    if predictor.arch == "resnet34":  # symbolic batch and sizes
        metadata = export_formats.export_stablehlo(predictor, path)
        assert metadata["height"] is None and metadata["batch"] is None
    else:  # their window masks and attention chunks need static sizes: a clear error, then a fixed size
        with pytest.raises(export_formats.ExportError, match="--size"):
            export_formats.export_stablehlo(predictor, path)
        assert not path.exists()
        metadata = export_formats.export_stablehlo(predictor, path, size=SIZE)
        assert (metadata["height"], metadata["width"], metadata["batch"]) == (64, 96, None)
    loaded = export_formats.ExportedPredictor(path)
    assert loaded.arch == predictor.arch and loaded.metadata["size_rule"].startswith("H and W positive multiples")
    _assert_close(loaded.forward(x), reference, ("fusion", "global", "local", "side0"))
    _assert_close(loaded.forward(x, outputs=("global",)), reference, ("global",))
    with pytest.raises(ValueError, match="breaks the size rule: .*multiples of 32"):
        loaded.forward(np.zeros((1, 60, 64, 3), np.float32))
    if predictor.arch == "resnet34":
        other = _input(OTHER_SIZE, batch=1)
        _assert_close(loaded.forward(other), predictor.forward(other), ("fusion", "global"))
    else:  # a smaller input runs padded up to the file's size, as evaluate's buckets pad
        half = x[:1, :32]
        padded = np.pad(half, ((0, 0), (0, 32), (0, 0), (0, 0)), mode="symmetric")
        expected = {k: v[:, :32] for k, v in predictor.forward(np.concatenate([padded, x[1:]])).items()}
        _assert_close(loaded.forward(half), {k: v[:1] for k, v in expected.items()}, ("fusion", "local"))
        with pytest.raises(ValueError, match="at most 64x96, this file's fixed size"):
            loaded.forward(np.zeros((1, 96, 96, 3), np.float32))


def test_onnx_round_trip_matches_the_predictor(variant, tmp_path):
    import onnx
    import onnxruntime

    predictor, x, reference = variant
    path = tmp_path / "model.onnx"
    metadata = export_formats.export_onnx(predictor, path, size=SIZE)
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["fusion", "global", "local"]
    assert json.loads({p.key: p.value for p in model.metadata_props}["p3m_jax"]) == metadata
    # The poolings run as onnxruntime's own kernels (`onnx_pooling`), not as window slices and selects.
    ops = {node.op_type for node in model.graph.node}
    assert {"MaxPool", "MaxUnpool"} <= ops
    # onnxruntime directly, NCHW as documented.
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fusion = session.run(["fusion"], {"image": x[:1].transpose(0, 3, 1, 2)})[0]
    assert fusion.shape == (1, 1) + SIZE
    np.testing.assert_allclose(fusion.transpose(0, 2, 3, 1), reference["fusion"][:1], atol=TOLERANCE, rtol=0)
    loaded = export_formats.ExportedPredictor(path)  # batch 1: the two images one after the other
    _assert_close(loaded.forward(x), reference, ("fusion", "global", "local"))
    # One output (as each pass of HYBRID asks) from the part of the graph that computes it.
    local = loaded.forward(x, outputs=("local",))
    assert list(local) == ["local"]
    _assert_close(local, reference, ("local",))
    with pytest.raises(ValueError, match=r"breaks the size rule: .*at most 64x96.* a StableHLO file"):
        loaded.forward(np.zeros((1, 128, 96, 3), np.float32))
    # The same check catches an export that lost a BatchNorm shift: zero one in the graph.
    broken = tmp_path / "broken.onnx"
    onnx.save(_without_first_batchnorm_shift(model), broken)
    with pytest.raises(AssertionError, match="global|local"):
        _assert_close(export_formats.ExportedPredictor(broken).forward(x), reference, ("fusion", "global", "local"))


def _without_first_batchnorm_shift(model):
    """``model`` with the shift of its first BatchNorm zeroed. The BatchNorm is exported as x times a
    factor plus (shift - mean times factor), broadcast: the Add after a Mul whose other input leads back,
    through reshapes, broadcasts and that subtraction, to the 1-D shift constant."""
    from onnx import numpy_helper

    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {init.name: init for init in model.graph.initializer}

    def constant_behind(name):
        while name not in initializers:
            node = producers.get(name)
            if node is None or node.op_type not in ("Reshape", "Expand", "Unsqueeze", "Cast", "Sub"):
                return None
            name = node.input[0]
        return initializers[name]

    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        for this, other in (node.input, node.input[::-1]):
            shift = constant_behind(other)
            if getattr(producers.get(this), "op_type", "") == "Mul" and shift is not None and shift.dims[-1:] > [1]:
                zeros = np.zeros(tuple(shift.dims), numpy_helper.to_array(shift).dtype)
                shift.CopyFrom(numpy_helper.from_array(zeros, shift.name))
                return model
    raise AssertionError("no BatchNorm shift found in the exported graph")


def test_export_and_predict_commands(tmp_path, capsys):
    checkpoint = Predictor.random("resnet34", seed=4).save(tmp_path / "ckpt")
    output = tmp_path / "new" / "folder" / "model.stablehlo"  # made, as rembg's ~/.rembg in docs/deploy.md
    assert export_command.main(["--checkpoint", str(checkpoint), "--format", "stablehlo", "--output", str(output)]) == 0
    assert "batch symbolic, size symbolic" in capsys.readouterr().out
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8)).save(photo)
    args = ["--input", str(photo), "--strategy", "resize", "--cache_dir", ""]
    assert predict.main(["--exported", str(output), "--output", str(tmp_path / "a")] + args) == 0
    assert predict.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "b")] + args) == 0
    cutouts = ["--foreground", "estimate", "--background", "white"]
    assert predict.main(["--exported", str(output), "--output", str(tmp_path / "d")] + args + cutouts) == 0
    alpha = np.asarray(Image.open(tmp_path / "d" / "photo_alpha.png"))
    composite = np.asarray(Image.open(tmp_path / "d" / "photo_composite.png"))
    rgba = np.asarray(Image.open(tmp_path / "d" / "photo_rgba.png"))
    assert composite.shape == (70, 50, 3) and rgba.shape == (70, 50, 4)
    np.testing.assert_array_equal(rgba[..., 3], alpha)
    np.testing.assert_array_equal(composite[alpha == 0], 255)
    assert (
        predict.main(["--exported", str(output), "--output", str(tmp_path / "e")] + args + ["--background", "x.jpg"])
        == 2
    )
    assert "neither a colour" in capsys.readouterr().err and not (tmp_path / "e").exists()
    a = np.asarray(Image.open(tmp_path / "a" / "photo_alpha.png"), np.int32)
    b = np.asarray(Image.open(tmp_path / "b" / "photo_alpha.png"), np.int32)
    assert np.abs(a - b).max() <= 1  # 8-bit mattes: a rounding step apart at most
    # Bad input: one line, nothing written.
    missing = tmp_path / "missing"
    assert (
        export_command.main(["--checkpoint", str(missing), "--format", "onnx", "--output", str(tmp_path / "m.onnx")])
        == 2
    )
    assert f"no checkpoint at {missing}" in capsys.readouterr().err
    unused = tmp_path / "unused" / "m.onnx"  # a folder made for a file that is not written is removed again
    assert export_command.main(["--checkpoint", str(missing), "--format", "onnx", "--output", str(unused)]) == 2
    assert not unused.parent.exists()
    (tmp_path / "a_file").write_text("")
    blocked = tmp_path / "a_file" / "m.onnx"
    assert export_command.main(["--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(blocked)]) == 2
    assert "is not writable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_command.main(["--checkpoint", str(checkpoint), "--format", "tflite", "--output", "x"])
    with pytest.raises(SystemExit):
        export_command.main(["--checkpoint", str(checkpoint), "--format", "onnx", "--output", "x", "--size", "100x100"])
    assert predict.main(["--exported", str(tmp_path / "nope.onnx"), "--output", str(tmp_path / "c")] + args) == 2
    assert "no exported model at" in capsys.readouterr().err


def test_rembg_runs_the_exported_model_in_its_custom_session(tmp_path, monkeypatch):
    import rembg

    monkeypatch.setenv("REMBG_HOME", str(tmp_path))  # rembg runs custom models from its models folder only
    predictor = trained_looking("resnet34", seed=5)
    path = tmp_path / "p3m.onnx"
    export_formats.export_onnx(predictor, path, size=(320, 320))  # rembg's u2net_custom runs at 320x320
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    photo.putpixel((0, 0), (255, 255, 255))  # rembg divides by the image's maximum: make it 255
    session = rembg.new_session("u2net_custom", model_path=str(path))
    mask = np.asarray(rembg.remove(photo, session=session, only_mask=True), np.int32)
    # Ours on rembg's input (LANCZOS to 320x320, ImageNet normalisation), with rembg's min-max scaling
    # and LANCZOS resize back: the same matte up to rounding.
    x = np.asarray(photo.resize((320, 320), Image.Resampling.LANCZOS), np.float32) / 255.0
    x = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    fusion = export_formats.ExportedPredictor(path).forward(x[None].astype(np.float32), ["fusion"])["fusion"][0, ..., 0]
    scaled = (fusion - fusion.min()) / (fusion.max() - fusion.min())
    ours = Image.fromarray((scaled * 255).astype(np.uint8)).resize(photo.size, Image.Resampling.LANCZOS)
    assert mask.shape == (90, 70)
    assert np.abs(mask - np.asarray(ours, np.int32)).max() <= 1


def test_onnx_without_the_export_extra_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    checkpoint = Predictor.random("resnet34", seed=4).save(tmp_path / "ckpt")
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # as if not installed: importing it fails
    args = [
        "--checkpoint",
        str(checkpoint),
        "--format",
        "onnx",
        "--size",
        "64x64",
        "--output",
        str(tmp_path / "m.onnx"),
    ]
    assert export_command.main(args) == 2
    err = capsys.readouterr().err
    assert "ONNX export needs the export extra (pip install 'p3m-jax[export]')" in err, err
    assert not (tmp_path / "m.onnx").exists()
