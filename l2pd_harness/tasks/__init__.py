"""The project's own task suite: deterministic generators with disjoint train/test splits, and their graders."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from l2pd_harness.tasks import arith, changeone, listops, pairsum

SPLITS = ("train", "test")
TEST_SHARE = 10  # one problem in TEST_SHARE (by a hash of its question) belongs to the test split
FINAL_ANSWER = re.compile(r"#### (-?[0-9.,]+)")


@dataclass(frozen=True)
class Task:
    name: str
    make_problem: Callable[[random.Random], dict[str, str]]
    grade: Callable[[str, dict[str, str]], bool]
    """``grade(completion, problem)`` -> correct? (``problem`` holds ``question`` and a reference ``answer``)"""


def final_number(text: str) -> str | None:
    """The number after ``####`` (GSM8K's answer line), commas dropped."""
    match = FINAL_ANSWER.search(text)
    return None if match is None else match.group(1).replace(",", "").rstrip(".")


def grade_final_number(completion: str, problem: dict[str, str]) -> bool:
    predicted = final_number(completion)
    return predicted is not None and predicted == final_number(problem["answer"])


def grade_exact(completion: str, problem: dict[str, str]) -> bool:
    return completion.strip() == problem["answer"].strip()


def grade_pair(completion: str, problem: dict[str, str]) -> bool:
    return pairsum.valid_pair(completion, problem["question"])


def grade_change(completion: str, problem: dict[str, str]) -> bool:
    return changeone.changes_one(completion, problem["question"])


TASKS = {
    "arith": Task("arith", arith.make_problem, grade_final_number),
    "listops": Task("listops", listops.make_problem, grade_exact),
    "pairsum": Task("pairsum", pairsum.make_problem, grade_pair),
    "changeone": Task("changeone", changeone.make_problem, grade_change),
}
DEFAULT_TASKS = ("arith", "changeone", "pairsum")
"""What the main job, the sweeps, the regression check and the decode benchmarks measure: the tasks on which the
decode policies reach different accuracies (on listops every rule commits a whole block at once and stays at 100%)."""


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"task {name!r} is not one of {sorted(TASKS)}")
    return TASKS[name]


def split_of(question: str) -> str:
    """The split a question belongs to, fixed by its text, so no seed can leak test problems into training."""
    digest = int(hashlib.sha256(question.encode()).hexdigest(), 16)
    return "test" if digest % TEST_SHARE == 0 else "train"


class TaskError(ValueError):
    """A task, split or problem count the task suite cannot supply; the message names it."""


def iter_problems(task: str, split: str, seed: int) -> Iterator[dict[str, str]]:
    """Endless problems of ``split`` drawn with ``seed``; each row also carries ``prompt`` and ``task``."""
    if split not in SPLITS:
        raise TaskError(f"split {split!r} is not one of {list(SPLITS)}")
    make = get_task(task).make_problem
    rng = random.Random(f"{task}:{split}:{seed}")
    while True:
        problem = make(rng)
        if split_of(problem["question"]) == split:
            yield {"task": task, "prompt": problem["question"], **problem}


def sample_problems(task: str, split: str, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` distinct problems of ``split``, drawn with ``seed``."""
    rows: dict[str, dict[str, str]] = {}
    for attempt, problem in enumerate(iter_problems(task, split, seed)):
        rows.setdefault(problem["question"], problem)
        if len(rows) == n:
            return list(rows.values())
        if attempt > 1000 * n:
            raise TaskError(f"task {task!r} has fewer than {n} distinct {split} problems")
    raise AssertionError("unreachable: iter_problems is endless")


def vocabulary_corpus(task: str, n: int = 20000) -> list[str]:
    """Texts of ``n`` problems of each split: every word and symbol the generator emits, for the tokenizer."""
    make = get_task(task).make_problem
    rng = random.Random(f"{task}:vocabulary")
    return [text for _ in range(n) for text in make(rng).values()]
