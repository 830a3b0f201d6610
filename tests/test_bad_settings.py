"""Bad settings on the command line are one line and exit code 2, before any work: non-finite decode knobs, devices
this machine lacks, and every way `train-base` can be misconfigured (checked before --out is created). A huge batch
size costs nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from l2pd_harness.cli import main
from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.scheduler import Scheduler
from l2pd_harness.loading import ModelLoadError, load_model, parse_device
from l2pd_harness.training.base import TRAINER_STATE, TRAINING_LOG

TINY_TRAINING = ["--steps", "2", "--tokens-per-batch", "512", "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
                 "--mlp-hidden-size", "16", "--checkpoint-every", "1"]


def refused(capsys, *args: str) -> str:
    """The single stderr line of ``l2pd ARGS``, which must exit with code 2."""
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A two-step `train-base` checkpoint of the tiny architecture."""
    out = tmp_path_factory.mktemp("trained") / "run"
    main(["train-base", "--out", str(out), *TINY_TRAINING])
    return out


@pytest.mark.parametrize("option, value", [("--factor", "nan"), ("--temperature", "nan"), ("--temperature", "inf"),
                                           ("--cfg-scale", "nan"), ("--cfg-scale", "inf"), ("--threshold", "nan")])
def test_non_finite_decode_settings_are_refused(capsys, option: str, value: str) -> None:
    line = refused(capsys, "generate", "--prompt", "1 + 1", option, value)
    assert f"{option[2:].replace('-', '_')}={value} must be a finite number" in line


def test_a_huge_batch_size_needs_only_a_slot_per_prompt(capsys) -> None:
    main(["generate", "--prompt", "1 + 1", "--gen-length", "8", "--block-length", "8", "--batch-size", "1000000000"])
    assert json.loads(capsys.readouterr().out)["nfe"] == 8
    scheduler = Scheduler(DecodeConfig(gen_length=8, block_length=8, batch_size=10**9), mask_id=3, eos_id=0,
                          eot_ids={0}, prompts=[[5, 6], [7]], references=None, device=torch.device("cpu"))
    assert scheduler.num_slots == 2 and sorted(scheduler.free_slots) == [0, 1]


@pytest.mark.parametrize("command", [["generate", "--prompt", "1 + 1"], ["evaluate", "--task", "arith", "--n", "1"]])
@pytest.mark.parametrize("device", ["foo", "cuda:0"])
def test_a_device_this_machine_lacks_is_refused(capsys, monkeypatch: pytest.MonkeyPatch, command: list[str],
                                                device: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    line = refused(capsys, *command, "--device", device)
    assert f"device {device!r} is not" in line and "['cpu'" in line


def test_parse_device() -> None:
    assert parse_device("cpu:0") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match=r"device 'meta' is not one of \['cpu'"):
        load_model(device="meta")


@pytest.mark.parametrize("options, message", [
    (["--lr", "nan"], "lr=nan must be a finite number > 0"),
    (["--lr", "-1"], "lr=-1.0 must be a finite number > 0"),
    (["--weight-decay", "-1"], "weight_decay=-1.0 must be a finite number >= 0"),
    (["--eps", "0"], r"eps=0.0 must be in \(0, 1\)"),
    (["--eps", "2"], r"eps=2.0 must be in \(0, 1\)"),
    (["--max-sequence-length", "64"], "max_sequence_length=64 must be at least max_gen_length \\(1024\\) \\+ 96"),
    (["--num-workers", "-1"], "num_workers=-1 must be >= 0"),
    (["--device", "foo"], "device 'foo' is not one of"),
    (["--init-from", "/nonexistent/model"], "model directory '/nonexistent/model' does not exist"),
])
def test_train_base_settings_are_checked_before_out_is_created(capsys, tmp_path: Path, options: list[str],
                                                               message: str) -> None:
    out = tmp_path / "out"
    line = refused(capsys, "train-base", "--out", str(out), *TINY_TRAINING, *options)
    assert line.startswith("l2pd train-base: error: ")
    assert re.search(message, line), line
    assert not out.exists()


def test_init_from_a_file_or_an_empty_directory_is_named(capsys, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    assert "has no config.json" in refused(capsys, "train-base", "--out", str(tmp_path / "a"),
                                           "--init-from", str(tmp_path / "empty"))
    assert "is a file" in refused(capsys, "train-base", "--out", str(tmp_path / "b"),
                                  "--init-from", str(tmp_path / "file"))


def test_architecture_options_must_match_the_checkpoint(capsys, trained: Path, tmp_path: Path) -> None:
    line = refused(capsys, "train-base", "--out", str(tmp_path / "next"), "--init-from", str(trained),
                   "--d-model", "32", "--n-layers", "1")
    assert "differ from checkpoint" in line and "d_model=32 (checkpoint: 16)" in line and "n_layers" not in line
    assert "d_model=32 (checkpoint: 16)" in refused(capsys, "train-base", "--out", str(trained), "--resume",
                                                    "--d-model", "32")
    assert not (tmp_path / "next").exists()


def test_init_from_takes_the_checkpoints_architecture(capsys, trained: Path, tmp_path: Path) -> None:
    main(["train-base", "--out", str(tmp_path / "next"), "--init-from", str(trained), "--steps", "1",
          "--tokens-per-batch", "512"])
    capsys.readouterr()
    config = json.loads((tmp_path / "next" / "config.json").read_text())
    assert (config["d_model"], config["n_layers"]) == (16, 1)


def test_an_existing_checkpoint_is_not_overwritten(capsys, trained: Path) -> None:
    before = (trained / "model.safetensors").read_bytes()
    line = refused(capsys, "train-base", "--out", str(trained), *TINY_TRAINING)
    assert "already holds a checkpoint: continue it with --resume or give another --out" in line
    assert (trained / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("damaged, message", [(TRAINER_STATE, "trainer state .* is not readable"),
                                              (TRAINING_LOG, "training log .* is not valid JSON")])
def test_resume_from_a_damaged_checkpoint_is_one_line(capsys, trained: Path, tmp_path: Path, damaged: str,
                                                      message: str) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in trained.iterdir():
        (copy / file.name).write_bytes(b"" if file.name == damaged else file.read_bytes())
    line = refused(capsys, "train-base", "--out", str(copy), "--resume", *TINY_TRAINING)
    assert re.search(message, line), line
