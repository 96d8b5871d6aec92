"""Train or evaluate P3M-Net from an ml_collections config.

    python -m p3m_jax.main --config=default --workdir=workdir/quickstart
    python -m p3m_jax.main --config=p3m10k_resnet34 --workdir=gs://bucket/run \\
        --config.data.data_dir=gs://bucket/tensorflow_datasets --config.batch_size=64
    python -m p3m_jax.main --config=default --workdir=workdir/quickstart --mode=eval
    python -m p3m_jax.main --config=default --print_config
    python -m p3m_jax.main --config=p3m10k_vitae_s --config.batch_size=64 --compile_for=v5litepod-8

`--config` is a recipe shipped in p3m_jax/configs (by name: default, p3m10k_resnet34, ...) or the path of
a config file of your own. Running the same command again resumes from the latest checkpoint in
--workdir; a run that already finished says so and does nothing (`--rescore` scores its test splits
again). Any config field can be overridden with --config.<field>=<value>; `--print_config` prints them
all with their values. `--compile_for=TYPE` plans a Cloud TPU run from this machine (libtpu: pip install
"p3m-jax[tpu]"): it compiles the train step for every chip of that slice and prints the memory per chip
against its HBM and a roofline estimate of the step; exit 0 when it fits, 1 (naming a setting that
fits) when it does not.
"""

from __future__ import annotations

import importlib.resources
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from p3m_jax.common import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "A recipe name (listed above) or the path of an ml_collections config file.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval"],
    "train (then score the test splits), or eval: score the test splits from a checkpoint.",
)
flags.DEFINE_enum("which_checkpoint", "best", ["best", "latest"], "eval mode: which checkpoint of --workdir to score.")
flags.DEFINE_bool("rescore", False, "A finished run started again scores its test splits again.")
flags.DEFINE_bool("print_config", False, "Print the config (after overrides) and exit; needs no --workdir.")
flags.DEFINE_string(
    "compile_for",
    None,
    "A Cloud TPU type (v5litepod-8, v5p-8, v6e-8, v4-32, ...) or topology (v5e:2x2): compile the train step for "
    "that slice ahead of time, print memory per chip and a roofline estimate, and exit; needs no --workdir.",
)

flags.mark_flag_as_required("config")

_HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")
_GIVEN_ARGV: list[str] = []  # the command line as typed, for messages (sys.argv gets the resolved paths)


# Recipes whose get_config takes the architecture after a colon (--config=finetune_folder:vitae_s).
ARCH_RECIPES = ("finetune_folder", "p3m10k")
ARCHITECTURE_NAMES = ("resnet34", "swin_t", "vitae_s")


def recipes() -> dict[str, str]:
    """The recipes shipped in the package: name -> file path."""
    folder = importlib.resources.files("p3m_jax.configs")
    return {
        entry.name[:-3]: os.fspath(entry)
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".py") and not entry.name.startswith("_")
    }


def resolve_config(value: str) -> str:
    """``--config``'s value as a file path: a file that exists, else a shipped recipe by its name. Raises
    FileNotFoundError naming the recipes when it is neither, ValueError for a recipe argument that is no
    architecture."""
    path, colon, argument = value.partition(":")
    if os.path.isfile(path):
        return value
    name = os.path.basename(path)[:-3] if path.endswith(".py") else path
    known = recipes()
    if name in known and not os.path.dirname(path):
        if name in ARCH_RECIPES and colon and argument not in ARCHITECTURE_NAMES:
            raise ValueError(
                f"--config={value}: the argument after the colon is the architecture, one of "
                f"{', '.join(ARCHITECTURE_NAMES)} (e.g. --config={name}:vitae_s)"
            )
        return known[name] + colon + argument
    raise FileNotFoundError(f"--config={value}: no such file and no recipe of that name (recipes: {', '.join(known)})")


def _resolve_recipes(argv: list[str]) -> list[str]:
    """``argv`` with a recipe name given to ``--config=`` replaced by its file's path."""
    out = []
    for token in argv:
        name, eq, value = token.partition("=")
        out.append("--config=" + resolve_config(value) if name == "--config" and eq else token)
    return out


def _usage() -> str:
    module_flags = FLAGS.module_help(sys.modules[__name__]) or FLAGS.module_help("p3m_jax.main")
    names = ", ".join(recipes())
    return (
        f"{__doc__}\nRecipes: {names}.\n"
        f"{' and '.join(ARCH_RECIPES)} take the architecture after a colon, one of {', '.join(ARCHITECTURE_NAMES)} "
        f"(--config={ARCH_RECIPES[0]}:vitae_s; {ARCHITECTURE_NAMES[0]} without one).\n"
        f"The config fields and their values: python -m p3m_jax.main --config=RECIPE --print_config\n\n"
        f"Flags:\n{module_flags}\n"
    )


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.print_config:
        print(FLAGS.config)
        return 0
    if FLAGS.compile_for:
        return _compile_for(FLAGS.config, FLAGS.compile_for)
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every save/read at INFO
    with cli.routine_logs_quiet():
        return _train_or_evaluate()


def _train_or_evaluate() -> int:
    """Trains (or with --mode=eval, evaluates) --config in --workdir; 1 with one error line when it cannot."""
    # Imported after flag parsing, so that `--help` and flag errors do not wait for JAX.
    from p3m_jax.common import compilation_cache  # pylint: disable=import-outside-toplevel
    from p3m_jax.train import loop  # pylint: disable=import-outside-toplevel
    from p3m_jax.train.checkpointing import CheckpointError  # pylint: disable=import-outside-toplevel
    from p3m_jax.train.workdir_lock import WorkdirLockedError  # pylint: disable=import-outside-toplevel

    compilation_cache.enable_unless_set(FLAGS.config.compilation_cache_dir)

    try:
        if FLAGS.mode == "eval":
            loop.evaluate_workdir(FLAGS.config, FLAGS.workdir, which=FLAGS.which_checkpoint)
        else:
            loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, rescore=FLAGS.rescore)
    except (
        loop.ConfigError,
        loop.MemoryPlanError,
        loop.NonFiniteLossError,
        CheckpointError,
        WorkdirLockedError,
        FileNotFoundError,
        OSError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _compile_for(config, target_name: str) -> int:
    """``--compile_for``: the plan of ``config`` on a Cloud TPU slice; 0 when it fits, 1 otherwise."""
    from p3m_jax.train import tpu_plan  # pylint: disable=import-outside-toplevel

    try:
        target = tpu_plan.parse_target(target_name)
        with cli.routine_logs_quiet():
            return tpu_plan.plan_for(config, target)
    except (tpu_plan.TargetError, tpu_plan.ConfigError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run() -> None:
    """`app.run(main)`, with ``--help`` answered on stdout (exit 0), recipe names resolved, and a
    config override that names no field (``--config.nonexistent=1``) or cannot be parsed reported as one
    line (exit 1) instead of a traceback."""
    if any(arg in _HELP_FLAGS for arg in sys.argv[1:]):
        print(_usage())
        sys.exit(0)
    _GIVEN_ARGV[:] = sys.argv[1:]
    try:
        sys.argv[1:] = _resolve_recipes(sys.argv[1:])
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    try:
        app.run(main)
    except (KeyError, AttributeError, ValueError, TypeError) as e:
        if FLAGS.is_parsed():  # raised by main, not while absl parsed the --config.* flags
            raise
        print(f"error: {_flag_error_text(e)}", file=sys.stderr)
        sys.exit(1)


def _flag_error_text(error: BaseException) -> str:
    """``--config.nonexistent: no such field in default`` from the KeyError inside."""
    inner = error.args[0] if error.args else error
    # ml_collections' KeyError text is "'field'" then, on a second line, a "Did you mean ...?" hint.
    text = str(inner.args[0] if isinstance(inner, BaseException) and inner.args else inner)
    first, _, hint = text.partition("\n")
    field = first.strip("'\"")
    argv = _GIVEN_ARGV or sys.argv[1:]
    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "the config")
    flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.") and field in a), None)
    if flag is None:
        return f"cannot read the config or its overrides: {' '.join(text.split())}"
    return f"{flag}: no such field in {config_file}" + (f"; {hint.strip()}" if hint.strip() else "")


if __name__ == "__main__":
    run()
