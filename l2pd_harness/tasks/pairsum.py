"""``pairsum``: pick one of the listed pairs that add up to a target; every problem has several valid answers.

``Which two of the numbers (3, 14), (11, 6) and (9, 8) add up to 17?`` accepts ``3 + 14 = 17``, ``14 + 3 = 17``,
``6 + 11 = 17``, ``11 + 6 = 17``, ``9 + 8 = 17`` and ``8 + 9 = 17``. The training answers pick a pair and its order
at random, so before either number is written every position of the answer is uncertain, and the two numbers depend
on each other: committing both in one pass picks each position's likeliest token on its own and mixes two valid
answers into an invalid one (``3 + 11 = 17``), the textbook failure of parallel decoding. Each number's partner is
written beside it, so completing a pair is a copy, not a subtraction (the 2.7M-parameter test model did not learn
``target - a`` looked up in an unordered list in 3,700 CPU steps; results/tiny-model/candidate-pairsum). One- and
two-digit numbers make the answer's length depend on the pair chosen. Graded by checking the answer, not by
comparing it with one reference string.
"""

from __future__ import annotations

import random
import re

MIN_TARGET, MAX_TARGET = 10, 40
MIN_PAIRS, MAX_PAIRS = 2, 3
ANSWER = re.compile(r"\s*(\d+) \+ (\d+) = (\d+)\s*")
PAIR = re.compile(r"\((\d+), (\d+)\)")
QUESTION = re.compile(rf"Which two of the numbers ((?:{PAIR.pattern}, )*{PAIR.pattern} and {PAIR.pattern}) add up to "
                      r"(\d+)\?")


def make_problem(rng: random.Random) -> dict[str, str]:
    """One problem: ``question`` and one valid ``answer`` (``a + b = target``) chosen at random. Every listed number
    is listed once, in a pair that adds up to the target (pairs and the order within each shuffled), so any first
    number leads to an answer: the difficulty is in committing the two numbers consistently, not in searching."""
    target = rng.randint(MIN_TARGET, MAX_TARGET)
    smaller = rng.sample(range(1, (target + 1) // 2), rng.randint(MIN_PAIRS, MAX_PAIRS))  # a < target - a
    pairs = [(a, target - a) if rng.random() < 0.5 else (target - a, a) for a in smaller]
    listed = [f"({a}, {b})" for a, b in pairs]
    first, second = rng.choice(pairs)
    if rng.random() < 0.5:
        first, second = second, first
    question = f"Which two of the numbers {', '.join(listed[:-1])} and {listed[-1]} add up to {target}?"
    return {"question": question, "answer": f"{first} + {second} = {target}"}


def valid_pair(completion: str, question: str) -> bool:
    """Whether ``completion`` is ``a + b = target`` with ``a`` and ``b`` the two numbers of one of the question's
    pairs (in either order) adding up to its target."""
    asked, answer = QUESTION.fullmatch(question), ANSWER.fullmatch(completion)
    if asked is None:
        raise ValueError(f"not a pairsum question: {question!r}")
    if answer is None:
        return False
    pairs = {frozenset((int(a), int(b))) for a, b in PAIR.findall(asked.group(1))}
    target = int(asked.group(asked.lastindex))
    first, second, total = (int(n) for n in answer.groups())
    return first != second and {first, second} in pairs and first + second == total == target
