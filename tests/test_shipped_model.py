"""The embedded tiny dLLM: loads through the same path as LLaDA-8B and solves held-out problems."""

from __future__ import annotations

import pytest

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.evaluation import grade_rows, iter_decoded
from l2pd_harness.loading import DEFAULT_MODEL_DIR, load_model
from l2pd_harness.tasks import sample_problems


@pytest.fixture(scope="module")
def shipped():
    return load_model()


def test_default_is_the_shipped_checkpoint(shipped) -> None:
    model, tokenizer = shipped
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 25 * 2**20
    assert model.config.mask_token_id == tokenizer.mask_token_id
    assert tokenizer.chat_template


@pytest.mark.parametrize("task", ["arith", "changeone", "listops", "pairsum"])
def test_solves_the_first_held_out_problems(shipped, task: str) -> None:
    model, tokenizer = shipped
    problems = sample_problems(task, "test", 8, seed=123)  # the first 8 of `l2pd data TASK --seed 123`
    rows = list(iter_decoded(model, tokenizer, problems, DecodeConfig(gen_length=64, block_length=32)))
    assert grade_rows(rows) == [True] * 8, [(r["answer"], r["text"]) for r in rows]


def test_golden_output(shipped) -> None:
    model, tokenizer = shipped
    (problem,) = sample_problems("arith", "test", 1, seed=123)
    (row,) = iter_decoded(model, tokenizer, [problem], DecodeConfig(gen_length=64, block_length=32))
    assert row["text"] == " Later 9 + 27 = 36\n Later 36 - 13 = 23\n#### 23"
    assert row["tokens_per_step"] == [1] * 64
