"""analysis/sweep.py under stress: stop signals, a second sweep on the same directory, a stale attempt, bad grids,
bad model_args and a failing lm-eval, each reported as one line."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from l2pd_harness.lm_eval_tasks import known_tasks

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "analysis"))

import sweep  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds child processes through /proc")

TINY_GRID = """tasks: [arith]
limit: 2
batch_size: 2
model_args: {gen_length: 32, block_length: 32}
grid:
  - {policy: fixed, steps: 32}
"""
TINY_RUN = "gen_length-32_block_length-32_policy-fixed_steps-32"
DECODER = {"model": "sha256:0123456789abcdef", "filter": None, "settings": {"policy": "fixed", "steps": 256}}
"""What decides the outputs of the in-process tests' one configuration (``policy-fixed``)."""


def children_of(pid: int, naming: str = "") -> list[int]:
    """PIDs whose parent is ``pid`` (field 4 of ``/proc/<pid>/stat``, after the parenthesised command name) and
    whose command line holds ``naming``."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):  # the process ended while we looked
            continue
        if int(parent) == pid and state != "Z" and naming in command:
            kids.append(int(stat.parent.name))
    return kids


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def fake_lm_eval(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    """Run ``python -c code OUT_DIR`` in place of lm-eval."""
    monkeypatch.setattr(sweep, "lm_eval_command", lambda spec, model_args, out_dir: [
        sys.executable, "-c", code, str(out_dir)])


def one_line_error(capsys: pytest.CaptureFixture, status: int, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(argv)
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sweep.py: error: "), err
    return err


@pytest.fixture()
def grid(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(TINY_GRID)
    return path


@pytest.mark.slow
def test_sigterm_stops_the_lm_eval_child_and_frees_the_configuration(grid: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(REPO / "analysis" / "sweep.py"), str(grid), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: list[int] = []
    try:
        children = wait_for(lambda: children_of(process.pid), 120, "the sweep to start lm-eval")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        wait_for(lambda: not any(map(alive, children)), 5, f"lm-eval {children} to exit")
    finally:
        for pid in [*children, process.pid]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)
    assert process.returncode == 128 + signal.SIGTERM
    assert err == (f"sweep.py: error: stopped by SIGTERM during configuration {TINY_RUN!r}, which has no results: "
                   "rerunning the same command redoes it\n")
    run_dir = out / TINY_RUN
    assert not list(run_dir.glob("*/results_*.json"))
    assert not (run_dir / sweep.LOCK_NAME).exists()
    with sweep.configuration_lock(run_dir):  # a rerun takes the configuration
        pass


def test_sigint_stops_the_child_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          request: pytest.FixtureRequest) -> None:
    # A suite started in the background (`cmd &`) inherits SIGINT ignored, which the sweep rightly leaves alone.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, inherited))
    fake_lm_eval(monkeypatch, "import time; time.sleep(60)")
    children: list[int] = []

    def interrupt_once_started() -> None:
        # Only the fake lm-eval (its output directory is under tmp_path): a pytest-xdist worker may hold other
        # children, and signalling before the sweep's handler is in place would end the test, not the sweep.
        children.extend(wait_for(lambda: children_of(os.getpid(), str(tmp_path)), 30, "the fake lm-eval"))
        os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=interrupt_once_started)
    thread.start()
    started = time.monotonic()
    with pytest.raises(sweep.SweepError) as error:
        sweep.sweep({"tasks": ["arith"]}, [{"policy": "fixed"}], [DECODER], tmp_path)
    thread.join()
    assert time.monotonic() - started < 20
    assert error.value.status == 128 + signal.SIGINT
    assert str(error.value) == ("stopped by SIGINT during configuration 'policy-fixed', which has no results: "
                                "rerunning the same command redoes it")
    assert children and not any(map(alive, children))
    assert signal.getsignal(signal.SIGINT) is handler  # the sweep's handler is gone


def test_a_configuration_in_progress_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_lm_eval(monkeypatch, "raise SystemExit('must not run')")
    run_dir = tmp_path / "policy-fixed"
    run_dir.mkdir()
    (run_dir / "steps_rank0_1.jsonl").write_text("{}\n")  # the running sweep's log, which must stay
    with (run_dir / sweep.LOCK_NAME).open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        with pytest.raises(sweep.SweepError) as error:
            sweep.sweep({"tasks": ["arith"]}, [{"policy": "fixed"}], [DECODER], tmp_path)
    assert error.value.status == 1
    assert str(error.value) == (f"configuration 'policy-fixed' is being run by another sweep (PID 4242, or its "
                                f"lm-eval child): {str(run_dir / sweep.LOCK_NAME)!r} is locked; wait for it to "
                                "finish or stop it")
    assert sorted(p.name for p in run_dir.iterdir()) == ["steps_rank0_1.jsonl", sweep.LOCK_NAME]


def test_a_stale_lock_is_taken_over_and_the_partial_attempt_cleared(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake lm-eval records what it finds (the directory, the lock's PID), then writes a result.
    fake_lm_eval(monkeypatch, "import os, sys, pathlib; d = pathlib.Path(sys.argv[1]); "
                              "print(sorted(p.name for p in d.iterdir()), (d / 'sweep.lock').read_text().strip() "
                              "== str(os.getppid())); (d / 'm').mkdir(); (d / 'm' / 'results_1.json').write_text('{}')")
    run_dir = tmp_path / "policy-fixed"
    (run_dir / "model").mkdir(parents=True)
    for name in ("steps_rank0_1.jsonl", ".steps_rank0_1.jsonl.x1.partial", "lm_eval.log", "model/samples_a.jsonl"):
        (run_dir / name).write_text("from the crashed attempt\n")
    (run_dir / sweep.LOCK_NAME).write_text("999999999\n")  # a sweep that died without removing its lock
    sweep.sweep({"tasks": ["arith"]}, [{"policy": "fixed"}], [DECODER], tmp_path)
    assert (run_dir / sweep.LOG_NAME).read_text() == "['decoded_with.json', 'lm_eval.log', 'sweep.lock'] True\n"
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == [
        "decoded_with.json", "lm_eval.log", "m", "m/results_1.json"]
    assert json.loads((run_dir / sweep.DECODED_WITH_NAME).read_text()) == DECODER
    sweep.sweep({"tasks": ["arith"]}, [{"policy": "fixed"}], [DECODER], tmp_path)  # done: skipped, log kept
    assert (run_dir / sweep.LOG_NAME).read_text() == "['decoded_with.json', 'lm_eval.log', 'sweep.lock'] True\n"


@pytest.mark.parametrize(("recorded", "difference"), [
    (None, f"holds results but no {sweep.DECODED_WITH_NAME} (written by sweeps since 2026-12-07), so what "
           "decoded them is unknown"),
    ({**DECODER, "model": "sha256:fedcba9876543210"},
     "holds results decoded with something else (there -> now: model: 'sha256:fedcba9876543210' -> "
     "'sha256:0123456789abcdef')"),
    ({**DECODER, "settings": {"policy": "fixed", "steps": 64, "eotp_mode": "fill"}},
     "holds results decoded with something else (there -> now: setting eotp_mode: 'fill' -> absent; setting steps: "
     "64 -> 256)"),
])
def test_results_of_another_decoder_stop_the_sweep_before_any_launch(
        recorded: dict | None, difference: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_lm_eval(monkeypatch, "raise SystemExit('lm-eval launched')")
    for name in ("policy-a", "policy-fixed"):  # policy-a has no results yet: nothing runs before the check
        (tmp_path / name).mkdir()
    run_dir = tmp_path / "policy-fixed"
    (run_dir / "m").mkdir()
    (run_dir / "m" / "results_1.json").write_text("{}")
    if recorded is not None:
        (run_dir / sweep.DECODED_WITH_NAME).write_text(json.dumps(recorded))
    with pytest.raises(sweep.SweepError) as error:
        sweep.sweep({"tasks": ["arith"]}, [{"policy": "a"}, {"policy": "fixed"}], [DECODER, DECODER], tmp_path)
    assert str(error.value) == (f"configuration 'policy-fixed' {difference}: use another --out, or move "
                                f"{str(run_dir)!r} away to decode it again")
    assert not list((tmp_path / "policy-a").iterdir())
    assert (run_dir / "m" / "results_1.json").read_text() == "{}"


def test_a_failing_lm_eval_is_one_line_naming_its_log(grid: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    fake_lm_eval(monkeypatch, "import sys; print('starting'); sys.exit('ValueError: Tasks not found: arith')")
    err = one_line_error(capsys, 1, [str(grid), "--out", str(tmp_path / "out")])
    log = tmp_path / "out" / TINY_RUN / sweep.LOG_NAME
    assert err == (f"sweep.py: error: configuration {TINY_RUN!r}: lm-eval exited with code 1 (last line: "
                   f"'ValueError: Tasks not found: arith'); its log: {str(log)!r}\n")
    assert log.read_text() == "starting\nValueError: Tasks not found: arith\n"
    assert not (log.parent / sweep.LOCK_NAME).exists()


@pytest.mark.parametrize(("line", "message"), [
    ("  - {policy: nonsense}", "policy='nonsense' is not one of ['fixed', "),
    ("  - {policy: threshold, threshold: [0.9, abc]}", "threshold='abc' is not a number"),
    ("  - {policy: fixed, stepz: 8}", "unknown model_args ['stepz']"),
])
def test_bad_model_args_are_refused_before_any_launch(line: str, message: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(TINY_GRID + line + "\n")  # the first configuration is good: the whole grid is checked first

    def no_launch(*args, **kwargs):
        raise AssertionError("lm-eval launched")

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    err = one_line_error(capsys, 2, [str(grid), "--out", str(tmp_path / "out")])
    assert err.startswith(f"sweep.py: error: grid {str(grid)!r}, configuration gen_length-32_block_length-32_"), err
    assert f": {message}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("tasks: [arith\ngrid: []\n", "is not valid YAML: expected ',' or ']', but got ':' (while parsing a flow "
                                  "sequence) at line 2, column 5"),
    ("- arith\n", "holds a YAML list, expected a mapping with keys ['tasks', 'grid', 'limit', 'batch_size', "
                  "'model_args']"),
    ("tasks: [arith]\n", "lacks the keys ['grid']"),
    ("tasks: [arith]\nlimt: 2\ngrid: [{policy: fixed}]\n", "has unknown keys ['limt']"),
    ("tasks: arith\ngrid: [{policy: fixed}]\n", "tasks 'arith' is not a list of task names"),
    ("tasks: [arith]\nbatch_size: 0.5\ngrid: [{policy: fixed}]\n", "batch_size 0.5 is not a positive integer"),
    ("tasks: [arith, foo]\ngrid: [{policy: fixed}]\n", "unknown tasks ['foo'] (tasks and tags of "),
    ("tasks: [arith]\nlimit: .nan\ngrid: [{policy: fixed}]\n", "limit nan is not a positive integer"),
    ("tasks: [arith]\nlimit: .inf\ngrid: [{policy: fixed}]\n", "limit inf is not a positive integer"),
    ("tasks: [arith]\nlimit: 1.5\ngrid: [{policy: fixed}]\n", "limit 1.5 is not a positive integer"),
    ("tasks: [arith]\ngrid: [policy-fixed]\n", "grid entry 1 is a YAML str ('policy-fixed'), expected a mapping"),
    ("tasks: [arith]\ngrid: [{policy: fixed, steps: []}]\n", "grid entry 1: steps is an empty list"),
    ("tasks: [arith]\ngrid: [{policy: fixed, steps: {a: 1}}]\n", "grid entry 1: steps {'a': 1} is not a value"),
    ("tasks: [arith]\nmodel_args: {pretrained: 'a,b'}\ngrid: [{policy: fixed}]\n",
     "model_args: pretrained 'a,b' is not a value lm-eval's --model_args can carry"),
    ("tasks: [arith]\ngrid: [{policy: fixed, log_dir: x}]\n", "grid entry 1: log_dir is set by the sweep"),
])
def test_a_bad_grid_is_one_line(text: str, message: str, tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    with pytest.raises(sweep.FileFormatError) as error:
        sweep.read_grid(grid)
    assert str(error.value).startswith(f"grid {str(grid)!r}")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_the_cli_reports_a_bad_grid_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text("tasks: [arith]\ngrid:\n  - {policy: fixed\n")
    err = one_line_error(capsys, 2, [str(grid), "--out", str(tmp_path / "out")])
    assert err.startswith(f"sweep.py: error: grid {str(grid)!r} is not valid YAML: ") and "at line 4" in err
    err = one_line_error(capsys, 2, [str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")])
    assert err == f"sweep.py: error: grid {str(tmp_path / 'missing.yaml')!r} does not exist\n"


def test_the_shipped_tasks_and_their_tag_are_known() -> None:
    assert {"arith", "listops", "gsm8k_local", "l2pd"} <= known_tasks()


@pytest.mark.parametrize(("out_name", "message"), [
    ("a-file", "--out {out!r} is a file, expected a directory"),
    ("a-file/out", "--out {out!r} cannot be created: {file!r} is a file"),
])
def test_an_unwritable_out_is_one_line(out_name: str, message: str, grid: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    fake_lm_eval(monkeypatch, "raise SystemExit('lm-eval launched')")
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / out_name
    err = one_line_error(capsys, 2, [str(grid), "--out", str(out)])
    assert err == "sweep.py: error: " + message.format(out=str(out), file=str(tmp_path / "a-file")) + "\n"
