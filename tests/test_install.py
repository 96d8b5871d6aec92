"""p3m-jax as a user installs it: the wheel built from this checkout, installed in a fresh virtual
environment that resolves the wheel's own dependencies at the lock's versions (nothing borrowed from the
test environment), used from a folder outside the checkout through its console scripts. A dependency
missing from the wheel's metadata fails here: an import, a command or ``pip check``. The ``export`` extra
is installed in a second fresh environment and exports a model.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # builds the wheel and installs it into fresh environments

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


def fresh_venv(root: pathlib.Path, requirement: str) -> pathlib.Path:
    """A new virtual environment where pip installs ``requirement`` and resolves its dependencies under
    the lock's versions; its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    install = subprocess.run(
        [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(REPO / "requirements.lock")]
        + [requirement],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return root / "bin"


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> pathlib.Path:
    """A fresh virtual environment with the wheel and its dependencies (no extra) installed."""
    bin_dir = fresh_venv(tmp_path_factory.mktemp("venv") / "env", str(wheel))
    assert (bin_dir / "p3m-train").is_file()
    return bin_dir


@pytest.fixture(scope="module")
def borrowing_venv(wheel, tmp_path_factory) -> pathlib.Path:
    """A fresh virtual environment holding the wheel, whose dependencies and extras are the test
    environment's (a ``.pth`` line after its own site-packages): for tests/test_docs_commands.py, whose
    documented commands use every extra (pytest, onnx, rembg, torch). Its bin folder."""
    root = tmp_path_factory.mktemp("borrowing") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    pathlib.Path(site, "test_env_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the borrowed packages may hold p3m-jax too (a non-editable test install).
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--ignore-installed"]
        + [str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    return root / "bin"


# The modules that need an extra, and the package whose absence they report without it.
EXTRA_MODULES = {
    "p3m_jax.serve.app": "fastapi",
    "p3m_jax.inference.onnx_pooling": "onnx_ir",  # jax2onnx's own dependency, imported first
}


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
    # The builder's test data and tests stay in the checkout.
    assert not any("/dummy_data/" in n or n.endswith("_test.py") or "/tests/" in n for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    for requirement in ("jax>=", "flax>=", "orbax-checkpoint>=", "tensorflow-datasets>=", "grain>="):
        assert f"Requires-Dist: {requirement}" in metadata
    assert 'Requires-Dist: torch==2.13.0; extra == "torch"' in metadata
    for command in COMMANDS:
        assert f"{command} = " in scripts


def test_the_fresh_environment_is_consistent_and_imports_every_module(venv, tmp_path):
    """Every module of the wheel imports with the base dependencies alone, but for those of an extra,
    which name the package it needs; pip finds no broken requirement."""
    check = run(venv, "python", "-m", "pip", "check", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    script = (
        "import importlib, json, pkgutil, p3m_jax, tfds_p3m10k\n"
        "failed = {}\n"
        "for package in (p3m_jax, tfds_p3m10k):\n"
        "    for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        if info.name.endswith('__main__'):\n"
        "            continue\n"
        "        try:\n"
        "            importlib.import_module(info.name)\n"
        "        except ImportError as error:\n"
        "            failed[info.name] = getattr(error, 'name', None) or str(error)\n"
        "print(json.dumps(failed))\n"
    )
    result = run(venv, "python", "-c", script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert {name: package.split(".")[0] for name, package in failed.items()} == EXTRA_MODULES


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

    # The trained weights cut out a photo with estimated colours (pymatting), from the installed command.
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(photo)
    cutout = run(
        venv, "p3m-predict", "--checkpoint", str(workdir), "--input", str(photo), "--output", str(tmp_path / "out"),
        "--strategy", "resize", "--foreground", "estimate", "--background", "white", cwd=tmp_path,
    )  # fmt: skip
    assert cutout.returncode == 0, cutout.stderr[-3000:]
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "photo_alpha.png",
        "photo_rgba.png",
        "photo_composite.png",
    }

    wrong = run(venv, "p3m-evaluate", "--checkpoint", str(workdir), "--data_dir", str(data_dir), cwd=tmp_path)
    assert wrong.returncode == 2
    assert "p3m10k/default is not built" in wrong.stderr and "built there: synthetic_64x64_12_2_2" in wrong.stderr


def test_the_export_extra_installs_and_exports_an_onnx_file(wheel, tmp_path):
    """A second fresh environment with the ``export`` extra: the ONNX export command runs there."""
    from p3m_jax.inference.predictor import Predictor

    bin_dir = fresh_venv(tmp_path / "env", f"p3m-jax[export] @ {wheel.as_uri()}")
    checkpoint = Predictor.random("resnet34", seed=0).save(tmp_path / "ckpt")
    output = tmp_path / "models" / "p3m.onnx"
    args = ["--checkpoint", str(checkpoint), "--format", "onnx", "--size", "64x64", "--output", str(output)]
    result = run(bin_dir, "p3m-export", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    check = run(
        bin_dir, "python", "-c", f"import onnx; onnx.checker.check_model({str(output)!r}); print('ok')", cwd=tmp_path
    )
    assert check.stdout.strip().endswith("ok"), check.stderr[-2000:]
