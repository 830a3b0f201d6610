"""``pairsum``: pick two numbers of a list that add up to a target; every problem has several valid answers.

``Which two of the numbers 3, 14, 6 and 11 add up to 17?`` accepts ``3 + 14 = 17``, ``14 + 3 = 17``,
``6 + 11 = 17`` and ``11 + 6 = 17``. The training answers pick a pair and its order at random, so before either
number is written every position of the answer is uncertain, and the two numbers depend on each other: committing
both in one pass picks each position's likeliest token on its own and mixes two valid answers into an invalid one
(``3 + 11 = 17``), the textbook failure of parallel decoding. One- and two-digit numbers make the answer's length
depend on the pair chosen. Graded by checking the answer, not by comparing it with one reference string.
"""

from __future__ import annotations

import random
import re

MIN_TARGET, MAX_TARGET = 10, 40
MIN_PAIRS, MAX_PAIRS = 2, 3
ANSWER = re.compile(r"\s*(\d+) \+ (\d+) = (\d+)\s*")
QUESTION = re.compile(r"Which two of the numbers ((?:\d+, )*\d+) and (\d+) add up to (\d+)\?")


def make_problem(rng: random.Random) -> dict[str, str]:
    """One problem: ``question`` and one valid ``answer`` (``a + b = target``) chosen at random. Every listed number
    belongs to exactly one valid pair, so any first number leads to an answer: the difficulty is in committing the
    two numbers consistently, not in searching the list."""
    target = rng.randint(MIN_TARGET, MAX_TARGET)
    smaller = rng.sample(range(1, (target + 1) // 2), rng.randint(MIN_PAIRS, MAX_PAIRS))  # a < target - a
    pairs = [(a, target - a) for a in smaller]
    listed = [n for pair in pairs for n in pair]
    rng.shuffle(listed)
    first, second = rng.choice(pairs)
    if rng.random() < 0.5:
        first, second = second, first
    question = (f"Which two of the numbers {', '.join(map(str, listed[:-1]))} and {listed[-1]} add up to "
                f"{target}?")
    return {"question": question, "answer": f"{first} + {second} = {target}"}


def valid_pair(completion: str, question: str) -> bool:
    """Whether ``completion`` is ``a + b = target`` with ``a`` and ``b`` two different numbers of the question's
    list that add up to its target."""
    asked, answer = QUESTION.fullmatch(question), ANSWER.fullmatch(completion)
    if asked is None:
        raise ValueError(f"not a pairsum question: {question!r}")
    if answer is None:
        return False
    listed = [int(n) for n in asked.group(1).split(", ")] + [int(asked.group(2))]
    target = int(asked.group(3))
    first, second, total = (int(n) for n in answer.groups())
    return first != second and {first, second} <= set(listed) and first + second == total == target
