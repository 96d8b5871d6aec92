"""Import of the authors' ResNet-34 P3M-Net checkpoints, the convert CLI, our checkpoint format."""

import os

import jax
import numpy as np
import pytest
import torch

import p3m_jax
from p3m_jax import convert
from p3m_jax.weights import model_checkpoint as checkpoints
from p3m_jax.weights.initialize import variables_from_torch
from p3m_jax.weights.torch_import import CheckpointImportError, convert_state_dict


def flat_items(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flat_items(v, prefix + (k,))
        else:
            yield prefix + (k,), np.asarray(v)


TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def to_torch_layout(leaf, value):
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def authors_state_dict(variables, backbone=False):
    """A state dict laid out like the authors' ResNet-34 P3M-Net (or its r34mp backbone)."""
    sd = {}
    for (collection, *path, leaf), value in flat_items(variables):
        name = ".".join(path[1:] + [TORCH_LEAF[leaf]])
        tensor = torch.from_numpy(np.array(to_torch_layout(leaf, value)))  # writable copy
        if path[0] == "decoder":
            if not backbone:
                sd[name] = tensor
            continue
        sd[name if backbone else "resnet." + name] = tensor
        if backbone:
            continue
        # The authors' model registers the encoder a second time as encoder0..encoder4.
        top = path[1]
        alias = {
            "conv1": "encoder0.0",
            "bn1": "encoder0.1",
            "layer1": "encoder1.0",
            "layer2": "encoder2",
            "layer3": "encoder3",
            "layer4": "encoder4",
        }.get(top)
        if alias:
            sd[".".join([alias] + path[2:] + [TORCH_LEAF[leaf]])] = tensor.clone()
    for key in [k for k in sd if k.endswith("running_var")]:
        sd[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    return sd


def assert_trees_equal(a, b):
    fa, fb = dict(flat_items(a)), dict(flat_items(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))


@pytest.fixture(scope="module")
def state_dict(resnet34_variables):
    return authors_state_dict(resnet34_variables)


def test_authors_layout_has_their_key_count_and_shapes(state_dict):
    # The authors' model.state_dict() has 713 entries (duplicates and BN counters included).
    assert len(state_dict) == 713
    assert tuple(state_dict["resnet.conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(state_dict["encoder1.0.2.conv2.weight"].shape) == (64, 64, 3, 3)
    assert tuple(state_dict["encoder3.0.downsample.0.weight"].shape) == (256, 128, 1, 1)
    assert tuple(state_dict["resnet.fc.weight"].shape) == (1000, 512)
    assert tuple(state_dict["decoder0_g.6.weight"].shape) == (3, 64, 3, 3)
    assert tuple(state_dict["dbfi_0.transform2.weight"].shape) == (32, 512, 1, 1)
    assert tuple(state_dict["tfi_3.conv1.weight"].shape) == (256, 384, 3, 3)


def test_pth_file_converts_exactly(tmp_path, state_dict, resnet34_variables):
    path = tmp_path / "p3m_r34.pth"
    torch.save({"state_dict": state_dict}, path)
    variables, report = variables_from_torch(path, "resnet34")
    assert_trees_equal(variables, resnet34_variables)
    assert not report.left_at_init
    assert all(k.endswith("num_batches_tracked") for k in report.ignored)
    # A bare state dict with DataParallel's "module." prefix works too.
    torch.save({"module." + k: v for k, v in state_dict.items()}, tmp_path / "bare.pth")
    bare, _ = variables_from_torch(tmp_path / "bare.pth", "resnet34")
    assert_trees_equal(bare, resnet34_variables)


def _convert(sd, reference):
    sd = {k: v.numpy() for k, v in sd.items()}
    return convert_state_dict(sd, "resnet34", reference, source="ckpt.pth")


def test_missing_key_is_named(state_dict, resnet34_variables):
    sd = dict(state_dict)
    del sd["decoder3_l.4.running_var"]
    with pytest.raises(CheckpointImportError, match=r"not found.*decoder3_l/4/var"):
        _convert(sd, resnet34_variables)


def test_unknown_key_is_named(state_dict, resnet34_variables):
    sd = dict(state_dict, **{"decoder9_g.0.weight": torch.zeros(3, 3, 3, 3)})
    with pytest.raises(CheckpointImportError, match=r"unknown keys: decoder9_g\.0\.weight"):
        _convert(sd, resnet34_variables)


def test_misshaped_tensor_is_named(state_dict, resnet34_variables):
    sd = dict(state_dict, **{"tfi_2.conv1.weight": torch.zeros(128, 64, 3, 3)})
    with pytest.raises(
        CheckpointImportError, match=r"tfi_2\.conv1\.weight \(128, 64, 3, 3\) \(expected \(128, 192, 3, 3\)\)"
    ):
        _convert(sd, resnet34_variables)


def test_conflicting_duplicates_are_named(state_dict, resnet34_variables):
    sd = dict(state_dict)
    sd["encoder2.1.bn1.bias"] = sd["encoder2.1.bn1.bias"] + 1
    with pytest.raises(CheckpointImportError, match=r"different values.*layer2\.1\.bn1\.bias"):
        _convert(sd, resnet34_variables)


def test_float64_state_dict_with_equal_duplicates_converts(state_dict, resnet34_variables):
    # Float64 values that float32 cannot hold; each copy of an encoder tensor gets the same
    # ones (a function of the tensor's values), as in a float64 save of the authors' model.
    def to_float64(v):
        v = v.numpy()
        return v.astype(np.float64) + 1e-3 * np.sin(np.arange(v.size).reshape(v.shape) + v)

    sd = {k: to_float64(v) if v.is_floating_point() else v.numpy() for k, v in state_dict.items()}
    assert np.array_equal(sd["encoder2.1.bn1.bias"], sd["resnet.layer2.1.bn1.bias"])
    variables, _ = convert_state_dict(sd, "resnet34", resnet34_variables)
    got = variables["params"]["encoder"]["layer2"]["1"]["bn1"]["bias"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, sd["resnet.layer2.1.bn1.bias"].astype(np.float32))


def test_corrupt_files_fail_clearly(tmp_path, state_dict):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": state_dict}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 3])
    with pytest.raises(CheckpointImportError, match="cannot read .*truncated.pth"):
        variables_from_torch(truncated, "resnet34")
    not_a_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_dict)
    with pytest.raises(CheckpointImportError, match="holds no state dict"):
        variables_from_torch(not_a_dict, "resnet34")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        variables_from_torch(tmp_path / "missing.pth", "resnet34")
    with pytest.raises(ValueError, match="pass arch="):
        p3m_jax.load_pretrained(good)


def test_backbone_loads_encoder_and_reports_decoder_at_init(tmp_path, resnet34_variables):
    # An ImageNet r34mp backbone (torchvision key names, classifier included).
    sd = authors_state_dict(resnet34_variables, backbone=True)
    assert "conv1.weight" in sd and "fc.bias" in sd and not any("decoder" in k for k in sd)
    torch.save(sd, tmp_path / "r34mp.pth.tar")
    variables, report = variables_from_torch(tmp_path / "r34mp.pth.tar", "resnet34", backbone_only=True, seed=1)
    got, ref = dict(flat_items(variables)), dict(flat_items(resnet34_variables))
    for key in ref:
        if key[1] == "encoder":
            np.testing.assert_array_equal(got[key], ref[key])
    assert report.left_at_init and all(k.split("/")[1] == "decoder" for k in report.left_at_init)
    assert "left at init" in report.summary()
    # The decoder comes from a fresh init (seed 1), not from the reference variables (seed 0).
    key = ("params", "decoder", "decoder4_g", "0", "kernel")
    assert not np.array_equal(got[key], ref[key])


def test_convert_cli_writes_a_checkpoint_that_load_pretrained_reads(tmp_path, state_dict, resnet34_variables, capsys):
    pth = tmp_path / "p3m_r34.pth"
    torch.save({"state_dict": state_dict}, pth)
    out = tmp_path / "converted"
    args = ["--arch", "resnet34", "--checkpoint", str(pth), "--output", str(out)]
    assert convert.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert checkpoints.is_model_checkpoint(out)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    # Refuses to overwrite silently.
    assert convert.main(args) == 1
    assert "already exists" in capsys.readouterr().err

    predictor = p3m_jax.load_pretrained(out)
    assert predictor.arch == "resnet34"
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, predictor.variables), resnet34_variables)
    with pytest.raises(ValueError, match="holds a resnet34 model"):
        p3m_jax.load_pretrained(out, arch="vitae_s")
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)
    out_arrays = predictor.forward(x)
    assert set(out_arrays) == set(p3m_jax.OUTPUT_NAMES)
    assert isinstance(out_arrays["fusion"], np.ndarray)
    assert out_arrays["fusion"].shape == (1, 64, 64, 1)
    with pytest.raises(ValueError, match="multiples of 32"):
        predictor.forward(x[:, :40])


def test_saved_checkpoint_gets_the_usual_permissions(tmp_path, resnet34_variables):
    # Built in a tempfile.mkdtemp folder (owner-only 0700) and renamed into place: it must end up
    # readable as the umask allows, like any folder the user makes.
    previous = os.umask(0o027)
    try:
        path = checkpoints.save_model_checkpoint(tmp_path / "ckpt", "resnet34", resnet34_variables)
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o750
    assert os.stat(os.path.join(path, checkpoints.MODEL_META_FILE)).st_mode & 0o777 == 0o640


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch, resnet34_variables):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.json, "dump", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_model_checkpoint(tmp_path / "ckpt", "resnet34", resnet34_variables)
    assert os.listdir(tmp_path) == []
