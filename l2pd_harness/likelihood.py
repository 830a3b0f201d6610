"""LLaDA's Monte-Carlo log-likelihood of a continuation given a context (a lower bound, as in its paper).

Each sample masks ``k`` of the continuation's ``L`` tokens (``k`` spread evenly over 1..L across the samples from a
random start, positions chosen at random), scores the masked tokens by cross-entropy, and weights the sum by
``L / k``; the estimate is minus the mean over ``mc_num`` samples. The greedy flag asks whether one pass over the
fully masked continuation predicts it exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mask_counts(length: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """``[samples]`` masked-token counts in 1..length, evenly spaced from a random start (stratified)."""
    start = torch.randint(1, length + 1, (), generator=generator, device=generator.device)
    spread = torch.linspace(float(start), float(start) + (samples - 1) * length / samples, samples,
                            device=generator.device)
    return (spread.round().long() - 1) % length + 1


@torch.no_grad()
def monte_carlo_loglikelihood(model: nn.Module, prompt: list[int], target: list[int], mc_num: int,
                              batch_size: int, generator: torch.Generator) -> tuple[float, bool]:
    """``(log-likelihood estimate, greedy)`` of ``target`` after ``prompt``."""
    if not target:
        raise ValueError("loglikelihood of an empty continuation is undefined")
    device, mask_id = generator.device, model.config.mask_token_id
    sequence = torch.tensor(prompt + target, device=device)  # [P + L]
    length, prompt_len = len(target), len(prompt)
    counts = mask_counts(length, mc_num, generator)  # [mc_num]
    total = 0.0
    for chunk in counts.split(batch_size):
        ranks = torch.rand(len(chunk), length, generator=generator, device=device).argsort(-1)  # [b, L]
        masked = torch.zeros(len(chunk), len(sequence), dtype=torch.bool, device=device)
        masked[:, prompt_len:] = ranks < chunk[:, None]  # a random subset of k positions per row
        noisy = sequence.expand(len(chunk), -1).masked_fill(masked, mask_id)  # [b, P + L]
        logits = model(noisy)  # [b, P + L, V]
        loss = F.cross_entropy(logits[masked].float(), sequence.expand(len(chunk), -1)[masked], reduction="none")
        weights = (length / chunk.float())[:, None].expand_as(masked)[masked]
        total += float((loss * weights).sum())
    fully_masked = torch.cat([sequence[:prompt_len], torch.full((length,), mask_id, device=device)])
    greedy = bool((model(fully_masked[None])[0, prompt_len:].argmax(-1) == sequence[prompt_len:]).all())
    return -total / mc_num, greedy
