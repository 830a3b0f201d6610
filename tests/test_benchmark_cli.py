"""benchmarks/decode.py: bad options and input files are one line (exit 2), reported before the model is loaded."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_decode", REPO / "benchmarks" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


decode = load_benchmark()


@pytest.fixture()
def error_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Run the benchmark with ``options`` (outputs under ``tmp_path`` unless given); its one-line error, without the
    prefix."""

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(decode, "load_model", no_model)

    def run(*options: str) -> str:
        outputs = ["--out", str(tmp_path / "b.json"), "--rows-dir", str(tmp_path / "rows"), "--readme", "none"]
        monkeypatch.setattr(sys, "argv", ["decode.py", *outputs, *options])  # a repeated option: the last one counts
        with pytest.raises(SystemExit) as exit_info:
            decode.main()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("decode.py: error: "), err
        return err.removeprefix("decode.py: error: ").rstrip("\n")

    return run


@pytest.mark.parametrize(("options", "message"), [
    (["--policies", "fixed,greedy"], "--policies: unknown ['greedy'] (choose from ['factor', 'fixed', "
                                      "'isolated', 'learned', "),
    (["--caches", "none,full"], "--caches: unknown ['full'] (choose from ['dual', 'none', 'prefix'])"),
    (["--tasks", "arith,gsm9k"], "--tasks: unknown ['gsm9k'] (choose from ['arith', "),
    (["--eotp", "no,maybe"], "--eotp='maybe' is not a boolean"),
    (["--n", "0"], "argument --n: value=0 must be positive"),
    (["--thresholds", "0.9,x"], "argument --thresholds: '0.9,x' is not a comma-separated list of finite numbers"),
    (["--factors", "nan"], "argument --factors: 'nan' is not a comma-separated list of finite numbers"),
    (["--accept-thresholds", ""], "argument --accept-thresholds: '' is not a comma-separated list of finite numbers"),
    (["--thresholds", "0.9,1.5"], "threshold=1.5 must be in (0, 1]"),
    (["--policies", "factor", "--factors", "0"], "factor=0.0 must be > 0"),
    (["--policies", "learned", "--accept-thresholds", "1.0"], "accept_threshold=1.0 must be in (0, 1)"),
    (["--gen-length", "48"], "block_length=32 must be a positive divisor of gen_length=48"),
    (["--policies", "learned", "--filters", "/some/filter"],
     "--filters '/some/filter' is not NAME=PATH (or 'shipped', the tiny model's own filter)"),
    (["--policies", "learned", "--filters", ","], "--filters names no filter, which policy 'learned' needs"),
    (["--eotp-modes", "cut"], "--eotp-modes: unknown ['cut'] (choose from ['default', 'fill', 'truncate'])"),
    (["--eotp", "no", "--eotp-modes", "truncate"], "eotp_mode='truncate' needs eotp=true"),
])
def test_a_bad_option_is_one_line(options: list[str], message: str, error_of) -> None:
    assert error_of(*options).startswith(message)


@pytest.mark.parametrize(("content", "message"), [
    ("", "--out results {path!r} is not valid JSON"),
    ('{"setup": ', "--out results {path!r} is not valid JSON"),
    ("[]", "--out results {path!r} holds a JSON list, expected a JSON dict"),
    ('{"runs": {}}', "--out results {path!r} has no 'setup' and 'runs' mappings: not results of this benchmark"),
    ('{"setup": {"n": 3}, "runs": {}}', "--out {path!r} holds results of another setup {{'n': 3}}; move it away"),
])
def test_a_bad_results_file_is_one_line(content: str, message: str, error_of, tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(content)
    assert error_of("--out", str(path)).startswith(message.format(path=str(path)))


def test_a_directory_as_results_file_is_one_line(error_of, tmp_path: Path) -> None:
    assert error_of("--out", str(tmp_path)) == f"--out {str(tmp_path)!r} is a directory, expected a file"


def test_results_of_another_model_are_refused(error_of, tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    setup = {**decode.setup_of(decode.build_parser().parse_args([])), "model": "sha256:41e886a1f6b8cf82"}
    path.write_text(json.dumps({"setup": setup, "runs": {}}))
    assert error_of("--out", str(path)).startswith(f"--out {str(path)!r} holds results of another setup")


def test_a_table_names_the_model_it_measured(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- decode-table:start -->\nold rows\n<!-- decode-table:end -->\nafter\n")
    setup = decode.setup_of(decode.build_parser().parse_args([]))
    decode.update_readme(readme, {"setup": setup, "runs": {}}, "decode-table")
    caption = readme.read_text().split("\n")[2]
    assert caption.startswith(f"200 held-out test problems per task (seed 123), model {setup['model']}, gen_length ")
    assert "old rows" not in readme.read_text() and readme.read_text().endswith("after\n")


def test_an_unknown_redo_is_one_line(error_of, tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    setup = decode.setup_of(decode.build_parser().parse_args([]))
    path.write_text(json.dumps({"setup": setup, "runs": {}}))
    assert error_of("--out", str(path), "--redo", "fixed/dual") == (
        f"--redo 'fixed/dual': no such run in {str(path)!r} (runs: [])")


@pytest.mark.parametrize(("readme_text", "message"), [
    (None, "--readme {path!r} does not exist"),
    ("# no table here\n", "--readme {path!r} lacks the <!-- decode-table:start --> ... <!-- decode-table:end --> "
                          "markers"),
])
def test_a_bad_readme_is_one_line(readme_text: str | None, message: str, error_of, tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    if readme_text is not None:
        path.write_text(readme_text)
    assert error_of("--readme", str(path)) == message.format(path=str(path))


def test_an_explicit_eotp_mode_is_its_own_run() -> None:
    runs = decode.grid(["learned"], ["none"], [True], {"shipped": [0.95]}, {"shipped": None},
                       (None, "learn2pd-paper"), (None, "fill"))
    assert [run.name for run in runs] == [
        "learned@shipped@0.95+eotp/none", "learned@shipped@0.95+eotp-fill/none",
        "learned@shipped@0.95+eotp+learn2pd-paper/none", "learned@shipped@0.95+eotp-fill+learn2pd-paper/none"]
    paper_with_fill = runs[3]
    assert decode.run_of(decode.asdict(paper_with_fill)) == paper_with_fill
    assert decode.eotp_column(paper_with_fill) == "yes (fill)" and decode.eotp_column(runs[0]) == "yes"
    args = decode.build_parser().parse_args([])
    cfg = decode.make_config(decode.run_settings(args, paper_with_fill, {"shipped": None}))
    assert (cfg.eotp_mode, cfg.learned_commit) == ("fill", "with_schedule")  # the preset's other rules stay
