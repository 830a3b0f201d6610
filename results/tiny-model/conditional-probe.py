"""Does a model know the second number of a pairsum answer once the first is written (and the reverse)?

For the first N pairsum test problems: the reference answer ``a + b = target`` on a gen-64 canvas padded with
end-of-text, only ``b``'s tokens masked (then only ``a``'s), one forward pass; counts the problems whose masked
number the argmax restores exactly. Usage: python results/tiny-model/conditional-probe.py MODEL [N]
"""

import re
import sys

import torch

from l2pd_harness.loading import load_model, load_tokenizer
from l2pd_harness.tasks import sample_problems
from l2pd_harness.text import encode_prompt, token_ids


def restored(model, prompt: list[int], canvas: list[int], hidden: range) -> bool:
    ids = list(canvas)
    for position in hidden:
        ids[position] = model.config.mask_token_id
    with torch.no_grad():
        prediction = model(torch.tensor([prompt + ids]))[0, len(prompt):].argmax(-1)  # [G]
    return all(prediction[p].item() == canvas[p] for p in hidden)


def main(model_dir: str, n: int) -> None:
    model, tokenizer = load_model(model_dir)[0], load_tokenizer(model_dir)
    counts = {"second given first": 0, "first given second": 0}
    for problem in sample_problems("pairsum", "test", n, seed=123):
        a, b, target = re.fullmatch(r"(\d+) \+ (\d+) = (\d+)", problem["answer"]).groups()
        pieces = [token_ids(tokenizer, text) for text in (a, " +", " " + b, " = " + target)]
        first = range(len(pieces[0]))
        second = range(len(pieces[0]) + len(pieces[1]), len(pieces[0]) + len(pieces[1]) + len(pieces[2]))
        answer = sum(pieces, [])
        canvas = answer + [model.config.eos_token_id] * (64 - len(answer))
        prompt = encode_prompt(tokenizer, problem["question"])
        counts["second given first"] += restored(model, prompt, canvas, second)
        counts["first given second"] += restored(model, prompt, canvas, first)
    print({name: f"{count}/{n}" for name, count in counts.items()})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100)
