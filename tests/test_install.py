"""p3m-jax as a user installs it: the wheel built from this checkout, installed in a fresh virtual
environment, used from a folder outside the checkout through its console scripts.

The fresh environment borrows the dependencies of the test environment (a ``.pth`` line) instead of
downloading them again; the package itself, its recipes and its commands come from the wheel only.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = (
    "p3m-train",
    "p3m-evaluate",
    "p3m-predict",
    "p3m-convert",
    "p3m-export",
    "p3m-demo",
    "p3m-build",
    "p3m-serve",
)
TFDS_NAME = "p3m10k/synthetic_64x64_12_2_2"

# What a quickstart-sized run may print on stderr: the progress lines of the synthetic build and of the
# test scoring. Anything else (a library warning, a deprecation, a traceback) fails the test.
ALLOWED_STDERR = re.compile(r"^[\w .-]+: \d+(/\d+)? \w+s, [\d.]+ \w+s/s$")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """The wheel of this checkout, built from a copy (a build leaves build/ and egg-info behind)."""
    source, out = tmp_path_factory.mktemp("source") / "p3m-jax", tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "workdir", "tests", "benchmarks")
    shutil.copytree(REPO, source, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        text=True,
        cwd=out,
    )
    (path,) = out.glob("p3m_jax-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> pathlib.Path:
    """A fresh virtual environment with the wheel installed; its bin folder."""
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The test environment's packages come after the venv's own site-packages: p3m_jax is the wheel's.
    pathlib.Path(site, "test_env_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the borrowed packages may hold p3m-jax too (a non-editable test install).
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--ignore-installed"]
        + [str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert (root / "bin" / "p3m-train").is_file() and (pathlib.Path(site) / "p3m_jax" / "main.py").is_file()
    return root / "bin"


def run(venv, command, *args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PATH=f"{venv}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run(
        [str(venv / command), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_wheel_holds_the_package_its_recipes_licence_dependencies_and_commands(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        scripts = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    for name in (
        "p3m_jax/main.py",
        "p3m_jax/configs/default.py",
        "p3m_jax/configs/p3m10k_vitae_s_cp.py",
        "p3m_jax/serve/index.html",
    ):
        assert name in names
    assert "tfds_p3m10k/checksums.tsv" in names and "tfds_p3m10k/CITATIONS.bib" in names
    assert not any("/dummy_data/" in n for n in names)  # the builder's test data stays in the checkout
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    for requirement in ("jax>=", "flax>=", "orbax-checkpoint>=", "tensorflow-datasets>=", "grain>="):
        assert f"Requires-Dist: {requirement}" in metadata
    assert 'Requires-Dist: torch==2.13.0; extra == "torch"' in metadata
    for command in COMMANDS:
        assert f"{command} = " in scripts


def test_every_command_answers_help_with_its_defaults_from_another_folder(venv, tmp_path):
    for command in COMMANDS:
        result = run(venv, command, "--help", cwd=tmp_path, timeout=120)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert "default" in result.stdout, command
    help_text = run(venv, "p3m-train", "--help", cwd=tmp_path).stdout
    assert "Recipes: default, finetune_folder, p3m10k," in help_text and "--print_config" in help_text
    config = run(venv, "p3m-train", "--config=p3m10k_swin_t", "--print_config", cwd=tmp_path)
    assert config.returncode == 0 and "arch: swin_t" in config.stdout


def test_the_installed_quickstart_trains_quietly_and_a_finished_run_is_left_alone(venv, tmp_path):
    """A quickstart-sized run from a folder outside the checkout, by recipe name: it trains, validates,
    saves and scores the test splits with nothing but progress lines on stderr; started again, it
    says the run is finished and does nothing; the evaluate command names the builds it finds."""
    workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
    args = [
        "--config=default",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.data.tfds_name={TFDS_NAME}",
        "--config.data.image_size=64",
        "--config.data.crop_sizes=(64,)",
        "--config.data.validation_count=2",
        "--config.batch_size=2",
        "--config.num_train_steps=2",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=2",
        "--config.eval.strategy=resize",  # the validation's network program scores the test splits too
        "--config.compilation_cache_dir=",
    ]
    first = run(venv, "p3m-train", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    unexpected = [line for line in first.stderr.splitlines() if line.strip() and not ALLOWED_STDERR.match(line)]
    assert not unexpected, "\n".join(unexpected)
    assert "test p3m_500_p @ step 2" in first.stdout and (workdir / "test_results.json").is_file()
    assert "compiling the train step on the first batch (seconds to minutes;" in first.stdout
    results = (workdir / "test_results.json").read_bytes()

    again = run(venv, "p3m-train", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds a finished run (step 2 of 2" in again.stdout and "--rescore" in again.stdout
    assert "step 1/" not in again.stdout and "test p3m_500_p" not in again.stdout
    assert (workdir / "test_results.json").read_bytes() == results  # not scored again

    wrong = run(venv, "p3m-evaluate", "--checkpoint", str(workdir), "--data_dir", str(data_dir), cwd=tmp_path)
    assert wrong.returncode == 2
    assert "p3m10k/default is not built" in wrong.stderr and "built there: synthetic_64x64_12_2_2" in wrong.stderr
