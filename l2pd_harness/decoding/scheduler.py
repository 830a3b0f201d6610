"""The scheduler: owns every request's progress (canvas, block, step log) and the batch slots.

Each engine step: :meth:`Scheduler.schedule` admits waiting requests into free slots and says what every running
request needs computed (:class:`SchedulerOutput`); the runner answers with a :class:`RunnerOutput`; and
:meth:`Scheduler.update_from_output` commits it, applies End-of-Text Prediction, moves finished blocks on and
frees the slots of finished requests at once, so the next step already refills them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.policies import StepState


class DecodeError(ValueError):
    """A request the engine cannot decode (too long for the model) or a decode that went wrong (no progress within
    its budget, non-finite logits); the message names the request."""


def check_lengths(prompt_lengths: list[int], gen_length: int, max_length: int | None) -> None:
    """Refuse, before any decoding, the first prompt whose prompt + canvas exceeds the model's ``max_length``."""
    if max_length is None:
        return
    for number, length in enumerate(prompt_lengths, start=1):
        if length + gen_length > max_length:
            raise DecodeError(f"prompt {number} of {len(prompt_lengths)}: {length} prompt tokens + {gen_length} canvas "
                              f"positions = {length + gen_length}, {length + gen_length - max_length} more than the "
                              f"model's max_sequence_length {max_length}")


def batch_slots(batch_size: int, requests: int) -> int:
    """Batch slots (and KV cache rows) a decode uses: never more than there are requests, so a huge
    ``batch_size`` costs nothing."""
    return max(1, min(batch_size, requests))


@dataclass(frozen=True)
class ScheduledRequest:
    """What the runner needs of one request for one forward pass."""

    request_id: int
    slot: int
    token_ids: torch.Tensor
    """``[prompt + canvas]``: the sequence as it stands (with ``eotp_mode`` truncate, the canvas up to its live
    end)."""
    prompt_length: int
    block_start: int
    """Column of the current block's first position in ``token_ids``."""
    block_step: int
    """Passes already spent on this block; 0 means a block's first pass (a cache refresh)."""
    reference: torch.Tensor | None
    """``[block_length]`` reference output on the block (oracle policy), end-of-text past the canvas."""


@dataclass
class SchedulerOutput:
    requests: list[ScheduledRequest]


@dataclass
class RunnerOutput:
    """Per scheduled request (same order): the pass's commits on its block and the positions it computed."""

    request_ids: list[int]
    commit_mask: torch.Tensor
    """``[B, block_length]`` bool."""
    positions_computed: list[int]
    state: StepState
    """What the policy saw: ``state.prediction`` is what a commit writes; trace collection reads the rest."""
    finite: torch.Tensor
    """``[B]`` bool: the row's logits were finite (checked with the commits, in the step's one transfer)."""


@dataclass
class GenerationResult:
    """One sequence's canvas and its step log."""

    token_ids: list[int]
    """The ``gen_length`` canvas tokens; with EoTP the tail after the first end-of-text reads end-of-text."""
    nfe: int
    """Forward passes (number of function evaluations) spent on this sequence."""
    tokens_per_step: list[int] = field(default_factory=list)
    """Positions committed at each forward pass."""
    positions_per_step: list[int] = field(default_factory=list)
    """Positions each forward pass computed for this sequence (fewer with a KV cache)."""
    latency_s: float = 0.0
    """Wall time from this sequence's first forward pass until it was finished."""


@dataclass
class Request:
    request_id: int
    prompt: torch.Tensor  # [prompt_len]
    canvas: torch.Tensor  # [gen_length]
    reference: torch.Tensor | None  # [gen_length]
    live_length: int
    """Canvas positions still decoded: ``gen_length`` until EoTP commits the tail after an end-of-text."""
    block: int = 0
    block_step: int = 0
    slot: int = -1
    started_at: float = 0.0
    tokens_per_step: list[int] = field(default_factory=list)
    positions_per_step: list[int] = field(default_factory=list)

    def result(self) -> GenerationResult:
        return GenerationResult(self.canvas.tolist(), len(self.tokens_per_step), self.tokens_per_step,
                                self.positions_per_step, time.perf_counter() - self.started_at)


class Scheduler:
    def __init__(self, cfg: DecodeConfig, mask_id: int, eos_id: int, eot_ids: set[int],
                 prompts: list[list[int]], references: list[list[int]] | None, device: torch.device):
        if references is not None and len(references) != len(prompts):
            raise ValueError(f"{len(references)} references for {len(prompts)} prompts")
        self.cfg, self.mask_id, self.eos_id = cfg, mask_id, eos_id
        self.eot_ids = torch.tensor(sorted(eot_ids), device=device)
        self.waiting = deque(
            Request(i, torch.tensor(prompt, device=device),
                    torch.full((cfg.gen_length,), mask_id, device=device),
                    None if references is None else self._canvas_sized(references[i], device),
                    live_length=cfg.gen_length)
            for i, prompt in enumerate(prompts))
        self.running: dict[int, Request] = {}
        self.num_slots = batch_slots(cfg.batch_size, len(prompts))
        self.free_slots = list(range(self.num_slots))[::-1]
        self.committed = 0
        """Canvas positions committed so far over all requests (decoded, or filled by EoTP): progress."""

    def _canvas_sized(self, reference: list[int], device: torch.device) -> torch.Tensor:
        tokens = torch.full((self.cfg.gen_length,), self.eos_id, device=device)
        tokens[: len(reference)] = torch.tensor(reference[: self.cfg.gen_length], device=device)
        return tokens

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        while self.waiting and self.free_slots:
            request = self.waiting.popleft()
            request.slot, request.started_at = self.free_slots.pop(), time.perf_counter()
            self.running[request.request_id] = request
        return SchedulerOutput([self._scheduled(r) for r in self.running.values()])

    def _scheduled(self, r: Request) -> ScheduledRequest:
        start = r.block * self.cfg.block_length
        reference = None if r.reference is None else r.reference[start:start + self.cfg.block_length]
        canvas = r.canvas[: r.live_length] if self.cfg.eotp_mode == "truncate" else r.canvas
        return ScheduledRequest(r.request_id, r.slot, torch.cat([r.prompt, canvas]),
                                len(r.prompt), len(r.prompt) + start, r.block_step, reference)

    def update_from_output(self, output: RunnerOutput) -> list[Request]:
        """Commit one step's results; returns the requests that finished with it. Every row is worked out on the
        device at once and read back in one transfer (a host synchronisation per row would stall the device)."""
        rows = [self.running[request_id] for request_id in output.request_ids]
        blocks, facts = self._committed_blocks(rows, output)
        finished = []
        for row, (r, (committed, end, filled, left, finite)) in enumerate(zip(rows, facts.tolist(), strict=True)):
            if not finite:
                raise DecodeError(f"request {r.request_id}: forward pass {len(r.tokens_per_step) + 1} returned NaN "
                                  "or infinite logits (corrupt weights, or an fp16 overflow: try dtype bfloat16 or "
                                  "float32)")
            start = r.block * self.cfg.block_length
            r.canvas[start:start + self.cfg.block_length] = blocks[row]
            r.tokens_per_step.append(committed)
            r.positions_per_step.append(output.positions_computed[row])
            self.committed += committed
            if end < self.cfg.block_length and start + end + 1 < r.live_length:
                # Every position of the later blocks up to the old end is still masked: EoTP fills them too.
                self.committed += filled + max(0, r.live_length - start - self.cfg.block_length)
                r.live_length = start + end + 1
                r.canvas[r.live_length:] = self.eos_id
            if self._advance(r, block_done=left == 0):
                finished.append(self.running.pop(r.request_id))
                self.free_slots.append(r.slot)
        return finished

    def _committed_blocks(self, rows: list[Request], output: RunnerOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' blocks ``[B, L]`` after this pass's commits and End-of-Text Prediction, and per row ``[B, 5]``:
        positions committed, the end-of-text cut (offset in the block, ``L`` for none), positions EoTP filled in
        the block, positions left masked in the block, whether the logits were finite."""
        length = self.cfg.block_length
        commit, state = output.commit_mask, output.state  # [B, L]
        blocks = torch.stack([r.canvas[r.block * length:(r.block + 1) * length] for r in rows])  # [B, L]
        blocks = torch.where(commit, state.prediction, blocks)
        end = torch.full_like(state.block_step, length)  # [B]
        filled = torch.zeros_like(end)
        if self.cfg.eotp:
            ends = commit & torch.isin(state.prediction, self.eot_ids)  # [B, L]
            columns = torch.arange(length, device=commit.device)
            # fill keeps the end-of-text tail in the model's input (it was trained with such padding); truncate, the
            # paper's, cuts it after its most confident end-of-text, so later passes are shorter.
            first = columns.masked_fill(~ends, length).amin(-1)  # [B]
            most_confident = state.confidence.masked_fill(~ends, -1).argmax(-1)  # [B]
            end = torch.where(ends.any(-1), first if self.cfg.eotp_mode == "fill" else most_confident, end)
            after = columns > end[:, None]  # [B, L]
            filled = (after & (blocks == self.mask_id)).sum(-1)
            blocks = blocks.masked_fill(after, self.eos_id)
        facts = torch.stack([commit.sum(-1), end, filled, (blocks == self.mask_id).sum(-1),
                             output.finite.long()], dim=-1)  # [B, 5]
        return blocks, facts

    def _advance(self, r: Request, block_done: bool) -> bool:
        """Count the pass against the block, move to the next block once this one is committed; true when the
        whole live canvas is committed."""
        r.block_step += 1
        if len(r.tokens_per_step) > self.cfg.gen_length:  # every pass commits at least one position
            raise DecodeError(f"request {r.request_id} is not finished after {len(r.tokens_per_step)} forward passes, "
                              f"more than its canvas of {self.cfg.gen_length} positions can need: its policy "
                              "committed nothing in some passes")
        if not block_done:
            return False
        r.block, r.block_step = r.block + 1, 0
        return r.block * self.cfg.block_length >= r.live_length
