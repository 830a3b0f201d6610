"""LLaDA's reference sampler: semi-autoregressive blocks, a fixed commit quota per step, batched with left padding.

Each block of ``block_length`` canvas positions gets ``steps / num_blocks`` forward passes; at each pass the quota of
the linear schedule (the block's masked count spread evenly, remainder to the first passes) is committed, choosing
the most confident masked positions (``low_confidence``) or random ones (``random``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

REMASKING = ("low_confidence", "random")


@dataclass
class GenerationConfig:
    """Settings of one reference decode; checked on construction."""

    gen_length: int = 256
    """Canvas positions after the prompt."""
    block_length: int = 32
    """Positions per semi-autoregressive block; must divide ``gen_length``."""
    steps: int | None = None
    """Forward passes in total, spread evenly over the blocks; ``None`` means ``gen_length`` (one token per step)."""
    remasking: str = "low_confidence"
    """Which masked positions of the block get the step's quota: the most confident, or random ones."""
    temperature: float = 0.0
    """Gumbel-noise temperature of the token choice; 0 is greedy."""
    cfg_scale: float = 0.0
    """Classifier-free guidance strength (unconditional pass with the prompt masked); 0 disables it."""
    seed: int = 0
    """Seed of the random choices (temperature noise, random remasking)."""

    def __post_init__(self) -> None:
        if self.gen_length <= 0:
            raise ValueError(f"gen_length={self.gen_length} must be a positive integer")
        if self.block_length <= 0 or self.gen_length % self.block_length:
            raise ValueError(f"block_length={self.block_length} must be a positive divisor of "
                             f"gen_length={self.gen_length}")
        self.steps = self.gen_length if self.steps is None else self.steps
        if self.steps <= 0 or self.steps % self.num_blocks or self.steps > self.gen_length:
            raise ValueError(f"steps={self.steps} must be a multiple of the number of blocks ({self.num_blocks}) "
                             f"between {self.num_blocks} and gen_length={self.gen_length}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r} is not one of {list(REMASKING)}")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale={self.cfg_scale} must be >= 0")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


@dataclass
class GenerationResult:
    """One sequence's canvas and its step log."""

    token_ids: list[int]
    """The ``gen_length`` canvas tokens, end-of-text padding included."""
    nfe: int
    """Forward passes (number of function evaluations) spent on this sequence."""
    tokens_per_step: list[int] = field(default_factory=list)
    """Positions committed at each forward pass."""
    latency_s: float = 0.0
    """Wall time from the start of its batch until this sequence was finished."""


def linear_schedule(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Commit quota ``[B, steps]``: ``masked_count [B]`` split evenly, the remainder to the first steps."""
    base = masked_count // steps  # [B]
    remainder = masked_count % steps  # [B]
    step_index = torch.arange(steps, device=masked_count.device)  # [steps]
    return base[:, None] + (step_index[None, :] < remainder[:, None]).long()


def top_k_commit(score: torch.Tensor, candidates: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Commit mask ``[B, L]``: the ``quota [B]`` highest-``score`` positions among ``candidates [B, L]``."""
    masked_score = score.masked_fill(~candidates, float("-inf"))
    order = masked_score.argsort(dim=-1, descending=True, stable=True)  # [B, L]
    arange = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, arange)  # rank[b, i]: place of position i in the order
    return (rank < quota[:, None]) & candidates


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Token choice ``[B, L]``: argmax of the logits, perturbed by Gumbel noise in float64 when ``temperature > 0``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits64 = logits.double()
    noise = torch.rand(logits64.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return (logits64.exp() / (-noise.log()) ** temperature).argmax(dim=-1)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, P], attention_mask [B, P])`` with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=device)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def guided_logits(model: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor, prompt_mask: torch.Tensor,
                  mask_id: int, cfg_scale: float) -> torch.Tensor:
    """Logits ``[B, T, V]``; with ``cfg_scale > 0`` pushed away from an unconditional pass whose prompt is masked."""
    if cfg_scale == 0:
        return model(x, attention_mask)
    unconditional = x.masked_fill(prompt_mask, mask_id)
    both = model(torch.cat([x, unconditional]), torch.cat([attention_mask, attention_mask]))
    cond, uncond = both.chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], cfg: GenerationConfig) -> list[GenerationResult]:
    """Decode one batch of tokenized prompts; every sequence spends exactly ``cfg.steps`` forward passes."""
    device = next(model.parameters()).device
    mask_id = model.config.mask_token_id
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt_ids, prompt_mask = left_pad(prompts, model.config.eos_token_id, device)
    batch, prompt_width = prompt_ids.shape
    canvas = torch.full((batch, cfg.gen_length), mask_id, dtype=torch.long, device=device)
    x = torch.cat([prompt_ids, canvas], dim=1)  # [B, P + gen_length]
    attention_mask = torch.cat([prompt_mask, torch.ones_like(canvas)], dim=1)
    is_prompt = torch.cat([prompt_mask.bool(), torch.zeros_like(canvas, dtype=torch.bool)], dim=1)
    committed_per_step: list[torch.Tensor] = []
    start = time.perf_counter()
    for block in range(cfg.num_blocks):
        # Columns of this block in x; only they are scored (a float64 softmax over the whole canvas would cost
        # gen_length * vocab * 8 bytes per row, gigabytes for LLaDA-8B at long canvases).
        lo = prompt_width + block * cfg.block_length
        hi = lo + cfg.block_length
        quota = linear_schedule((x[:, lo:hi] == mask_id).sum(-1), cfg.steps_per_block)  # [B, steps_per_block]
        for step in range(cfg.steps_per_block):
            logits = guided_logits(model, x, attention_mask, is_prompt, mask_id, cfg.cfg_scale)[:, lo:hi]
            prediction = gumbel_argmax(logits, cfg.temperature, generator)  # [B, block_length]
            if cfg.remasking == "low_confidence":
                score = logits.double().softmax(-1).gather(-1, prediction[..., None]).squeeze(-1)
            else:
                score = torch.rand(prediction.shape, dtype=torch.float64, device=device, generator=generator)
            candidates = x[:, lo:hi] == mask_id  # [B, block_length]
            commit = top_k_commit(score, candidates, quota[:, step])  # [B, block_length]
            x[:, lo:hi] = torch.where(commit, prediction, x[:, lo:hi])
            committed_per_step.append(commit.sum(-1))
    latency = time.perf_counter() - start
    tokens_per_step = torch.stack(committed_per_step, dim=1).tolist()  # [B, steps]
    return [GenerationResult(token_ids=x[row, prompt_width:].tolist(), nfe=cfg.steps,
                             tokens_per_step=tokens_per_step[row], latency_s=latency) for row in range(batch)]
