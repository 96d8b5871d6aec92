"""The parameter EMA in a training run (stand-in model): validated beside the raw weights, selectable
for model selection, checkpointed and resumed, read by ``evaluate --ema``, ``predict --ema`` and export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loop_helpers import TFDS_NAME, assert_trees_equal, tiny_config
from p3m_jax import evaluate, load_pretrained, predict
from p3m_jax.train import loop
from p3m_jax.train.checkpointing import CheckpointError
from p3m_jax.weights.workdir_checkpoints import restore_variables


@pytest.fixture(scope="module", autouse=True)
def stand_in_model(tiny_model):
    yield


def ema_config(data_dir, **overrides):
    return tiny_config(data_dir, ema_decay=0.5, **{"eval.select_ema": True, **overrides})


@pytest.fixture(scope="module")
def ema_run(data_dir, tmp_path_factory):
    """4 steps with an EMA (decay 0.5) chosen for model selection; validated and saved at 2 and 4."""
    workdir = tmp_path_factory.mktemp("ema")
    return workdir, loop.train_and_evaluate(ema_config(data_dir), workdir)


def test_the_ema_is_validated_beside_the_raw_weights_and_selects_the_model(ema_run):
    workdir, result = ema_run
    rows = [json.loads(line) for line in (workdir / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:  # SAD: the EMA's (the selection metric); raw_SAD: the raw weights'
        assert np.isfinite(row["SAD"]) and np.isfinite(row["raw_SAD"]) and row["SAD"] != row["raw_SAD"]
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_ema/SAD" in r for r in metrics) and any("val/SAD" in r for r in metrics)
    tests = json.loads((workdir / "test_results.json").read_text())
    assert tests["weights"] == "ema"
    raw, ema = (restore_variables(workdir / "checkpoints", 4, ema=e)[1] for e in (False, True))
    assert set(raw) == set(ema)
    assert not np.allclose(raw["params"]["encoder"]["conv0"]["kernel"], ema["params"]["encoder"]["conv0"]["kernel"])


def test_a_resumed_run_continues_the_ema_bitwise(ema_run, data_dir, tmp_path, monkeypatch):
    config = ema_config(data_dir, eval_every_steps=0, checkpoint_every_steps=0, **{"eval.test_splits": ()})
    with monkeypatch.context() as patch:
        patch.setattr(loop.PreemptionWatcher, "should_stop", lambda self, step: step >= 2)
        loop.train_and_evaluate(config, tmp_path / "w")
    assert loop.train_and_evaluate(config, tmp_path / "w")["step"] == 4
    for ema in (False, True):
        got = restore_variables(tmp_path / "w" / "checkpoints", 4, ema=ema)[1]
        assert_trees_equal(got, restore_variables(ema_run[0] / "checkpoints", 4, ema=ema)[1])
    # A run saved with an EMA does not resume without one; one saved without starts its EMA on resume.
    with pytest.raises(CheckpointError, match="keeps an EMA.*config.ema_decay"):
        loop.train_and_evaluate(tiny_config(data_dir, num_train_steps=6, **{"eval.test_splits": ()}), tmp_path / "w")


def test_evaluate_predict_and_load_pretrained_read_the_ema(ema_run, data_dir, tmp_path, capsys):
    workdir = ema_run[0]
    predictor = load_pretrained(workdir, ema=True)
    step, ema = restore_variables(workdir / "checkpoints", ema=True)
    assert_trees_equal(predictor.variables["params"], ema["params"])
    assert "EMA weights" in predictor.source
    output = tmp_path / "ema_scores"
    args = ["--checkpoint", str(workdir), "--data_dir", str(data_dir), "--tfds_config", TFDS_NAME.split("/")[1]]
    assert evaluate.main([*args, "--ema", "--output", str(output)]) == 0
    assert json.loads((output / "evaluation.json").read_text())
    # A checkpoint without an EMA, and --ema with exported weights: one line each.
    with pytest.raises(ValueError, match="needs a training workdir"):
        load_pretrained(tmp_path, ema=True)
    quick = tmp_path / "plain"
    loop.train_and_evaluate(tiny_config(data_dir, num_train_steps=2, **{"eval.test_splits": ()}), quick)
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(quick), *args[2:], "--ema"]) != 0
    assert "holds no EMA of the parameters" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.parse_args(["--exported", "m.npz", "--ema", "--input", "a.jpg", "--output", str(tmp_path)])
    assert "use it with --checkpoint" in capsys.readouterr().err


def test_turning_the_ema_on_for_a_saved_run_starts_it_from_the_saved_weights(data_dir, tmp_path, capsys):
    plain = tiny_config(data_dir, num_train_steps=2, eval_every_steps=0, **{"eval.test_splits": ()})
    loop.train_and_evaluate(plain, tmp_path / "w")
    capsys.readouterr()
    config = ema_config(data_dir, num_train_steps=4, eval_every_steps=0, **{"eval.test_splits": ()})
    config.eval.select_ema = False
    assert loop.train_and_evaluate(config, tmp_path / "w")["step"] == 4
    assert "starting the EMA from its weights" in capsys.readouterr().out
    ema = restore_variables(tmp_path / "w" / "checkpoints", 4, ema=True)[1]
    raw = restore_variables(tmp_path / "w" / "checkpoints", 4)[1]
    assert_trees_equal(jax_tree_shapes(ema), jax_tree_shapes(raw))


def jax_tree_shapes(tree):
    import jax

    return jax.tree_util.tree_map(lambda x: np.asarray(np.shape(x)), tree)
