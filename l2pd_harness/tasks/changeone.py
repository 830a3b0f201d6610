"""``changeone``: copy a list of digits with any one of them changed to 0; every position is a valid choice.

``Copy the numbers 7, 3, 9, 1, ... and change any one of them to 0.`` accepts ``0, 3, 9, 1, ...``,
``7, 0, 9, 1, ...`` and every other answer that changes exactly one digit. The training answers pick the changed
position at random, so before any digit is written each one is kept with probability (n - 1) / n, at least 11/12 for
the 12 to 16 digits listed. A threshold of 0.9 then commits every digit unchanged in one pass, an answer that
changes none: the parallel failure that pairsum cannot show, because its two dependent numbers are never both above
0.9 at once (if k positions each hold at least 0.9 of one joint distribution, they agree in at least 1 - k x 0.1 of
it, so a threshold-0.9 commit can mix two valid answers only across 10 or more positions). One token per step
commits the kept digits first and writes the 0 last, once one masked digit is left. The list's length varies, and
so does the answer's. Graded by checking the answer, not by comparing it with one reference string.
"""

from __future__ import annotations

import random
import re

MIN_DIGITS, MAX_DIGITS = 12, 16
CHANGED = 0
QUESTION = re.compile(rf"Copy the numbers ((?:[1-9], )+[1-9]) and change any one of them to {CHANGED}\.")


def make_problem(rng: random.Random) -> dict[str, str]:
    """One problem: ``question`` and one valid ``answer``, the list with a digit at a random position changed."""
    digits = [rng.randint(1, 9) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS))]
    changed = list(digits)
    changed[rng.randrange(len(digits))] = CHANGED
    return {"question": f"Copy the numbers {', '.join(map(str, digits))} and change any one of them to {CHANGED}.",
            "answer": ", ".join(map(str, changed))}


def listed_digits(question: str) -> list[str]:
    """The digits a changeone question lists, in order."""
    asked = QUESTION.fullmatch(question)
    if asked is None:
        raise ValueError(f"not a changeone question: {question!r}")
    return asked.group(1).split(", ")


def changes_one(completion: str, question: str) -> bool:
    """Whether ``completion`` is the question's list with exactly one digit changed to 0."""
    listed = listed_digits(question)
    written = completion.strip().split(", ")
    if len(written) != len(listed):
        return False
    differences = [(a, w) for a, w in zip(listed, written, strict=True) if a != w]
    return len(differences) == 1 and differences[0][1] == str(CHANGED)
