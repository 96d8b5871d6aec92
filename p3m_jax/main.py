"""Train or evaluate P3M-Net from an ml_collections config.

    python -m p3m_jax.main --config=configs/default.py --workdir=/tmp/p3m_quickstart
    python -m p3m_jax.main --config=configs/p3m10k_resnet34.py --workdir=gs://bucket/run \\
        --config.data.data_dir=gs://bucket/tensorflow_datasets --config.batch_size=64
    python -m p3m_jax.main --config=configs/default.py --workdir=/tmp/p3m_quickstart --mode=eval

Running the same command again resumes from the latest checkpoint in --workdir. Any config field
can be overridden with --config.<field>=<value>.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval"],
    "train (then score the test splits), or eval: score the test splits from a checkpoint.",
)
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "eval mode: which checkpoint of --workdir to score.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every save/read at INFO
    # Imported after flag parsing, so that `--help` and flag errors do not wait for JAX.
    from p3m_jax.common import compilation_cache  # pylint: disable=import-outside-toplevel
    from p3m_jax.train import loop  # pylint: disable=import-outside-toplevel
    from p3m_jax.train.checkpointing import CheckpointError  # pylint: disable=import-outside-toplevel
    from p3m_jax.train.workdir_lock import WorkdirLockedError  # pylint: disable=import-outside-toplevel

    compilation_cache.enable_unless_set(FLAGS.config.get("compilation_cache_dir", ""))

    try:
        if FLAGS.mode == "eval":
            loop.evaluate_workdir(FLAGS.config, FLAGS.workdir, which=FLAGS.checkpoint)
        else:
            loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (
        loop.ConfigError,
        loop.NonFiniteLossError,
        CheckpointError,
        WorkdirLockedError,
        FileNotFoundError,
        OSError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """`app.run(main)`, with a config override that names no field (``--config.nonexistent=1``)
    or cannot be parsed reported as one line (exit 1) instead of a traceback."""
    try:
        app.run(main)
    except (KeyError, AttributeError, ValueError, TypeError) as e:
        if FLAGS.is_parsed():  # raised by main, not while absl parsed the --config.* flags
            raise
        print(f"error: {_flag_error_text(e)}", file=sys.stderr)
        sys.exit(1)


def _flag_error_text(error: BaseException) -> str:
    """``--config.nonexistent: no such field in configs/default.py`` from the KeyError inside."""
    inner = error.args[0] if error.args else error
    field = str(inner.args[0] if isinstance(inner, BaseException) and inner.args else inner).strip("'\"")
    config_file = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "the config")
    flag = next((a.split("=", 1)[0] for a in sys.argv if a.startswith("--config.") and field in a), None)
    if flag is None:
        return f"cannot read the config or its overrides: {error}"
    return f"{flag}: no such field in {config_file}"


if __name__ == "__main__":
    run()
