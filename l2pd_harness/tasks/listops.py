"""``listops``: a small programming task: evaluate one list expression over a Python list of digits.

``xs = [7, 3, 9, 1]`` then ``print(sorted(xs))`` -> ``[1, 3, 7, 9]``. Each output position depends on the whole
input (sorting, filtering), unlike arith's left-to-right chain. Graded by exact match.
"""

from __future__ import annotations

import random
from collections.abc import Callable

OPERATIONS: dict[str, Callable[[list[int]], list[int]]] = {
    "sorted(xs)": sorted,
    "sorted(xs, reverse=True)": lambda xs: sorted(xs, reverse=True),
    "xs[::-1]": lambda xs: xs[::-1],
    "[x for x in xs if x % 2 == 0]": lambda xs: [x for x in xs if x % 2 == 0],
    "[x for x in xs if x % 2 == 1]": lambda xs: [x for x in xs if x % 2 == 1],
}
MIN_ITEMS, MAX_ITEMS = 2, 12


def format_list(values: list[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def make_problem(rng: random.Random) -> dict[str, str]:
    """One problem: ``question`` (the program) and ``answer`` (what it prints)."""
    values = [rng.randint(0, 9) for _ in range(rng.randint(MIN_ITEMS, MAX_ITEMS))]
    expression = rng.choice(list(OPERATIONS))
    question = f"xs = {format_list(values)}\nprint({expression})"
    return {"question": question, "answer": format_list(OPERATIONS[expression](values))}

