"""Datasets of the l2pd task YAMLs, read from local files only (no hub access at run time).

``arith``, ``listops``, ``pairsum`` and ``changeone`` read ``data/<task>_test.jsonl`` next to this file, written by
``l2pd data <task> --split test --n 500 --seed 123 --out l2pd_harness/lm_eval_tasks/data/<task>_test.jsonl``.
``gsm8k_local`` reads ``train.jsonl`` and ``test.jsonl`` (GSM8K's own files) from the directory in ``$GSM8K_DIR``.
lm-eval loads this file by its path (``!function utils.NAME``), so it imports the package absolutely.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets

from l2pd_harness.files import FileFormatError, read_jsonl
from l2pd_harness.tasks import get_task

HERE = Path(__file__).resolve().parent
GSM8K_SPLITS = ("train", "test")


class TaskDataError(SystemExit):
    """A task's data that cannot be read: lm-eval lets dataset errors escape as tracebacks, so the message is the
    exit code, printed as one line (exit status 1, lm-eval's own for a usage error)."""


@contextmanager
def one_line_errors(task: str) -> Iterator[None]:
    try:
        yield
    except FileFormatError as err:
        raise TaskDataError(f"lm_eval --tasks {task}: error: {err}") from None


def read_splits(task: str, files: dict[str, Path]) -> datasets.DatasetDict:
    """One dataset per split, from its JSONL file (a missing or malformed file: a line-numbered error)."""
    with one_line_errors(task):
        return datasets.DatasetDict({split: datasets.Dataset.from_list(read_jsonl(path, f"{task} {split} split"))
                                     for split, path in files.items()})


def load_arith(**_: object) -> datasets.DatasetDict:
    return read_splits("arith", {"test": HERE / "data" / "arith_test.jsonl"})


def load_listops(**_: object) -> datasets.DatasetDict:
    return read_splits("listops", {"test": HERE / "data" / "listops_test.jsonl"})


def load_pairsum(**_: object) -> datasets.DatasetDict:
    return read_splits("pairsum", {"test": HERE / "data" / "pairsum_test.jsonl"})


def load_changeone(**_: object) -> datasets.DatasetDict:
    return read_splits("changeone", {"test": HERE / "data" / "changeone_test.jsonl"})


def valid_pair(doc: dict, results: list[str]) -> dict[str, float]:
    """Any valid pair of the question's list counts (the task's own grader), not only the reference string."""
    return {"exact_match": float(get_task("pairsum").grade(results[0], doc))}


def changes_one(doc: dict, results: list[str]) -> dict[str, float]:
    """Any answer that changes exactly one listed digit to 0 counts (the task's own grader)."""
    return {"exact_match": float(get_task("changeone").grade(results[0], doc))}


def exact_match_listops(doc: dict, results: list[str]) -> dict[str, float]:
    """The printed value, exactly (surrounding whitespace aside). Scored here rather than by lm-eval's
    exact_match metric because lm-eval reads a target such as ``[6, 4]`` as a list of two targets."""
    return {"exact_match": float(results[0].strip() == doc["answer"].strip())}


def gsm8k_dir() -> Path:
    """The directory in ``$GSM8K_DIR``; unset or not a directory is a FileFormatError saying what to set."""
    directory = os.environ.get("GSM8K_DIR")
    wanted = "export GSM8K_DIR=DIR, the directory holding GSM8K's train.jsonl and test.jsonl"
    if not directory:
        raise FileFormatError(f"gsm8k_local reads GSM8K from $GSM8K_DIR, which is not set: {wanted} (in this "
                              "repository's development setup: export GSM8K_DIR=../shared/data/gsm8k)")
    if not Path(directory).is_dir():
        raise FileFormatError(f"GSM8K_DIR={directory!r} is not a directory: {wanted}")
    return Path(directory)


def load_gsm8k(**_: object) -> datasets.DatasetDict:
    with one_line_errors("gsm8k_local"):
        directory = gsm8k_dir()
    return read_splits("gsm8k_local", {split: directory / f"{split}.jsonl" for split in GSM8K_SPLITS})
