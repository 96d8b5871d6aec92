"""Config values: a bad one stops `python -m p3m_jax.main` at start naming the field, before anything
is written; the options objects check every field; the compilation-cache switch; the loop's logs
and TensorBoard panels."""

from __future__ import annotations

import importlib.util
import json
import re

import jax
import numpy as np
import pytest

from loop_helpers import TFDS_NAME, run_main
from p3m_jax import main
from p3m_jax.common.errors import ConfigError
from p3m_jax.configs import default as default_config
from p3m_jax.train.config_checks import validate_config


@pytest.mark.parametrize(
    "override, env, expected",
    [
        ("--config.arch=resnet50", {}, "config.arch"),
        ("--config.batch_size=3", {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, "config.batch_size"),
        ("--config.grad_accum_steps=3", {}, "config.batch_size"),  # 8 is not 3 micro-batches
        ("--config.data.build_synthetic=False", {}, "config.data.tfds_name"),
        ("--config.data.image_size=100", {}, "config.data.image_size"),
        ("--config.optimizer.schedule=linear", {}, "config.optimizer.schedule"),
        ("--config.nonexistent=1", {}, "error: --config.nonexistent: no such field in default"),
        (
            "--config.num_train_step=3",
            {},
            'error: --config.num_train_step: no such field in default; Did you mean "num_train_steps"',
        ),
        (
            "--config.data.tfds_name=p3m10k/nosuchconfig",
            {},
            "error: config.data.tfds_name: 'p3m10k/nosuchconfig' is not a p3m10k build config",
        ),
    ],
)
def test_bad_config_values_fail_at_start_naming_the_field(tmp_path, override, env, expected):
    result = run_main(
        [
            "--config=default",
            f"--workdir={tmp_path / 'w'}",
            f"--config.data.data_dir={tmp_path / 'empty_tfds'}",
            override,
        ],
        env,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()  # nothing written to the workdir


def test_a_recipe_argument_that_is_no_architecture_is_one_line(tmp_path):
    from p3m_jax import main
    from p3m_jax.models import ARCHITECTURES

    assert set(main.ARCHITECTURE_NAMES) == set(ARCHITECTURES)
    result = run_main(["--config=finetune_folder:resnet", "--print_config"], {})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: --config=finetune_folder:resnet: the argument after the colon is the architecture, one of "
        "resnet34, swin_t, vitae_s (e.g. --config=finetune_folder:vitae_s)"
    )
    assert "arch: vitae_s" in run_main(["--config=finetune_folder:vitae_s", "--print_config"], {}).stdout


@pytest.mark.parametrize(
    "field, value",
    [
        ("optimizer.warmup_steps", -1),
        ("optimizer.b1", 1.0),
        ("data.flip_prob", 1.5),
        ("data.trimap_kernel_range", (6, 3)),
        ("data.crop_sizes", ()),
        ("data.num_workers", -1),
        ("data.prefetch_batches", 0),
        ("data.read_threads", 0),
        ("copy_paste.icp.prob", 2.0),
        ("copy_paste.fcp.scale_range", (1.2, 0.8)),
        ("copy_paste.fcp.start_step", -1),
        ("copy_paste.fcp.layers", ("e9",)),
        ("profile_steps", "10"),
        ("profile_steps", "15:10"),
        ("profile_steps", "10:301"),  # past num_train_steps
        ("grad_accum_steps", 0),
        ("ema_decay", 1.0),
        ("remat", "decoders"),
        ("device_memory_gib", -1.0),
        ("eval.select_ema", True),  # without an EMA
    ],
)
def test_validate_config_names_each_bad_field(field, value):
    """Every consumer's options object checks its own fields; validate_config builds them all up front,
    also for P3M-CP levels that are switched off."""
    config = default_config.get_config()
    *groups, name = field.split(".")
    target = config
    for group in groups:
        target = target[group]
    target[name] = value
    with pytest.raises(ConfigError, match=rf"^config\.{re.escape(field)}: "):
        validate_config(config)
    validate_config(default_config.get_config())  # the recipe itself passes


def test_validation_slice_larger_than_the_train_split_is_one_line(tmp_path, data_dir):
    result = run_main(
        [
            "--config=default",
            f"--workdir={tmp_path / 'w'}",
            f"--config.data.data_dir={data_dir}",
            f"--config.data.tfds_name={TFDS_NAME}",
            "--config.data.validation_count=1000",
        ]
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        "error: config.data.validation_count: validation slice of 1000 examples out of 12 train examples"
    ) in result.stderr
    assert not (tmp_path / "w").exists()


def test_unwritable_workdir_fails_clearly(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_main(
        ["--config=default", f"--workdir={blocker / 'run'}", f"--config.data.data_dir={tmp_path / 'tfds'}"]
    )
    assert result.returncode == 1
    assert f"workdir {blocker / 'run'} is not writable" in result.stderr


def test_training_turns_the_persistent_compilation_cache_on(tmp_path, compilation_cache):
    from p3m_jax.common import compilation_cache as compilation_cache_lib

    config = default_config.get_config()
    try:
        # A folder JAX already has (JAX_COMPILATION_CACHE_DIR, or this test session's) is kept.
        config.compilation_cache_dir = str(tmp_path / "ignored")
        assert compilation_cache_lib.enable_unless_set(config.compilation_cache_dir) == compilation_cache
        jax.config.update("jax_compilation_cache_dir", None)
        config.compilation_cache_dir = ""
        assert (
            compilation_cache_lib.enable_unless_set(config.compilation_cache_dir) is None
            and not jax.config.jax_compilation_cache_dir
        )
        config.compilation_cache_dir = str(tmp_path / "xla")
        assert compilation_cache_lib.enable_unless_set(config.compilation_cache_dir) == str(tmp_path / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla") and (tmp_path / "xla").is_dir()
        jax.config.update("jax_compilation_cache_dir", None)
        (tmp_path / "file").write_text("")
        config.compilation_cache_dir = str(tmp_path / "file" / "xla")  # cannot be created: training goes on
        assert compilation_cache_lib.enable_unless_set(config.compilation_cache_dir) is None
    finally:
        compilation_cache_lib.enable_compilation_cache(compilation_cache)


def test_metric_writer_makes_no_event_file_before_its_first_write(tmp_path):
    from p3m_jax.train.summary import MetricWriter

    writer = MetricWriter(tmp_path / "run")  # e.g. a run killed while compiling its first step
    writer.close()
    assert not (tmp_path / "run").exists()
    writer = MetricWriter(tmp_path / "run")
    writer.write_scalars(1, {"train/loss": 1.5})
    writer.close()
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 1.5}


def test_resumed_logs_drop_the_rows_after_the_checkpoint_and_torn_rows(tmp_path):
    from p3m_jax.train.summary import drop_rows_after

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "tr')
    drop_rows_after(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    drop_rows_after(tmp_path / "missing.jsonl", 2)  # nothing to do, nothing made
    assert not (tmp_path / "missing.jsonl").exists()


def test_validation_images_show_input_truth_prediction_and_error_side_by_side():
    from p3m_jax.train.summary import summary_panel

    image = np.full((4, 5, 3), 7, np.uint8)
    truth = np.zeros((4, 5, 1), np.uint8)
    truth[:, 3:] = 255  # a uint8 matte as the dataset stores it
    prediction = np.full((4, 5), 0.25, np.float32)  # a float matte in [0, 1] as the network gives it
    panel = summary_panel(image, truth, prediction)
    assert panel.shape == (4, 20, 3) and panel.dtype == np.uint8
    np.testing.assert_array_equal(panel[:, :5], image)
    np.testing.assert_array_equal(panel[:, 5:10, 0], truth[..., 0])
    np.testing.assert_array_equal(panel[:, 10:15, 0], np.full((4, 5), 64))
    np.testing.assert_array_equal(panel[:, 15:, 0], np.where(truth[..., 0] == 255, 191, 64))


@pytest.mark.parametrize("name", sorted(main.recipes()))
def test_every_shipped_recipe_is_a_valid_config(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", main.recipes()[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.init.pretrained_backbone = ""  # the authors' download the recipe points at
    validate_config(config, num_devices=1)
    if name.endswith("_24gb"):  # the paper's batch of 8, in micro-batches
        assert config.batch_size == 8
