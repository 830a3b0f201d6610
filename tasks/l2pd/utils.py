"""Datasets of the l2pd task YAMLs, read from local files only (no hub access at run time).

``arith`` and ``listops`` read ``data/<task>_test.jsonl`` next to this file, written by
``l2pd data <task> --split test --n 500 --seed 123 --out tasks/l2pd/data/<task>_test.jsonl``.
``gsm8k_local`` reads ``train.jsonl`` and ``test.jsonl`` (GSM8K's own files) from the directory in ``$GSM8K_DIR``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def read_splits(files: dict[str, Path]) -> datasets.DatasetDict:
    splits = {}
    for split, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def load_arith(**_: object) -> datasets.DatasetDict:
    return read_splits({"test": HERE / "data" / "arith_test.jsonl"})


def load_listops(**_: object) -> datasets.DatasetDict:
    return read_splits({"test": HERE / "data" / "listops_test.jsonl"})


def exact_match_listops(doc: dict, results: list[str]) -> dict[str, float]:
    """The printed value, exactly (surrounding whitespace aside). Scored here rather than by lm-eval's
    exact_match metric because lm-eval reads a target such as ``[6, 4]`` as a list of two targets."""
    return {"exact_match": float(results[0].strip() == doc["answer"].strip())}


def load_gsm8k(**_: object) -> datasets.DatasetDict:
    directory = os.environ.get("GSM8K_DIR")
    if not directory:
        raise OSError("gsm8k_local reads GSM8K from the directory in $GSM8K_DIR (train.jsonl, test.jsonl); it is "
                      "not set (in this repository's development setup: export GSM8K_DIR=../shared/data/gsm8k)")
    return read_splits({split: Path(directory) / f"{split}.jsonl" for split in ("train", "test")})
