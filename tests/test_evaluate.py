"""Tests of p3m_jax.evaluate: release-folder reading, scoring, bucketed vs exact, the CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from p3m_jax import evaluate
from p3m_jax.data import evaluation_data
from p3m_jax.evaluation import report, scoring
from p3m_jax.inference import strategies as inference
from p3m_jax.evaluation.metrics import matting_metrics

# Bucketed network inputs move predictions. Measured on exactly the setting of the bound test below
# (random-weight ResNet-34 seed 1, three portraits of 130-230 px, RESIZE, bucket 64: 64x96 inputs padded to
# 64x128), relative move of each dataset mean: SAD 0.48 %, MSE 5.6 %, MAD 0.70 %, SAD_T 0.39 %, GRAD 22 %,
# CONN 0.44 %. Bounds: 1.5x those. (Random weights give noisy, high-frequency mattes, so GRAD moves most;
# benchmarks/bench_eval_compile.py measures 50 images at 96-288 px, bucket 128: every mean within 3 %.)
BUCKETED_RELATIVE_BOUND = {"SAD": 0.0075, "MSE": 0.085, "MAD": 0.0105, "SAD_T": 0.006, "GRAD": 0.33, "CONN": 0.0066}

SIZES = [(70, 90), (64, 64), (96, 80)]


class FakePredictor:
    """Per-pixel outputs (so padding cannot change them)."""

    arch = "fake"

    def forward(self, x):
        red = x[..., :1]
        alpha = 1 / (1 + np.exp(-2 * red))
        logits = np.concatenate([-2 * red, np.full_like(red, 0.5), 2 * red], axis=-1)
        return {"global": logits, "local": alpha, "fusion": alpha, "side2": logits, "side1": logits, "side0": logits}


def _portrait(seed, height, width):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    radius = np.hypot((yy - height * 0.6) / (height * 0.35), (xx - width / 2) / (width * 0.3))
    alpha = np.clip((1.15 - radius) * 4, 0, 1)
    alpha = np.round(alpha * 255).astype(np.uint8)
    bg = rng.integers(0, 255, 3)
    fg = np.array([230, 40, 20]) + rng.integers(-20, 20, 3)
    image = (alpha[..., None] / 255 * fg + (1 - alpha[..., None] / 255) * bg).astype(np.uint8)
    trimap = np.where(alpha == 255, 255, np.where(alpha == 0, 0, 128)).astype(np.uint8)
    facemask = np.zeros_like(alpha)
    facemask[int(height * 0.3) : int(height * 0.5), int(width * 0.4) : int(width * 0.6)] = 255
    return image, alpha, trimap, facemask


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release") / "P3M-10k"
    for split, (folder, image_folder) in evaluation_data.RELEASE_SPLITS.items():
        base = root / folder
        for sub in (image_folder, "mask", "trimap") + (("facemask",) if split == "p3m_500_p" else ()):
            (base / sub).mkdir(parents=True)
        for i, (h, w) in enumerate(SIZES):
            image, alpha, trimap, facemask = _portrait(i, h, w)
            name = f"p_{i:08x}"
            Image.fromarray(image).save(base / image_folder / f"{name}.jpg", quality=95)
            Image.fromarray(np.stack([alpha] * 3, -1)).save(base / "mask" / f"{name}.png")  # 3-channel mask
            Image.fromarray(trimap).save(base / "trimap" / f"{name}.png")
            if split == "p3m_500_p":
                Image.fromarray(facemask).save(base / "facemask" / f"{name}.png")
    return root.parent


def test_folder_dataset_reads_the_release_layout(release, tmp_path):
    for root in (release, release / "P3M-10k", release / "P3M-10k" / "validation"):
        dataset = evaluation_data.FolderDataset(root, "p3m_500_p")
        assert len(dataset) == 3
    example = dataset[2]
    assert example["image"].shape == (96, 80, 3) and example["alpha"].shape == (96, 80, 1)
    assert example["has_facemask"] and example["facemask"].max() == 255
    assert not evaluation_data.FolderDataset(release, "p3m_500_np")[0]["has_facemask"]
    with pytest.raises(FileNotFoundError, match="release layout"):
        evaluation_data.FolderDataset(tmp_path, "p3m_500_p")
    with pytest.raises(ValueError, match="unknown split"):
        evaluation_data.FolderDataset(release, "train")


def test_evaluate_scores_quantized_predictions(release, tmp_path):
    dataset = evaluation_data.FolderDataset(release, "p3m_500_p")
    result = scoring.evaluate(
        FakePredictor(), dataset, "hybrid", mode="exact", save_png_dir=tmp_path / "png", progress=False
    )
    assert result["count"] == 3 and result["network_shapes"] == 3  # (32, 32), (64, 64), (96, 64)
    for i, row in enumerate(result["per_image"]):
        example = evaluation_data.plain_example(dataset[i])
        pred_u8 = inference.quantize(inference.predict_hybrid(FakePredictor(), example["image"]))
        saved = np.asarray(Image.open(tmp_path / "png" / f"{example['name']}.png"))
        np.testing.assert_array_equal(saved, pred_u8)
        expected = matting_metrics(
            pred_u8 / np.float32(255),
            example["alpha"] / np.float32(255),
            example["trimap"],
            facemask=example["facemask"],
        )
        for key, value in expected.items():
            np.testing.assert_allclose(row[key], float(value), rtol=1e-6, err_msg=key)
    for key in ("SAD", "CONN", "SAD_PRIVACY"):
        np.testing.assert_allclose(result["mean"][key], np.mean([r[key] for r in result["per_image"]]))
    table = report.format_table({"p3m_500_p": result})
    assert "SAD_PRIVACY" in table and "| p3m_500_p | 3 |" in table


def test_metric_bucketing_is_exact(release):
    dataset = evaluation_data.FolderDataset(release, "p3m_500_np")
    exact = scoring.evaluate(FakePredictor(), dataset, "resize", mode="exact", progress=False)
    bucketed = scoring.evaluate(
        FakePredictor(), dataset, "resize", mode="bucketed", bucket=128, metric_bucket=128, progress=False
    )
    assert bucketed["metric_shapes"] == 1 and exact["metric_shapes"] == 3
    for key, value in exact["mean"].items():
        np.testing.assert_allclose(bucketed["mean"][key], value, rtol=1e-5, atol=1e-9, err_msg=key)


def test_bucketed_model_stays_within_the_documented_bound():
    from p3m_jax.inference.predictor import Predictor

    predictor = Predictor.random("resnet34", seed=1)
    dataset = []
    for i, (h, w) in enumerate([(130, 200), (200, 150), (140, 230)]):  # RESIZE inputs 64x96, 96x64, 64x96
        image, alpha, trimap, facemask = _portrait(i, h, w)
        dataset.append({"name": str(i), "image": image, "alpha": alpha, "trimap": trimap})
    exact = scoring.evaluate(predictor, dataset, "resize", mode="exact", progress=False)
    bucketed = scoring.evaluate(predictor, dataset, "resize", mode="bucketed", bucket=64, progress=False)
    assert (exact["network_shapes"], bucketed["network_shapes"]) == (2, 2)  # 64x96, 96x64 -> 64x128, 128x64
    for key in report.REPORTED_KEYS:
        relative = abs(bucketed["mean"][key] - exact["mean"][key]) / max(abs(exact["mean"][key]), 1e-6)
        assert relative < BUCKETED_RELATIVE_BOUND[key], (key, exact["mean"][key], bucketed["mean"][key])


def test_cli_reports_a_wrong_data_folder_before_loading_weights(tmp_path, monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("weights loaded before the test sets were found")

    monkeypatch.setattr(evaluate, "load_pretrained", must_not_load)
    code = evaluate.main(
        [
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--release_dir",
            str(tmp_path / "nope"),
            "--cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 2
    assert f"{tmp_path / 'nope'}: no such folder (expected the P3M-10k release layout)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert evaluate.main(["--checkpoint", "c", "--release_dir", str(tmp_path / "empty"), "--cache_dir", ""]) == 2
    assert "empty: not the P3M-10k release layout (expected train/blurred_image/" in capsys.readouterr().err
    # An empty TFDS folder: said plainly, instead of TFDS trying to build P3M-10k from a manual download.
    code = evaluate.main(
        [
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--data_dir",
            str(tmp_path),
            "--cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 2
    assert f"p3m10k/default is not built in {tmp_path}" in capsys.readouterr().err


def test_cli_reports_a_missing_checkpoint(release, tmp_path, capsys):
    code = evaluate.main(
        ["--checkpoint", str(tmp_path / "nope"), "--release_dir", str(release), "--cache_dir", str(tmp_path / "cache")]
    )
    assert code == 2
    assert f"no checkpoint at {tmp_path / 'nope'}" in capsys.readouterr().err


def test_cli_writes_json(release, tmp_path):
    from p3m_jax.inference.predictor import Predictor

    from p3m_jax.inference.predictor import clear_compiled_programs

    checkpoint = Predictor.random("resnet34", seed=0).save(tmp_path / "ckpt")
    clear_compiled_programs()  # earlier tests of this process compiled the same programs
    output = tmp_path / "out"
    code = evaluate.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--release_dir",
            str(release),
            "--strategy",
            "resize",
            "--limit",
            "2",
            "--output",
            str(output),
            "--cache_dir",
            str(tmp_path / "cache"),
            "--save_png",
        ]
    )
    assert code == 0
    payload = json.loads((output / "evaluation.json").read_text())
    assert set(payload["splits"]) == {"p3m_500_p", "p3m_500_np"}
    assert payload["splits"]["p3m_500_p"]["count"] == 2
    assert "SAD_PRIVACY" in payload["splits"]["p3m_500_p"]["mean"]
    assert "SAD_PRIVACY" not in payload["splits"]["p3m_500_np"]["mean"]
    assert len(list((output / "p3m_500_np").glob("*.png"))) == 2
    assert any((tmp_path / "cache").iterdir())  # the persistent compilation cache was used


def test_cli_reports_an_unwritable_output_before_loading_weights(release, tmp_path, monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("weights loaded before the output folder was checked")

    monkeypatch.setattr(evaluate, "load_pretrained", must_not_load)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = evaluate.main(
        ["--checkpoint", "c", "--release_dir", str(release), "--output", str(blocker / "out"), "--save_png"]
    )
    assert code == 2
    assert f"output folder {blocker / 'out'} is not writable" in capsys.readouterr().err
