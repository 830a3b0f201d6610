"""Bad input and faults as a skeptical user meets them: one line (exit 2) or a kept result, never a traceback or a
corrupt file. Concurrency runs two real processes; the rest runs in-process through ``main``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import l2pd_harness.cli as cli
from l2pd_harness.decoding.engine import Engine
from l2pd_harness.decoding.runner import choose_tokens
from l2pd_harness.decoding.scheduler import DecodeError
from l2pd_harness.files import FileFormatError, JsonlWriter, save_tensors_atomic, write_atomic
from l2pd_harness.filter.model import DEFAULT_FILTER, checkpoint_paths
from l2pd_harness.filter.traces import load_traces
from l2pd_harness.loading import load_native, save_llada
from l2pd_harness.settings import make_config
from l2pd_harness.tasks import sample_problems
from tests.test_cli import message_lines, one_line_error, run_main

MASK, EOS = 3, 0


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


@pytest.mark.slow
def test_two_processes_writing_one_output_leave_one_whole_file(random_checkpoint: Path, tmp_path: Path) -> None:
    source = write_prompts(tmp_path / "in.jsonl", ["Tom has 12", "19", "apples", "reverse the list"] * 4)
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "l2pd_harness.cli", "generate", "--model", str(random_checkpoint), "--input",
               str(source), "--output", str(out), "--gen-length", "32", "--block-length", "16", "--steps", "32",
               "--batch-size", "2"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole
    assert len(rows) == 16 and [r["prompt"] for r in rows] == [json.loads(x)["prompt"] for x in source.open()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no staging file left


def test_atomic_writes_stage_in_files_of_their_own(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    with JsonlWriter(target) as first:
        with JsonlWriter(target) as second:
            first.write({"a": 1})
            second.write({"b": 2})
            assert first.staging != second.staging
        assert target.read_text() == '{"b": 2}\n'
    assert target.read_text() == '{"a": 1}\n'  # the last to finish wins, whole
    write_atomic(target, "x")
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"] and target.read_text() == "x"


def test_a_usage_error_writes_nothing(capsys, random_checkpoint: Path, tmp_path: Path) -> None:
    source = write_prompts(tmp_path / "in.jsonl", ["hi"])
    one_line_error(capsys, "generate", "--model", str(random_checkpoint), "--input", str(source), "--output",
                   str(tmp_path / "out.jsonl"), "--policy", "oracle")
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


def test_an_interrupted_run_says_what_it_kept(capsys, monkeypatch, random_checkpoint: Path, tmp_path: Path) -> None:
    source = write_prompts(tmp_path / "in.jsonl", ["Tom has 12", "19", "apples"])
    write = JsonlWriter.write

    def interrupt_after_two(self, row: dict) -> None:
        if self.rows == 2:
            raise KeyboardInterrupt
        write(self, row)

    monkeypatch.setattr(JsonlWriter, "write", interrupt_after_two)
    code, _, err = run_main(capsys, "generate", "--model", str(random_checkpoint), "--input", str(source),
                            "--output", str(tmp_path / "out.jsonl"), "--gen-length", "16", "--block-length", "16",
                            "--steps", "16", "--batch-size", "1")
    assert code == 130 and "Traceback" not in err
    (kept,) = tmp_path.glob(".out.jsonl.*.partial")
    assert message_lines(err) == [f"l2pd generate: interrupted; 2 finished rows kept in {str(kept)!r}"]
    assert [json.loads(line)["prompt"] for line in kept.read_text().splitlines()] == ["Tom has 12", "19"]
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": \n', "line 2 is not valid JSON (Expecting value"),
    ('["a", "b"]\n', "line 1 is a JSON list, expected an object"),
    ('{"text": "a"}\n', "row 1 has no string 'prompt' field"),
])
def test_bad_input_lines_are_named(capsys, random_checkpoint: Path, tmp_path: Path, content: str,
                                   message: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(content)
    error = one_line_error(capsys, "generate", "--model", str(random_checkpoint), "--input", str(source))
    assert str(source) in error and message in error


def test_input_directory_and_output_over_input_are_refused(capsys, random_checkpoint: Path, tmp_path: Path) -> None:
    assert one_line_error(capsys, "generate", "--model", str(random_checkpoint), "--input", str(tmp_path)).endswith(
        f"--input {str(tmp_path)!r} is a directory, expected a file")
    source = write_prompts(tmp_path / "in.jsonl", ["hi"])
    assert "is the --input file: it would be replaced" in one_line_error(
        capsys, "generate", "--model", str(random_checkpoint), "--input", str(source), "--output", str(source))
    assert json.loads(source.read_text()) == {"prompt": "hi"}


def test_an_over_long_request_is_refused_before_any_decoding(capsys, random_checkpoint: Path,
                                                             tmp_path: Path) -> None:
    source = write_prompts(tmp_path / "in.jsonl", ["hi", "Tom has 12", "apples " * 300])
    error = one_line_error(capsys, "generate", "--model", str(random_checkpoint), "--input", str(source),
                           "--output", str(tmp_path / "out.jsonl"), "--gen-length", "256", "--block-length", "32")
    assert "prompt 3 of 3: " in error and "more than the model's max_sequence_length 512" in error
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]
    too_long = one_line_error(capsys, "generate", "--model", str(random_checkpoint), "--prompt", "hi",
                              "--gen-length", "1280", "--block-length", "32")
    assert "prompt 1 of 1: " in too_long and "canvas positions" in too_long


def test_nan_logits_stop_with_the_step_and_request(capsys, random_checkpoint: Path, tmp_path: Path) -> None:
    model = load_native(random_checkpoint)
    with torch.no_grad():
        model.state_dict()["model.transformer.ff_out.weight"][5, 0] = float("nan")
    broken = tmp_path / "nan-model"
    save_llada(model, broken)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (random_checkpoint / name).exists():
            (broken / name).write_bytes((random_checkpoint / name).read_bytes())
    error = one_line_error(capsys, "generate", "--model", str(broken), "--prompt", "hi", "--gen-length", "16",
                           "--block-length", "16")
    assert "request 0: forward pass 1 returned NaN or infinite logits" in error


class MaskLovingModel(nn.Module):
    """A model whose most likely token everywhere is the mask token (a partly trained or random model)."""

    def __init__(self, vocab: int = 12):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(mask_token_id=MASK, eos_token_id=EOS, vocab_size=vocab,
                                      max_sequence_length=128)

    def forward(self, ids, attention_mask=None, kv_cache=None, logits_index=None) -> torch.Tensor:
        logits = torch.arange(self.config.vocab_size, dtype=torch.float32).expand(*logits_index.shape, -1).clone()
        logits[..., MASK] = 100.0
        return logits


def test_the_mask_token_is_never_chosen() -> None:
    logits = torch.tensor([[[0.0, 1.0, 2.0, 9.0], [5.0, 1.0, 2.0, 9.0]]])
    prediction, top = choose_tokens(logits, MASK, 0.0, None)
    assert prediction.tolist() == [[2, 0]] and top.tolist() == [[9.0, 9.0]]  # the largest logit, mask included
    assert logits[0, 0, MASK] == 9.0  # the caller's logits are unchanged
    results = Engine(MaskLovingModel(), make_config({"gen_length": 16, "block_length": 8, "policy": "threshold"})
                     ).generate([[1, 2]])
    assert MASK not in results[0].token_ids and results[0].nfe <= 16


def test_a_decode_past_its_budget_says_so() -> None:
    cfg = make_config({"gen_length": 8, "block_length": 8})
    engine = Engine(MaskLovingModel(), cfg, policy=lambda state: torch.zeros_like(state.masked))
    with pytest.raises(DecodeError, match="request 0 is not finished after 9 forward passes, more than its canvas "
                                          "of 8 positions can need: its policy committed nothing"):
        engine.generate([[1, 2]])


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"), ("[]", "holds a JSON list, expected a JSON dict"),
    ('{"format": "l2pd-regression/1"}', "the reference has no 'identity' object"),
    ('{"format": "l2pd-regression/1", "identity": {}, "runs": {"a": {"config": {}, "tasks": {"arith": {}}}}}',
     "check 'a' / arith lacks ['accuracy', 'correct', 'mean_nfe', 'n']"),
])
def test_regress_names_a_bad_reference(capsys, tmp_path: Path, content: str, message: str) -> None:
    reference = tmp_path / "reference.json"
    reference.write_text(content)
    assert message in one_line_error(capsys, "regress", "--reference", str(reference))


def copy_filter(tmp_path: Path) -> tuple[Path, Path]:
    weights, card = checkpoint_paths(DEFAULT_FILTER)
    new_weights, new_card = checkpoint_paths(tmp_path / "f")
    new_weights.write_bytes(weights.read_bytes())
    new_card.write_bytes(card.read_bytes())
    return new_weights, new_card


@pytest.mark.parametrize("part, cut", [("weights", 0), ("weights", 100), ("card", 0), ("card", 200)])
def test_damaged_filter_files_are_named(capsys, tmp_path: Path, part: str, cut: int) -> None:
    weights, card = copy_filter(tmp_path)
    damaged = weights if part == "weights" else card
    damaged.write_bytes(damaged.read_bytes()[:cut])
    error = one_line_error(capsys, "generate", "--prompt", "hi", "--policy", "learned", "--filter",
                           str(tmp_path / "f"), "--gen-length", "32")
    assert str(damaged) in error


def test_damaged_trace_steps_are_named(tmp_path: Path) -> None:
    steps = tmp_path / "steps.safetensors"
    steps.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (tmp_path / "problems.jsonl").write_text("")
    meta = {"base_model": "sha256:x", "trajectory": "oracle", "tasks": ["arith"], "gen_length": 32,
            "block_length": 32, "cache": "none", "eotp": True, "data_seed": 0, "problems": 0, "steps": 0}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    steps.write_bytes(steps.read_bytes()[:5])
    with pytest.raises(FileFormatError, match=f"trace steps {str(steps)!r} is not a readable safetensors file"):
        load_traces(tmp_path)
    (tmp_path / "meta.json").write_text('{"base_model": ')
    with pytest.raises(FileFormatError, match="trace meta .* is not valid JSON"):
        load_traces(tmp_path)


def test_every_command_reports_the_same_error_classes() -> None:
    assert FileFormatError in cli.user_errors() and DecodeError in cli.user_errors()


@pytest.mark.parametrize("command", [["generate", "--input"], ["grade", "--input"],
                                     ["collect-traces", "--out", "traces", "--references"]])
def test_undecodable_text_is_named(capsys, tmp_path: Path, command: list[str]) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"prompt": "a"}\n\xff\xfe{}\n')
    error = one_line_error(capsys, *command, str(source))
    assert f"{str(source)!r} line 2 is not UTF-8 text" in error


def test_failed_writes_name_the_target_and_leave_no_staging_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileFormatError, match=f"cannot write {str(tmp_path / 'file' / 'r.json')!r}"):
        write_atomic(tmp_path / "file" / "r.json", "text")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileFormatError, match=f"cannot write {str(tmp_path / 'folder')!r}: Is a directory"):
        save_tensors_atomic({"a": torch.zeros(2)}, tmp_path / "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


def test_a_failed_rename_keeps_the_finished_rows(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    with pytest.raises(FileFormatError, match="Is a directory") as caught:
        with JsonlWriter(target) as out:
            out.write({"a": 1})
            target.mkdir()
    (kept,) = tmp_path.glob(".out.jsonl.*.partial")
    assert caught.value.kept_rows == f"1 finished rows kept in {str(kept)!r}" and kept.read_text() == '{"a": 1}\n'


def test_written_files_get_a_new_files_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        save_tensors_atomic({"a": torch.zeros(2)}, tmp_path / "t.safetensors")
        write_atomic(tmp_path / "t.json", "{}")
    finally:
        os.umask(umask)
    assert [oct(p.stat().st_mode & 0o777) for p in sorted(tmp_path.iterdir())] == ["0o644", "0o644"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_output_folder_is_refused_before_work(capsys, tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        error = one_line_error(capsys, "data", "arith", "--out", str(tmp_path / "sub" / "d.jsonl"))
    finally:
        tmp_path.chmod(0o755)
    assert error.endswith(f"cannot be created: {str(tmp_path)!r} is not writable")


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "hi", "--output", "{dir}"], "--output '{dir}' is a directory, expected a file"),
    (["generate", "--prompt", "hi", "--output", ""], "--output is an empty path"),
    (["generate", "--prompt", "hi", "--output", "{file}/x.jsonl"],
     "--output '{file}/x.jsonl' cannot be created: '{file}' is a file"),
    (["evaluate", "--task", "arith", "--output", "{dir}"], "--output '{dir}' is a directory, expected a file"),
    (["data", "arith", "--out", ""], "--out is an empty path"),
    (["collect-traces", "--out", "{file}"], "--out '{file}' is a file, expected a directory"),
    (["collect-traces", "--out", "{dir}/t", "--rollout-min-confidence", "1.5"],
     "argument --rollout-min-confidence: rollout_min_confidence=1.5 must be in [0, 1]"),
    (["train-base", "--out", "{file}"], "--out '{file}' is a file, expected a directory"),
    (["train-filter", "--traces", "{dir}", "--out", "{dir}"], "--out '{dir}' is a directory, expected a file"),
    (["choose-threshold", "--filter", "f", "--traces", "{dir}", "--out", "{dir}"],
     "--out '{dir}' is a directory, expected a file"),
    (["choose-threshold", "--filter", "f", "--traces", "{dir}", "--out", "{dir}/new/f.safetensors",
      "--max-accuracy-drop", "-1"], "max_accuracy_drop=-1.0 >= 0"),
    (["regress", "--update", "--reference", "{dir}"], "--reference '{dir}' is a directory, expected a file"),
])
def test_outputs_are_checked_before_any_work(capsys, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "file").write_text("x")
    names = {"dir": str(tmp_path), "file": str(tmp_path / "file")}
    error = one_line_error(capsys, *[arg.format(**names) for arg in args])
    assert error.endswith(message.format(**names))
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_grade_and_generate_refuse_bad_rows(capsys, tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"task": ["arith"], "text": "1", "answer": "1"}) + "\n")
    assert one_line_error(capsys, "grade", "--input", str(rows)).endswith(
        "row 1: 'task', 'text' and 'answer' must be strings")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for command in ("grade", "generate"):
        assert one_line_error(capsys, command, "--input", str(empty)).endswith(f"--input {str(empty)!r} holds no rows")


@pytest.mark.parametrize("command", ["collect-traces", "train-base"])
@pytest.mark.parametrize("tasks, bad", [("foo", "'foo'"), ("arith,", "''")])
def test_task_lists_are_checked_by_the_parser(capsys, command: str, tasks: str, bad: str) -> None:
    assert one_line_error(capsys, command, "--out", "unused", "--task", tasks).endswith(
        f"argument --task: invalid task {bad} (choose from arith, changeone, listops, pairsum)")


@pytest.mark.parametrize("canvas", [["a", "b"], [10 ** 9], [-5], [1.0, 2.0], "12"])
def test_oracle_references_must_be_token_ids(capsys, random_checkpoint: Path, tmp_path: Path, canvas) -> None:
    references = tmp_path / "ref.jsonl"
    references.write_text(json.dumps({"prompt": "hi", "canvas": canvas}) + "\n")
    error = one_line_error(capsys, "generate", "--model", str(random_checkpoint), "--prompt", "hi", "--policy",
                           "oracle", "--references", str(references), "--gen-length", "8", "--block-length", "8")
    assert f"--references {str(references)!r} row 1: 'canvas' must" in error


def test_trace_references_must_fill_the_canvas(capsys, tmp_path: Path) -> None:
    problems = sample_problems("arith", "train", 1, 11)
    references = tmp_path / "ref.jsonl"
    references.write_text(json.dumps({**problems[0], "text": "", "canvas": [1, 2]}) + "\n")
    error = one_line_error(capsys, "collect-traces", "--task", "arith", "--n", "1", "--out", str(tmp_path / "t"),
                           "--references", str(references), "--gen-length", "32", "--block-length", "32")
    assert error.endswith(f"--references {str(references)!r} row 1: 'canvas' has 2 tokens, --gen-length is 32")
    assert [p.name for p in tmp_path.iterdir()] == ["ref.jsonl"]
