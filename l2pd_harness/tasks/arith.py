"""``arith``: GSM8K-style multi-step word problems (2-4 additions/subtractions) with worked solutions.

The solution has one line per operation (``12 + 7 = 19``) and a final ``#### 14`` line, in GSM8K's JSONL format.
Two free choices in the surface form are what parallel decoding trips on, as it does on real chat outputs: a line may
open with a filler word (`` Then``, `` Next``, `` Later``), which shifts every later token by one position, and an
addition may list its operands in either order.
"""

from __future__ import annotations

import random

NAMES = ("Tom", "Mia", "Sam", "Ava", "Leo", "Zoe", "Ben", "Ivy", "Max", "Emma", "Noah", "Lily", "Jack", "Ella",
         "Owen", "Ruby", "Liam", "Nora", "Eli", "Rosa")
ITEMS = ("apples", "marbles", "stickers", "coins", "books", "cards", "shells", "pencils", "cookies", "stamps",
         "buttons", "flowers")
CONNECTORS = ("Then", "Later", "After that", "Next")
GAIN = ("{p} buys {n} more {items}.", "{p} finds {n} more {items}.", "{friend} gives {o} {n} {items}.",
        "{p} wins {n} {items}.", "{p} picks up {n} {items}.")
LOSS = ("{p} gives {n} {items} to {friend}.", "{p} loses {n} {items}.", "{p} sells {n} {items}.",
        "{p} trades away {n} {items}.", "{friend} takes {n} of the {items}.")
QUESTIONS = ("How many {items} does {name} have now?", "How many {items} does {name} have in the end?")
PRONOUNS = {"he": "him", "she": "her"}
FEMININE = {"Mia", "Ava", "Zoe", "Ivy", "Emma", "Lily", "Ella", "Ruby", "Nora", "Rosa"}
LINE_OPENERS = ("", " Then ", " Next ", " Later ")
MAX_TOTAL, MAX_OPERAND = 60, 15


def make_problem(rng: random.Random) -> dict[str, str]:
    """One problem: ``question`` and GSM8K-style ``answer`` ending in ``#### N``."""
    name = rng.choice(NAMES)
    friend = rng.choice([n for n in NAMES if n != name])
    subject = "she" if name in FEMININE else "he"
    items = rng.choice(ITEMS)
    total = rng.randint(2, 30)
    sentences = [f"{name} has {total} {items}."]
    lines = []
    for index in range(rng.randint(2, 4)):
        gain = total <= 1 or (total + 1 <= MAX_TOTAL and rng.random() < 0.5)
        amount = rng.randint(1, min(MAX_OPERAND, MAX_TOTAL - total) if gain else min(MAX_OPERAND, total))
        template = rng.choice(GAIN if gain else LOSS)
        pronoun = subject.capitalize() if index == 0 else subject  # lower case after a connector
        sentence = template.format(p=pronoun, n=amount, items=items, friend=friend, o=PRONOUNS[subject])
        sentences.append(sentence if index == 0 else f"{rng.choice(CONNECTORS)} {sentence}")
        if gain:
            left, right = (amount, total) if rng.random() < 0.3 else (total, amount)
            equation = f"{left} + {right} = {total + amount}"
            total += amount
        else:
            equation = f"{total} - {amount} = {total - amount}"
            total -= amount
        lines.append(rng.choice(LINE_OPENERS) + equation)
    sentences.append(rng.choice(QUESTIONS).format(items=items, name=name))
    return {"question": " ".join(sentences), "answer": "\n".join([*lines, f"#### {total}"])}

