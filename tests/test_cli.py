"""One flag vocabulary across the commands: underscores, defaults in every help, and nothing else
accepted (the previous release's spellings are unknown flags, see CHANGELOG.md)."""

from __future__ import annotations

import logging

import pytest

from p3m_jax import convert, evaluate, main, predict
from p3m_jax.common import cli
from tfds_p3m10k import build


@pytest.mark.parametrize(
    "parse, expected",
    [
        (evaluate.parse_args, ["(default: hybrid)", "(default: 128)", "--release_dir", "--data_dir"]),
        (predict.parse_args, ["(default: hybrid)", "(default: 128)", "{resnet34,swin_t,vitae_s}"]),
        (build.parse_args, ["(default: default)", "--release_dir", "--tfds_config"]),
    ],
)
def test_help_exits_0_and_shows_the_defaults(parse, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # as one line: argparse wraps to the terminal
    for text in expected:
        assert text in out


@pytest.mark.parametrize(
    "parse, argv",
    [
        (convert.main, ["--arch", "resnet34", "--checkpoint", "x.pth", "--output", "o", "--backbone-only"]),
        (build.parse_args, ["--data_dir", "d", "--manual_dir", "m"]),
        (evaluate.parse_args, ["--checkpoint", "c", "--tfds_data_dir", "tfds"]),
    ],
)
def test_the_previous_releases_spellings_are_unknown_flags(parse, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_an_unknown_flag_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.parse_args(["--checkpoint", "c", "--input", "i", "--output", "o", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_evaluate_writes_its_results_and_pngs_into_output(capsys):
    args = evaluate.parse_args(["--checkpoint", "c", "--data_dir", "tfds", "--output", "out", "--save_png"])
    assert args.results_path.endswith("out/evaluation.json") and args.png_dir == "out"
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--checkpoint", "c", "--data_dir", "tfds", "--save_png"])  # no --output for the PNGs


def test_main_resolves_recipe_names_to_their_files():
    argv = main._resolve_recipes(["--config=p3m10k_swin_t", "--mode=eval"])
    assert argv == ["--config=" + main.recipes()["p3m10k_swin_t"], "--mode=eval"]
    with pytest.raises(FileNotFoundError, match="recipes: default, finetune_folder, p3m10k, p3m10k_resnet34"):
        main.resolve_config("p3m10k_resnet50")
    with pytest.raises(FileNotFoundError):
        main.resolve_config("configs/p3m10k_swin_t.py")  # the old in-checkout spelling


def test_progress_prints_plain_lines_when_stderr_is_not_a_terminal(capsys):
    assert list(cli.progress(range(5), desc="eval hybrid", unit="image", every_seconds=0.0)) == list(range(5))
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("eval hybrid: 5/5 images, ") and lines[-1].endswith(" images/s")
    assert all("\x1b" not in line and "\r" not in line for line in lines)


def test_routine_library_lines_are_dropped_inside_the_block_only(caplog):
    absl = logging.getLogger("absl")
    with caplog.at_level(logging.INFO, logger="absl"):
        with cli.routine_logs_quiet():
            absl.warning("Using custom data configuration: default")  # TFDS's line on every read
            absl.warning("a warning of its own")
            absl.error("Metadata file does not exist: but an ERROR")
        absl.warning("Using custom data configuration: default")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "a warning of its own",
        "Metadata file does not exist: but an ERROR",
        "Using custom data configuration: default",
    ]
