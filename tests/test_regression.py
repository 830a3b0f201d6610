"""`l2pd regress`: the tolerance rule, and the CLI failing on a deliberately broken policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from l2pd_harness import regression
from l2pd_harness.cli import main
from l2pd_harness.decoding import policies


def test_accuracy_tolerance_is_two_standard_errors_of_the_smoothed_accuracy() -> None:
    # p = 13/18: 2 * sqrt(13/18 * 5/18 / 16) = 0.22396
    assert regression.accuracy_tolerance(12, 16) == pytest.approx(0.22396, abs=1e-5)
    # A task at 100% of 100 problems: p = 101/102, tolerance 1.97 points: one flip passes, two fail.
    tolerance = regression.accuracy_tolerance(100, 100)
    assert tolerance == pytest.approx(0.019706, abs=1e-5) and 0.01 < tolerance < 0.02


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One cheap check (threshold 0.9 + EoTP on 16 arith problems), in force for the module's tests, and a reference
    recorded for it once."""
    check = regression.Check("threshold 0.9 + EoTP", {"policy": "threshold", "threshold": 0.9, "eotp": True}, n=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(regression, "CHECKS", (check,))
        patch.setattr(regression, "TASKS", ("arith",))
        reference = tmp_path_factory.mktemp("regress") / "reference.json"
        main(["regress", "--update", "--reference", str(reference)])
        yield reference


@pytest.fixture
def small_check(recorded: Path, tmp_path: Path) -> Path:
    """This test's own copy of the recorded reference."""
    copy = tmp_path / "reference.json"
    copy.write_bytes(recorded.read_bytes())
    return copy


def force_threshold(monkeypatch, value: float) -> None:
    """Break the threshold policy: whatever it was built with, it commits above ``value``."""
    monkeypatch.setattr(policies.Threshold, "__call__",
                        lambda self, state: policies.at_least_one(state.confidence > value, state))


def test_an_unchanged_checkout_passes(small_check, capsys) -> None:
    main(["regress", "--reference", str(small_check)])
    out = capsys.readouterr().out
    assert "regression check passed (1 checks" in out and "| ok |" in out


def test_a_threshold_forced_to_0_3_fails_on_accuracy(small_check, monkeypatch, capsys) -> None:
    force_threshold(monkeypatch, 0.3)
    with pytest.raises(SystemExit) as exit_info:
        main(["regress", "--reference", str(small_check)])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "| FAIL |" in out and "regression check FAILED" in out
    assert "threshold 0.9 + EoTP / arith: accuracy" in out and "points below the reference" in out


def test_more_forward_passes_fail(small_check, monkeypatch, capsys) -> None:
    force_threshold(monkeypatch, 0.999)
    with pytest.raises(SystemExit):
        main(["regress", "--reference", str(small_check)])
    assert "mean NFE" in capsys.readouterr().out.split("FAILED")[1]


def test_a_reference_for_another_model_is_refused_before_decoding(small_check, capsys) -> None:
    reference = json.loads(small_check.read_text())
    reference["identity"]["model"] = "sha256:0000000000000000"
    small_check.write_text(json.dumps(reference))
    with pytest.raises(SystemExit) as exit_info:
        main(["regress", "--reference", str(small_check)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "recorded with model 'sha256:0000000000000000'" in err and "l2pd regress --update" in err


def test_a_missing_reference_says_how_to_record_one(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["regress", "--reference", str(tmp_path / "none.json")])
    assert exit_info.value.code == 2 and "l2pd regress --update" in capsys.readouterr().err


def test_the_readme_shows_the_committed_reference() -> None:
    root = Path(__file__).resolve().parents[1]
    reference = json.loads((root / "results" / "regression" / "reference.json").read_text())
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- regression:start -->")[1].split("<!-- regression:end -->")[0]
    assert regression.reference_table(reference) in block


def test_a_check_recorded_with_other_settings_names_the_setting(small_check, capsys) -> None:
    reference = json.loads(small_check.read_text())
    reference["runs"]["threshold 0.9 + EoTP"]["config"]["threshold"] = 0.8
    small_check.write_text(json.dumps(reference))
    with pytest.raises(SystemExit) as exit_info:
        main(["regress", "--reference", str(small_check)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "check 'threshold 0.9 + EoTP' was recorded with other settings than this checkout's (threshold: 0.8 -> " \
           "0.9): record a new reference" in err


def test_a_setting_only_one_side_has_is_named() -> None:
    assert regression.setting_differences({"n": 16, "eotp": True}, {"n": 16, "cache": "dual", "eotp": False}) == [
        "cache: absent -> 'dual'", "eotp: True -> False"]


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("correct", "x", "has correct='x', expected an integer"),
    ("n", 16.5, "has n=16.5, expected an integer"),
    ("mean_nfe", None, "has mean_nfe=None, expected a number"),
    ("accuracy", True, "has accuracy=True, expected a number"),
])
def test_figures_of_the_wrong_type_are_refused_before_decoding(small_check, key: str, value, expected: str) -> None:
    reference = json.loads(small_check.read_text())
    reference["runs"]["threshold 0.9 + EoTP"]["tasks"]["arith"][key] = value
    with pytest.raises(regression.RegressionError, match=f"check 'threshold 0.9 \\+ EoTP' / arith {expected}$"):
        regression.check_comparable(reference)


def test_a_check_of_other_tasks_is_refused_before_decoding(small_check) -> None:
    reference = json.loads(small_check.read_text())
    run = reference["runs"]["threshold 0.9 + EoTP"]
    run["tasks"]["listops"] = run["tasks"].pop("arith")
    with pytest.raises(regression.RegressionError, match=r"has tasks \['listops'\], this checkout checks \['arith'\]"):
        regression.check_comparable(reference)
