"""`l2pd generate` as a user runs it: help, a real decode, and one-line errors with exit code 2 (in-process through
``main``; one real process end to end)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from l2pd_harness.cli import main


def l2pd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "l2pd_harness.cli", *args], capture_output=True, text=True,
                          timeout=300)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """``l2pd ARGS`` in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def message_lines(err: str) -> list[str]:
    """stderr without the progress bar's redraws (a failure after decoding began follows its bar)."""
    return [line for line in err.splitlines() if line.strip() and "pos/s" not in line]


def one_line_error(capsys, *args: str) -> str:
    """The single stderr line of a refused ``l2pd ARGS`` (exit code 2)."""
    code, _, err = run_main(capsys, *args)
    assert code == 2, err
    assert len(message_lines(err)) == 1 and "Traceback" not in err, err
    return message_lines(err)[0]


def test_help_documents_every_option(capsys) -> None:
    code, out, _ = run_main(capsys, "generate", "--help")
    assert code == 0
    for option in ("--model", "--prompt", "--input", "--output", "--gen-length", "--block-length", "--steps",
                   "--remasking", "--temperature", "--batch-size", "--dtype", "--device", "--seed", "--policy",
                   "--threshold", "--factor", "--eotp", "--no-eotp", "--cache", "--references"):
        assert option in out


@pytest.mark.slow
def test_generate_jsonl_round_trip(random_checkpoint: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(["Tom has 12", "19"])))
    result = l2pd("generate", "--model", str(random_checkpoint), "--input", str(source), "--output",
                  str(tmp_path / "out.jsonl"), "--gen-length", "16", "--block-length", "8", "--steps", "8",
                  "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1]
    for row in rows:
        assert row["nfe"] == 8 and sum(row["tokens_per_step"]) == 16 and len(row["tokens_per_step"]) == 8
        assert row["positions_per_step"] == [row["prompt_tokens"] + 16] * 8  # no cache: the whole sequence
        assert isinstance(row["text"], str) and row["latency_s"] > 0 and row["prompt_tokens"] > 2
        assert len(row["canvas"]) == 16 and 0 <= row["generated_tokens"] <= 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no staging file left


def test_single_prompt_prints_json(capsys, random_checkpoint: Path) -> None:
    code, out, err = run_main(capsys, "generate", "--model", str(random_checkpoint), "--prompt", "Tom has",
                              "--gen-length", "8", "--block-length", "8")
    assert code == 0, err
    assert json.loads(out)["nfe"] == 8


@pytest.mark.parametrize("args, expected", [
    (["--gen-length", "32", "--block-length", "7"], "block_length=7 must be a positive divisor of gen_length=32"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--batch-size", "0"], "batch_size=0 must be a positive integer"),
    (["--gen-length", "x"], "argument --gen-length: gen_length='x' is not an integer"),
    (["--policy", "foo"], "argument --policy: invalid choice: 'foo' (choose from 'fixed', 'threshold', "
                          "'factor', 'isolated', 'oracle', 'learned')"),
    (["--policy", "threshold", "--threshold", "1.5"], "threshold=1.5 must be in (0, 1]"),
    (["--cache", "ring"], "argument --cache: invalid choice: 'ring' (choose from 'none', 'prefix', 'dual')"),
    (["--policy", "oracle"], "--policy oracle needs --references FILE"),
    (["--policy", "learned"], "needs a filter trained for it (`l2pd collect-traces` then `l2pd train-filter`)"),
    (["--policy", "learned", "--filter", "/nope"], "filter checkpoint '/nope': '/nope.safetensors' does not exist"),
    (["--filter", "/nope"], "accept_threshold are only used by policy 'learned' (got policy 'fixed', filter='/nope'"),
    (["--policy", "learned", "--accept-threshold", "1.5"], "accept_threshold=1.5 must be in (0, 1)"),
    (["--policy", "factor", "--factor", "0"], "factor=0.0 must be > 0"),
])
def test_bad_values_give_one_line_and_exit_2(capsys, random_checkpoint: Path, args: list[str], expected: str) -> None:
    assert expected in one_line_error(capsys, "generate", "--model", str(random_checkpoint), "--prompt", "hi", *args)


def test_directory_without_config_is_one_line(capsys, tmp_path: Path) -> None:
    assert one_line_error(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi").endswith(
        "has no config.json; expected a Hugging Face checkpoint directory (config.json, model.safetensors, "
        "tokenizer files)")
