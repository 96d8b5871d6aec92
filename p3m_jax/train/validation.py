"""Scoring during and after training: the validation slice with the live state, and the test splits
from a saved checkpoint (written to ``<workdir>/test_results.json``)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from p3m_jax import data as data_lib
from p3m_jax.common.constants import TEST_RESULTS_FILE
from p3m_jax.evaluation.report import REPORTED_KEYS, write_json
from p3m_jax.evaluation.scoring import evaluate_split
from p3m_jax.inference.predictor import Predictor
from p3m_jax.train.checkpointing import TrainCheckpointer
from p3m_jax.train.config_checks import model_options
from p3m_jax.train.summary import log
from p3m_jax.weights.training_checkpoint import restore_variables


def local_variables(state, gather, ema: bool = False) -> dict:
    """The state's model variables (``ema``: their EMA) gathered whole onto this process's first device
    (for Predictor). ``gather`` is a jitted identity with replicated output shardings, built once per run.
    """
    gathered = gather(state.ema_variables() if ema else state.variables())
    return jax.tree_util.tree_map(lambda a: a.addressable_data(0), gathered)


def evaluate_test_splits(
    config, checkpointer: TrainCheckpointer, workdir: str, predictor=None, step: int | None = None
) -> dict:
    """Scores a checkpoint (default: the best by validation SAD) on config.eval.test_splits, with the
    weights the run selects models by (the EMA with ``config.eval.select_ema``).

    Writes ``<workdir>/test_results.json`` (process 0) and returns {split: result}.
    """
    ema = bool(config.eval.select_ema)
    step, variables = restore_variables(checkpointer.directory, step, ema=ema)
    if predictor is None:
        predictor = Predictor(config.arch, variables, options=model_options(config))
    else:
        predictor.variables = jax.tree_util.tree_map(jnp.asarray, variables)
    results = {}
    for split in config.eval.test_splits:
        dataset = data_lib.test_dataset(config.data, split)
        results[split] = evaluate_split(predictor, dataset, config.eval.strategy, config.eval.limit)
        means = results[split]["mean"]
        log(
            f"test {split} @ step {step}{' (EMA weights)' if ema else ''} ({results[split]['count']} images, "
            f"{config.eval.strategy}): " + ", ".join(f"{k} {means[k]:.4f}" for k in REPORTED_KEYS if k in means)
        )
    if jax.process_index() == 0:
        write_json(
            os.path.join(workdir, TEST_RESULTS_FILE),
            {
                "step": step,
                "arch": config.arch,
                "weights": "ema" if ema else "raw",
                "strategy": config.eval.strategy,
                "splits": results,
            },
        )
    return results
