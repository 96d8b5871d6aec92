"""Scoring a training run's model: the validation slice with the live state (to select checkpoints by),
and the test splits from a saved checkpoint at the end (written to ``<workdir>/test_results.json``)."""

from __future__ import annotations

import os

import jax
import numpy as np

from p3m_jax import data as data_lib
from p3m_jax.common.constants import TEST_RESULTS_FILE, VALIDATION_LOG_FILE
from p3m_jax.evaluation.report import REPORTED_KEYS, write_json
from p3m_jax.evaluation.scoring import evaluate_split
from p3m_jax.inference import strategies
from p3m_jax.inference.predictor import Predictor
from p3m_jax.train import mesh as mesh_lib
from p3m_jax.train.checkpointing import TrainCheckpointer
from p3m_jax.train.config_checks import model_options
from p3m_jax.train.summary import append_row, log, summary_panel
from p3m_jax.weights.workdir_checkpoints import restore_variables


def local_variables(state, gather, ema: bool = False) -> dict:
    """The state's model variables (``ema``: their EMA) gathered whole onto this process's first device
    (for Predictor). ``gather`` is a jitted identity with replicated output shardings, built once per run.
    """
    gathered = gather(state.ema_variables() if ema else state.variables())
    return jax.tree_util.tree_map(lambda a: a.addressable_data(0), gathered)


class Validator:
    """Scores the live state on the validation slice (its EMA too when the run keeps one), logs the means,
    writes TensorBoard scalars and summary images, and appends ``validation.jsonl`` (process 0). Its
    predictor is built at the first validation and reused by the test scoring at the end."""

    def __init__(self, config, mesh, writer, root, ema: bool, is_main: bool):
        self.config, self.writer, self.root, self.ema, self.is_main = config, writer, root, ema, is_main
        self.dataset = data_lib.validation_dataset(config.data)
        self.predictor: Predictor | None = None
        self._gather = jax.jit(lambda tree: tree, out_shardings=mesh_lib.replicated(mesh))

    def __call__(self, step: int, state) -> dict:
        """Validation means of the weights the run selects models by; with an EMA both sets are scored, and
        the other's means are kept under ``raw_``/``ema_`` names."""
        select_ema = bool(self.config.eval.select_ema)
        other = self._score(step, state, ema=not select_ema)["mean"] if self.ema else {}
        result = self._score(step, state, ema=select_ema)  # last: the summary images show these weights
        means = {**result["mean"], **{f"{'raw' if select_ema else 'ema'}_{k}": v for k, v in other.items()}}
        if self.is_main:
            if self.config.num_summary_images:
                self._write_images(step)
            append_row(self.root / VALIDATION_LOG_FILE, {"step": step, "count": result["count"], **means})
        return means

    def _score(self, step: int, state, ema: bool) -> dict:
        config = self.config
        variables = local_variables(state, self._gather, ema=ema)
        if self.predictor is None:
            self.predictor = Predictor(config.arch, variables, options=model_options(config))
        else:
            self.predictor.set_variables(variables)  # same shapes: the jitted forward is reused
        result = evaluate_split(self.predictor, self.dataset, config.eval.validation_strategy, config.eval.limit)
        means = result["mean"]
        self.writer.write_scalars(step, {f"{'val_ema' if ema else 'val'}/{k}": v for k, v in means.items()})
        log(
            f"validation @ {step}{' (EMA weights)' if ema else ''} ({result['count']} images, "
            f"{config.eval.validation_strategy}): "
            + ", ".join(f"{k} {means[k]:.4f}" for k in ("SAD", "MSE", "GRAD", "CONN") if k in means)
        )
        return result

    def _write_images(self, step: int) -> None:
        images = {}
        for index in range(min(self.config.num_summary_images, len(self.dataset))):
            example = self.dataset[index]
            alpha = strategies.predict_alpha(
                self.predictor, np.asarray(example["image"]), self.config.eval.validation_strategy
            )
            images[f"validation/{index}"] = summary_panel(example["image"], example["alpha"], alpha)
        self.writer.write_images(step, images)


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
        predictor.set_variables(variables)
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
