"""The device suite's turns: benchmark processes compile side by side, then time one at a time."""

import json
import pathlib
import sys
import textwrap

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1]

import device_scheduler  # noqa: E402  (a script of benchmarks/, on the path by conftest.py)

# A stand-in benchmark: "compiles" for a while, then records when its device work ran.
JOB = textwrap.dedent("""
    import json, sys, time
    from device_turns import end_device_turn, wait_for_device_turn
    compile_s, device_s, record = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    began = time.time()
    time.sleep(compile_s)
    compiled = time.time()
    wait_for_device_turn(poll_s=0.02)
    start = time.time()
    time.sleep(device_s)
    end = time.time()
    end_device_turn()
    with open(record, "w") as f:
        json.dump({"began": began, "compiled": compiled, "start": start, "end": end}, f)
""")


def _group(tmp_path, budget=120.0, **turns):
    out = tmp_path / "out"
    out.mkdir()
    suite = device_scheduler.Suite(out, budget)
    return suite, device_scheduler.TurnGroup(suite, tmp_path / "turns", **turns)


def _add(group, tmp_path, name, compile_s, device_s=0.3, compiles=True, turn_limit=90):
    record = tmp_path / f"{name}.json"
    group.add(
        name,
        [sys.executable, "-c", JOB, str(compile_s), str(device_s), str(record)],
        {"PYTHONPATH": str(BENCHMARKS)},
        record,
        compiles=compiles,
        turn_limit=turn_limit,
    )
    return record


def test_jobs_compile_together_then_take_turns_in_order(tmp_path):
    suite, group = _group(tmp_path)
    # The first job compiles longest: turns still follow the order of `add`, and none starts
    # before every job has compiled.
    records = [
        _add(group, tmp_path, name, seconds) for name, seconds in (("slow", 1.5), ("fast", 0.1), ("middle", 0.7))
    ]
    waiter = _add(group, tmp_path, "waiter", 0.0, compiles=False)
    group.run(compile_limit=60)

    runs = [json.loads(r.read_text()) for r in records + [waiter]]
    last_compiled = max(r["compiled"] for r in runs)
    assert all(r["start"] >= last_compiled for r in runs)
    for before, after in zip(runs, runs[1:]):
        assert after["start"] >= before["end"], "two jobs used the device at once"
    assert [name for name, state in suite.status] == ["slow", "fast", "middle", "waiter"]
    assert all(state.startswith("ok") for _, state in suite.status), suite.status
    # Each job's rows (its JSON) land in results.json.
    saved = json.loads((suite.out / "results.json").read_text())
    assert set(saved["slow"]) == {"began", "compiled", "start", "end"}


def test_at_most_parallel_compiles_jobs_compile_at_once(tmp_path):
    suite, group = _group(tmp_path)
    first = _add(group, tmp_path, "a", 1.5, device_s=0.05)
    waiter = _add(group, tmp_path, "waiter", 0.0, device_s=0.05, compiles=False)
    records = [first] + [_add(group, tmp_path, name, 1.5, device_s=0.05) for name in ("b", "c")]
    group.run(compile_limit=60, parallel_compiles=1)

    runs = [json.loads(r.read_text()) for r in records]
    for before, after in zip(runs, runs[1:]):
        assert after["began"] >= before["compiled"], "two jobs compiled at once"
    # A job that only waits for its turn takes no compile slot: it starts beside the first.
    assert json.loads(waiter.read_text())["began"] < runs[0]["compiled"]
    assert all(state.startswith("ok") for _, state in suite.status), suite.status


def test_jobs_not_started_by_the_compile_limit_are_reported(tmp_path):
    suite, group = _group(tmp_path)
    _add(group, tmp_path, "long", 300)
    _add(group, tmp_path, "queued", 0.1)
    group.run(compile_limit=6, parallel_compiles=1)

    states = dict(suite.status)
    assert states["long"] == "stopped: still compiling at the compile limit"
    assert states["queued"] == "not started: the compile limit came first"


def test_a_job_still_compiling_at_the_limit_is_stopped_and_the_rest_run(tmp_path):
    suite, group = _group(tmp_path)
    stuck = _add(group, tmp_path, "stuck", 300)
    done = _add(group, tmp_path, "done", 0.1)
    group.run(compile_limit=12)  # "done" must have imported jax and compiled by then

    states = dict(suite.status)
    assert states["stuck"] == "stopped: still compiling at the compile limit"
    assert states["done"].startswith("ok")
    assert not stuck.exists() and done.exists()
    assert "stuck" not in json.loads((suite.out / "results.json").read_text())


def test_turns_that_no_longer_fit_the_budget_are_skipped(tmp_path):
    suite, group = _group(tmp_path, budget=20, min_turn_s=2, reserve_s=1)
    # The first turn overruns what is left; the second no longer fits and is skipped, not started.
    _add(group, tmp_path, "first", 0.1, device_s=30, turn_limit=60)
    late = _add(group, tmp_path, "late", 0.1)
    group.run(compile_limit=15)

    states = dict(suite.status)
    assert states["first"].startswith("stopped: its turn passed")
    assert states["late"] == "skipped (time)"
    assert not late.exists()


def test_turn_calls_do_nothing_outside_the_suite(monkeypatch, tmp_path):
    from device_turns import TURN_DIR_ENV, end_device_turn, wait_for_device_turn

    monkeypatch.delenv(TURN_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    wait_for_device_turn()  # returns at once
    end_device_turn()
    assert list(tmp_path.iterdir()) == []
