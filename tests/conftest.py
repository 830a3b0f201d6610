"""Shared fixtures: a tiny random LLaDA checkpoint written to a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` runs N workers; one thread each (and in the processes they start) keeps N workers from
    # oversubscribing the cores, which slows every worker's torch ops far more than it gains.
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

from l2pd_harness.loading import save_llada
from l2pd_harness.models.llada import LLaDAConfig, LLaDAModel
from l2pd_harness.tokenizer import build_tokenizer

CORPUS = ["Tom has 12 apples. He buys 7 more. How many apples does Tom have?", "12 + 7 = 19\n#### 19",
          "reverse the list 3 1 2 : 2 1 3"]


def tiny_config(tokenizer, **overrides) -> LLaDAConfig:
    settings = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                    vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                    eos_token_id=tokenizer.eos_token_id, max_sequence_length=512, rope_theta=10000.0)
    settings.update(overrides)
    return LLaDAConfig(**settings)


def write_random_checkpoint(directory: Path, seed: int = 0, **overrides) -> Path:
    tokenizer = build_tokenizer(CORPUS)
    torch.manual_seed(seed)
    model = LLaDAModel(tiny_config(tokenizer, **overrides))
    for param in model.parameters():  # RMSNorm weights start at 1; randomise them so the test sees them
        torch.nn.init.normal_(param, std=0.3)
    save_llada(model, directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-random"))
