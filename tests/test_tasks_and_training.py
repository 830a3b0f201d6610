"""Task generators, graders and `train-base`: splits stay disjoint, grading is GSM8K's, resume is exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from l2pd_harness.tasks import get_task, sample_problems, split_of
from l2pd_harness.training import base
from l2pd_harness.training.base import BaseTrainConfig, train_base


@pytest.mark.parametrize("task", ["arith", "listops"])
def test_splits_are_disjoint_and_seeded(task: str) -> None:
    test = sample_problems(task, "test", 200, seed=123)
    train = sample_problems(task, "train", 2000, seed=0)
    assert not {p["question"] for p in test} & {p["question"] for p in train}
    assert all(split_of(p["question"]) == "test" for p in test)
    assert sample_problems(task, "test", 200, seed=123) == test
    assert len({p["question"] for p in test}) == 200


def test_graders() -> None:
    arith, listops = get_task("arith"), get_task("listops")
    assert arith.grade(" Then 3 + 4 = 7\n#### 7", "4 + 3 = 7\n#### 7")
    assert not arith.grade("3 + 4 = 7\n#### 8", "3 + 4 = 7\n#### 7")
    assert not arith.grade("3 + 4 = 7", "3 + 4 = 7\n#### 7")
    assert listops.grade("[1, 2] ", "[1, 2]") and not listops.grade("[2, 1]", "[1, 2]")


def test_arith_solutions_are_consistent() -> None:
    for problem in sample_problems("arith", "train", 300, seed=4):
        *lines, final = problem["answer"].split("\n")
        assert 2 <= len(lines) <= 4
        for line in lines:
            left, op, right, _, result = line.split()[-5:]
            assert int(result) == (int(left) + int(right) if op == "+" else int(left) - int(right))
        assert final == f"#### {lines[-1].split()[-1]}"


TINY = dict(steps=4, warmup=1, tokens_per_batch=2048, d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=48,
            checkpoint_every=2, max_gen_length=320)


def test_resume_after_a_crash_reproduces_an_uninterrupted_run(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = BaseTrainConfig(**TINY)
    train_base(cfg, tmp_path / "straight")
    calls = []
    real_loss = base.diffusion_loss

    def crash_at_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the step-2 checkpoint
            raise RuntimeError("simulated crash")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(base, "diffusion_loss", crash_at_third_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_base(cfg, tmp_path / "crashed")
    monkeypatch.setattr(base, "diffusion_loss", real_loss)
    train_base(cfg, tmp_path / "crashed", resume=True)
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "crashed" / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert json.loads((tmp_path / "crashed" / "training_log.json").read_text())["steps_done"] == 4


def test_resume_without_checkpoint_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "l2pd_harness.cli", "train-base", "--out", str(tmp_path),
                             "--resume"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("holds no trainer_state.pt to resume from")
