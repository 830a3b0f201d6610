"""analysis/: loading recorded lm-eval runs, the counting rule, baseline ratios, Pareto frontier and AUP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from l2pd_harness.filter.model import DEFAULT_FILTER, filter_fingerprint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "analysis"))

import pareto  # noqa: E402
import sweep  # noqa: E402

SETTINGS = {"policy": "fixed", "threshold": 0.9, "factor": 1.0, "eotp": False, "cache": "none", "gen_length": 64,
            "steps": 64, "accept_threshold": 0.5}


def write_run(root: Path, name: str, settings: dict, accuracy: float, steps: list[dict]) -> None:
    """A recorded run as lm-eval and the l2pd model leave it: results JSON one level down, step logs beside."""
    run = root / name
    (run / "model").mkdir(parents=True)
    results = {"results": {"arith": {"exact_match,strict-match": accuracy, "exact_match_stderr,strict-match": 0.05}},
               "config": {"l2pd_settings": {**SETTINGS, **settings}}}
    (run / "model" / "results_2026.json").write_text(json.dumps(results))
    (run / "steps_rank0_2026.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))


def step(doc_id: int, nfe: int, committed: int, generated: int, latency: float, finished_at: float) -> dict:
    return {"task": "arith", "doc_id": doc_id, "repeat": 0, "nfe": nfe, "tokens_per_step": [committed // nfe] * nfe,
            "positions_per_step": [64 + 8] * nfe, "latency_s": latency, "prompt_tokens": 8,
            "generated_tokens": generated, "finished_at": finished_at}


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    write_run(tmp_path, "base", {"policy": "fixed"}, 0.80,
              [step(0, 64, 64, 20, 2.0, 102.0), step(1, 64, 64, 30, 3.0, 103.0)])
    write_run(tmp_path, "fast", {"policy": "threshold", "eotp": True}, 0.78,
              [step(0, 8, 32, 20, 0.5, 200.5), step(1, 8, 32, 30, 0.5, 201.0)])
    write_run(tmp_path, "faster", {"policy": "threshold", "eotp": True, "threshold": 0.5}, 0.70,
              [step(0, 4, 32, 20, 0.25, 300.25), step(1, 4, 32, 30, 0.25, 300.5)])
    return tmp_path


def test_load_runs_applies_the_counting_rule(runs: Path) -> None:
    frame = pareto.load_runs(runs).set_index("run")
    base, fast = frame.loc["base"], frame.loc["fast"]
    assert base["accuracy"] == pytest.approx(80.0) and base["accuracy_stderr"] == pytest.approx(5.0)
    assert base["mean_nfe"] == 64 and base["tokens_per_forward"] == 1.0
    assert base["wall_s"] == pytest.approx(3.0)  # first start 100.0 (102 - 2) to last end 103.0
    assert base["tokens_per_s"] == pytest.approx(50 / 3.0)
    assert fast["tokens_per_forward"] == 4.0 and fast["wall_s"] == pytest.approx(1.0)
    assert fast["nfe_speedup"] == pytest.approx(8.0) and fast["time_speedup"] == pytest.approx(50 / (50 / 3))
    assert fast["accuracy_delta"] == pytest.approx(-2.0)
    assert (fast["family"], fast["knob"]) == ("threshold+eotp", "threshold 0.9")


def test_pareto_frontier_by_hand() -> None:
    x = pd.Series([1.0, 4.0, 8.0, 2.0])
    y = pd.Series([80.0, 78.0, 70.0, 75.0])  # (2, 75) is beaten by (4, 78)
    assert pareto.pareto_mask(x, y).tolist() == [True, True, True, False]


def test_aup_by_hand() -> None:
    # Sorted by rho: (1, 80), (2, 78), (4, 70); 70 is more than 5 points below 80, so it is dropped.
    expected = 1 * 80 + 0.5 * (2 - 1) * (78 * math.exp(-3 * (1 - 78 / 80)) + 80 * 1.0)
    assert pareto.aup([4.0, 1.0, 2.0], [70.0, 80.0, 78.0], y_max=80.0) == pytest.approx(expected)
    assert pareto.aup([1.0], [60.0], y_max=80.0) == pytest.approx(60.0)


def test_family_aup_uses_the_task_best_accuracy(runs: Path) -> None:
    frame = pareto.load_runs(runs)
    aups = pareto.family_aup(frame)
    assert aups[("arith", "fixed")] == pytest.approx(80.0)
    # threshold+eotp: (4, 78) then (8, 70): 70 is 8 points below 78, dropped; y_max 80 comes from fixed.
    assert aups[("arith", "threshold+eotp")] == pytest.approx(4 * 78)


def test_missing_baseline_is_an_error(runs: Path) -> None:
    frame = pareto.load_runs(runs)
    with pytest.raises(ValueError, match=r"no baseline run .* for \[\('arith', 64\)\]"):
        pareto.add_baseline_ratios(frame[frame["run"] != "base"].reset_index(drop=True))


def test_cli_writes_table_csv_and_plots(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, str(REPO / "analysis" / "pareto.py"), str(runs), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "arith_pareto.png").stat().st_size > 10_000
    table = (out / "table.md").read_text()
    assert "| arith | threshold+eotp | threshold 0.9 | 78.0 ± 5.0 | -2.0 | 8.0 | 4.00 |" in table
    assert len(pd.read_csv(out / "runs.csv")) == 3


def test_sweep_grid_expansion() -> None:
    spec = {"model_args": {"gen_length": 64}, "grid": [{"policy": "fixed", "steps": [64, 16]},
                                                       {"policy": "threshold", "threshold": [0.5, 0.9],
                                                        "eotp": [False, True]}]}
    runs = sweep.configurations(spec)
    assert len(runs) == 6 and runs[0] == {"gen_length": 64, "policy": "fixed", "steps": 64}
    assert sweep.run_name(runs[-1]) == "gen_length-64_policy-threshold_threshold-0.9_eotp-True"
    command = sweep.lm_eval_command({"tasks": ["arith"], "limit": 8}, runs[0], Path("/tmp/x"))
    assert command[command.index("--model_args") + 1] == "gen_length=64,policy=fixed,steps=64,log_dir=/tmp/x"
    assert command[command.index("--include_path") + 1] == str(REPO / "l2pd_harness" / "lm_eval_tasks")
    assert command[-2:] == ["--limit", "8"]


def test_accuracy_of_reads_an_unknown_stderr_as_nan() -> None:
    accuracy, stderr = pareto.accuracy_of({"exact_match,none": 1.0, "exact_match_stderr,none": "N/A"}, "here")
    assert accuracy == 1.0 and math.isnan(stderr)


def pareto_error(capsys: pytest.CaptureFixture, runs_dir: Path, out: Path) -> str:
    with pytest.raises(SystemExit) as exit_info:
        pareto.main([str(runs_dir), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pareto.py: error: "), err
    assert not out.exists()
    return err.removeprefix("pareto.py: error: ").rstrip("\n")


def test_a_configuration_run_twice_is_refused(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (runs / "fast" / "model2").mkdir()  # what a sweep stopped without stopping its lm-eval, then rerun, left
    (runs / "fast" / "model2" / "results_2027.json").write_text((runs / "fast/model/results_2026.json").read_text())
    assert pareto_error(capsys, runs, tmp_path / "report") == (
        f"configuration directory {str(runs / 'fast')!r} holds 2 lm-eval results files ['model/results_2026.json', "
        "'model2/results_2027.json']: it was run more than once and its step logs mix the runs; delete the "
        "directory and rerun analysis/sweep.py to redo it")


def test_an_empty_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "runs").mkdir()
    assert pareto_error(capsys, tmp_path / "runs", tmp_path / "report") == (
        f"no lm-eval results_*.json under {str(tmp_path / 'runs')!r}")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda run: (run / "model" / "results_2026.json").write_text('{"results": '),
     "lm-eval results {results!r} is not valid JSON"),
    (lambda run: (run / "model" / "results_2026.json").write_text('{"results": {}}'),
     "lm-eval results {results!r} has no config.l2pd_settings mapping: not a run of the l2pd model"),
    (lambda run: (run / "model" / "results_2026.json").write_text(
        '{"results": {"arith": {}}, "config": {"l2pd_settings": {"policy": "fixed"}}}'),
     "lm-eval results {results!r}: config.l2pd_settings lacks ['threshold', 'factor', 'eotp', 'cache', "
     "'gen_length', 'steps', 'accept_threshold']"),
    (lambda run: (run / "model" / "results_2026.json").write_text(json.dumps({
        "results": {"arith": {"acc,none": 1.0}}, "config": {"l2pd_settings": SETTINGS}})),
     "lm-eval results {results!r} task 'arith' has no exact_match metric among ['acc,none']"),
    (lambda run: (run / "steps_rank0_2026.jsonl").write_text(
        (run / "steps_rank0_2026.jsonl").read_text() + '{"task": "arith", "doc_\n'),
     "step log {steps!r} line 3 is not valid JSON"),
    (lambda run: (run / "steps_rank0_2026.jsonl").write_text('{"task": "arith", "doc_id": 0}\n'),
     "step log {steps!r} row 1 lacks ['repeat']"),
    (lambda run: (run / "steps_rank0_2026.jsonl").write_text('{"task": "arith", "doc_id": 0, "repeat": 0}\n'),
     "step log {steps!r} row 1 lacks the step-log fields ['nfe', 'tokens_per_step', 'positions_per_step', "
     "'latency_s', 'prompt_tokens', 'generated_tokens', 'finished_at']"),
    (lambda run: (run / "steps_rank0_2026.jsonl").write_text(json.dumps({**step(0, 8, 32, 20, 0.5, 1.0), "nfe": "4"})),
     "step log {steps!r} row 1: step-log field nfe '4' is not an integer >= 1"),
    (lambda run: (run / "steps_rank0_2026.jsonl").write_text(json.dumps({**step(0, 8, 32, 20, 0.5, 1.0),
                                                                          "finished_at": None})),
     "step log {steps!r} row 1: step-log field finished_at None is not a finite number"),
    (lambda run: (run / "steps_rank0_2026.jsonl").unlink(),
     "{run!r} has no step log rows of task 'arith' (steps_rank*.jsonl)"),
])
def test_a_damaged_run_is_one_line_naming_the_file(damage, message: str, runs: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    run = runs / "fast"
    damage(run)
    err = pareto_error(capsys, runs, tmp_path / "report")
    assert err.startswith(message.format(results=str(run / "model" / "results_2026.json"),
                                         steps=str(run / "steps_rank0_2026.jsonl"), run=str(run))), err


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("gen_length", "256", "an integer >= 1"),
    ("steps", 0, "an integer >= 1"),
    ("eotp", "false", "a boolean"),
    ("policy", None, f"one of {list(pareto.POLICIES)}"),
    ("policy", "greedy", f"one of {list(pareto.POLICIES)}"),
    ("cache", ["none"], "one of ['none', 'prefix', 'dual']"),
    ("threshold", "0.9", "a number"),
    ("accept_threshold", "x", "a number or null"),
])
def test_a_setting_of_the_wrong_type_is_one_line(key: str, value: object, expected: str, runs: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    results = runs / "fast" / "model" / "results_2026.json"
    data = json.loads(results.read_text())
    data["config"]["l2pd_settings"][key] = value
    results.write_text(json.dumps(data))
    assert pareto_error(capsys, runs, tmp_path / "report") == (
        f"lm-eval results {str(results)!r}: config.l2pd_settings {key} {value!r} is not {expected}")


@pytest.mark.parametrize(("out_name", "message"), [
    ("a-file", "--out {out!r} is a file, expected a directory"),
    ("a-file/report", "--out {out!r} cannot be created: {file!r} is a file"),
])
def test_an_unwritable_out_is_one_line(out_name: str, message: str, runs: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / out_name
    with pytest.raises(SystemExit) as exit_info:
        pareto.main([str(runs), "--out", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "pareto.py: error: " + message.format(out=str(out),
                                                                             file=str(tmp_path / "a-file")) + "\n"


def test_a_rule_variant_is_a_family_of_its_own() -> None:
    ours = {"policy": "learned", "eotp": True, "cache": "none"}
    assert pareto.family_of(ours) == pareto.family_of({**ours, "learned_commit": "accepted", "eotp_mode": "fill"})
    paper = {**ours, "learned_commit": "with_schedule", "eotp_mode": "truncate", "cache": "dual"}
    assert pareto.family_of(paper) == "learned+eotp[with_schedule][truncate]+dual"


def test_a_sweep_grid_reaches_the_paper_preset(tmp_path: Path) -> None:
    grid = tmp_path / "paper.yaml"
    grid.write_text("tasks: [arith]\nlimit: 4\nbatch_size: 4\nmodel_args: {gen_length: 64}\n"
                    "grid:\n  - {preset: learn2pd-paper, cache: [none, dual]}\n")
    runs = sweep.configurations(sweep.read_grid(grid))
    assert [run["preset"] for run in runs] == ["learn2pd-paper"] * 2
    decoders = sweep.decoders_of(runs, "grid")  # the preset's learned policy finds the shipped filter
    assert [d["filter"] for d in decoders] == [filter_fingerprint(DEFAULT_FILTER)] * 2
    assert [d["settings"]["cache"] for d in decoders] == ["none", "dual"]
    grid.write_text(grid.read_text().replace("learn2pd-paper", "paper"))
    with pytest.raises(sweep.FileFormatError, match=r"preset='paper' is not one of \['learn2pd-paper'\]"):
        sweep.decoders_of(sweep.configurations(sweep.read_grid(grid)), "grid")
