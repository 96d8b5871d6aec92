"""One flag vocabulary across the commands: underscores, defaults in every help, and the previous
release's spellings still accepted with one deprecation line each."""

from __future__ import annotations

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


def test_convert_accepts_its_old_dashed_flags_with_a_deprecation_line(tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    code = convert.main(
        ["--arch", "resnet34", "--torch-checkpoint", str(missing), "--backbone-only", "--output", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 1 and str(missing) in err  # the old flags reached the converter, which found no file
    assert "deprecated: --torch-checkpoint is now --checkpoint" in err
    assert "deprecated: --backbone-only is now --backbone_only" in err
    assert not (tmp_path / "o").exists()


def test_an_unknown_flag_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.parse_args(["--checkpoint", "c", "--input", "i", "--output", "o", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_evaluate_reads_the_previous_forms_of_its_flags(tmp_path, capsys):
    release = tmp_path / "release"
    (release / "P3M-10k").mkdir(parents=True)
    args = evaluate.parse_args(["--checkpoint", "c", "--data_dir", str(release), "--output", str(tmp_path / "r.json")])
    assert args.release_dir == str(release) and args.data_dir is None
    assert args.results_path == str(tmp_path / "r.json")
    args = evaluate.parse_args(["--checkpoint", "c", "--tfds_data_dir", "tfds", "--save_png", str(tmp_path / "png")])
    assert args.data_dir == "tfds" and args.png_dir == str(tmp_path / "png")
    err = capsys.readouterr().err
    for old in (
        "--data_dir for a release-layout folder",
        "--output",
        "--tfds_data_dir is now --data_dir",
        "--save_png",
    ):
        assert f"deprecated: {old}" in err

    args = evaluate.parse_args(["--checkpoint", "c", "--data_dir", "tfds", "--output", "out", "--save_png"])
    assert args.results_path.endswith("out/evaluation.json") and args.png_dir == "out"
    assert capsys.readouterr().err == ""  # the current forms print nothing
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--checkpoint", "c", "--data_dir", "tfds", "--save_png"])  # no --output for the PNGs


def test_build_reads_manual_dir_and_config_as_release_dir_and_tfds_config(capsys):
    args = build.parse_args(["--data_dir", "d", "--manual_dir", "m", "--config=estimate_fg_bg"])
    assert (args.release_dir, args.tfds_config) == ("m", "estimate_fg_bg")
    err = capsys.readouterr().err
    assert "deprecated: --manual_dir is now --release_dir" in err
    assert "deprecated: --config is now --tfds_config" in err


def test_main_translates_the_old_checkpoint_flag_and_recipe_paths(capsys):
    argv = main._translate_argv(["--checkpoint=latest", "--config=configs/p3m10k_swin_t.py:x", "--mode=eval"])
    assert argv[0] == "--which_checkpoint=latest" and argv[2] == "--mode=eval"
    assert argv[1] == "--config=" + main.recipes()["p3m10k_swin_t"] + ":x"
    err = capsys.readouterr().err
    assert "deprecated: --checkpoint=best|latest is now --which_checkpoint" in err
    assert "say --config=p3m10k_swin_t" in err
    assert main._translate_argv(["--config=default"]) == ["--config=" + main.recipes()["default"]]
    with pytest.raises(FileNotFoundError, match="recipes: default, finetune_folder, p3m10k, p3m10k_resnet34"):
        main.resolve_config("p3m10k_resnet50")


def test_progress_prints_plain_lines_when_stderr_is_not_a_terminal(capsys):
    assert list(cli.progress(range(5), desc="eval hybrid", unit="image", every_seconds=0.0)) == list(range(5))
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("eval hybrid: 5/5 images, ") and lines[-1].endswith(" images/s")
    assert all("\x1b" not in line and "\r" not in line for line in lines)
