"""Does a model know where the 0 of a changeone answer goes once most digits are written unchanged?

A one-token-per-step decode writes the kept digits first and needs the model to put the 0 in the last masked digit;
a threshold of 0.9 fails when every digit's keep probability clears 0.9 with nothing written. For the first N
changeone test problems: the list copied unchanged on a gen-64 canvas padded with end-of-text, then M of its digits
masked (M = 1, 2, 4 and all of them, always including the middle one), one forward pass; prints the mean probability
of 0 at the masked digits (the data's answer is 1 / M) and, with everything masked, how many problems have every
digit's keep probability at 0.9 or more. Usage: python results/tiny-model/changeone-probe.py MODEL [N]
"""

import random
import sys

import torch

from l2pd_harness.loading import load_model, load_tokenizer
from l2pd_harness.tasks import sample_problems
from l2pd_harness.tasks.changeone import listed_digits
from l2pd_harness.text import encode_prompt, token_ids

GEN_LENGTH = 64


def probabilities(model, prompt: list[int], canvas: list[int], masked: list[int]) -> torch.Tensor:
    ids = [model.config.mask_token_id if i in masked else token for i, token in enumerate(canvas)]
    with torch.no_grad():
        return model(torch.tensor([prompt + ids]))[0, len(prompt):].softmax(-1)  # [G, V]


def main(model_dir: str, n: int) -> None:
    model, tokenizer = load_model(model_dir)[0], load_tokenizer(model_dir)
    zero = {True: token_ids(tokenizer, "0")[0], False: token_ids(tokenizer, " 0")[0]}  # first digit: no space
    rng = random.Random(0)
    p_zero = {m: 0.0 for m in ("1", "2", "4", "all")}
    all_kept = 0
    for problem in sample_problems("changeone", "test", n, seed=123):
        answer = token_ids(tokenizer, ", ".join(listed_digits(problem["question"])))
        canvas = answer + [model.config.eos_token_id] * (GEN_LENGTH - len(answer))
        prompt = encode_prompt(tokenizer, problem["question"])
        digits = list(range(0, len(answer), 2))  # digit, comma, digit, ...
        middle = digits[len(digits) // 2]
        for m in p_zero:
            others = [d for d in digits if d != middle]
            masked = digits if m == "all" else [middle, *rng.sample(others, int(m) - 1)]
            probs = probabilities(model, prompt, canvas, masked if m != "all" else list(range(GEN_LENGTH)))
            p_zero[m] += sum(probs[d, zero[d == 0]].item() for d in masked) / len(masked) / n
            if m == "all":
                all_kept += all(probs[d, canvas[d]].item() >= 0.9 for d in digits)
    print({"P(0) at a masked digit, M masked": {m: round(p, 3) for m, p in p_zero.items()},
           "every digit kept at >= 0.9, all masked": f"{all_kept}/{n}"})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100)
