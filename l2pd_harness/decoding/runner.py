"""The model runner: turns a :class:`SchedulerOutput` into batched forward passes, picks tokens, asks the policy.

Rows are right-padded (left-aligned), so a column is a position for every row. Without a cache every row gets a
full pass. With a cache, rows at a block's first pass get a full pass that refreshes their cache slot, and the
others one pass over their query slice (``prefix``: block to end; ``dual``: the block) against the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.kv_cache import KVCache
from l2pd_harness.decoding.policies import Policy, StepState
from l2pd_harness.decoding.scheduler import RunnerOutput, ScheduledRequest, SchedulerOutput


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Token choice ``[B, L]`` at ``temperature > 0``: argmax of the logits perturbed by Gumbel noise in float64."""
    logits64 = logits.double()
    noise = torch.rand(logits64.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return (logits64.exp() / (-noise.log()) ** temperature).argmax(dim=-1)


def row_max(values: torch.Tensor, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max, argmax)`` over the last dimension, the first index among ties: what ``values.max(-1)`` gives.

    Found as the largest of ``chunk``-wide maxima, then the index within the winning chunk, because torch's CPU
    max-with-index is not vectorised along a long row (at a 126k vocabulary it cost most of a step's statistics);
    the maxima of chunks are, and the rest works on ``[..., V / chunk]`` and ``[..., chunk]``.
    """
    width = values.shape[-1] // chunk * chunk
    if width == 0:
        return values.max(dim=-1)
    chunk_max = values[..., :width].unflatten(-1, (width // chunk, chunk)).amax(-1)  # [..., V // chunk]
    best, chunk_index = chunk_max.max(dim=-1)  # [...] each
    columns = chunk_index[..., None] * chunk + torch.arange(chunk, device=values.device)  # [..., chunk]
    index = chunk_index * chunk + values.gather(-1, columns).argmax(-1)  # [...]
    if width < values.shape[-1]:
        tail_best, tail_index = values[..., width:].max(dim=-1)  # [...] each
        later = tail_best > best  # strictly larger: a tie keeps the earlier index
        best, index = torch.where(later, tail_best, best), torch.where(later, tail_index + width, index)
    return best, index


def choose_tokens(logits: torch.Tensor, mask_id: int, temperature: float, generator: torch.Generator | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prediction, top)``, each ``[B, L]``: the argmax (or :func:`gumbel_argmax`) over every token but the mask
    token (committing it would leave the position masked forever), and each position's largest logit, mask token
    included, for :func:`confidence_of`. Greedy choice reads the logits once for both. ``logits`` is left as it was:
    confidences still come from the model's own distribution."""
    mask_logit = logits[..., mask_id].clone()  # [B, L]
    logits[..., mask_id] = float("-inf")
    if temperature == 0:
        best, prediction = row_max(logits)
    else:
        prediction, best = gumbel_argmax(logits, temperature, generator), logits.amax(dim=-1)
    logits[..., mask_id] = mask_logit
    return prediction, torch.maximum(best, mask_logit)


def confidence_of(logits: torch.Tensor, prediction: torch.Tensor, top: torch.Tensor,
                  workspace: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L]`` float64: the probability ``softmax(logits)`` gives each ``prediction [B, L]``, given each
    position's largest logit ``top [B, L]``. ``workspace``, a float32 tensor of ``logits``' shape, holds the
    exponentials when given (a ``[B, L, V]`` tensor made fresh on every step costs its page faults on a CPU).

    The exponentials are taken in float32 against ``top``, and the chosen token's term is kept apart from the sum
    of the others, so a confident position keeps its distance from 1 (``1 - p`` is the others' share). This ranks
    and thresholds as a float64 softmax does (Fast-dLLM's; float32 probabilities round many confident positions to
    exactly 1.0) to about 1e-7 relative, and reads a ``[B, L, V]`` tensor three times in float32 instead of making
    two float64 copies of it: at a 126k vocabulary the largest cost of a step's statistics.
    """
    scaled = torch.sub(logits, top[..., None].float(), out=workspace).exp_()  # [B, L, V] float32
    chosen = scaled.gather(-1, prediction[..., None]).squeeze(-1).double()  # [B, L]
    others = scaled.scatter_(-1, prediction[..., None], 0.0).sum(-1).double()  # [B, L]
    return chosen / (chosen + others)


def right_pad(sequences: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """``[B, max_len]`` with each sequence left-aligned."""
    return nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad_id)


@dataclass
class StepBatch:
    """The scheduled rows as tensors, built once per step (right-padded ids, so a column is a position)."""

    ids: torch.Tensor  # [B, S]
    lengths: torch.Tensor  # [B] tokens in each row (prompt + canvas)
    block_start: torch.Tensor  # [B] column of each row's block
    prompt_length: torch.Tensor  # [B]
    slots: torch.Tensor  # [B]
    host_lengths: list[int]
    """``lengths`` as the host knows them: widths and counts come from here, not from reading the device."""
    host_block_start: list[int]
    host_slots: list[int]

    @classmethod
    def of(cls, rows: list[ScheduledRequest], pad_id: int, device: torch.device) -> StepBatch:
        def column(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, device=device)

        lengths, block_start, slots = ([len(r.token_ids) for r in rows], [r.block_start for r in rows],
                                       [r.slot for r in rows])
        return cls(right_pad([r.token_ids for r in rows], pad_id), column(lengths), column(block_start),
                   column([r.prompt_length for r in rows]), column(slots), lengths, block_start, slots)

    def select(self, group: list[int]) -> StepBatch:
        """The rows ``group``, padded only as wide as the longest of them."""
        lengths = [self.host_lengths[i] for i in group]
        return StepBatch(self.ids[group, : max(lengths)], self.lengths[group], self.block_start[group],
                         self.prompt_length[group], self.slots[group], lengths,
                         [self.host_block_start[i] for i in group], [self.host_slots[i] for i in group])


class ModelRunner:
    def __init__(self, model: nn.Module, cfg: DecodeConfig, policy: Policy):
        self.model, self.cfg, self.policy = model, cfg, policy
        self.mask_id, self.pad_id = model.config.mask_token_id, model.config.eos_token_id
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.exponentials = torch.empty(0, dtype=torch.float32, device=self.device)  # [B * L * V], largest step so far
        self.cache = None
        if cfg.cache != "none":
            self.cache = KVCache(model.config, cfg.batch_size, next(model.parameters()).dtype, self.device)

    @torch.no_grad()
    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        rows = scheduled.requests
        batch = StepBatch.of(rows, self.pad_id, self.device)
        uses_cache = [self.cache is not None and r.block_step > 0 for r in rows]
        passes = []  # (row indices, their logits [b, L, V], positions each row computed)
        for cached, forward in ((False, self._full_pass), (True, self._cached_pass)):
            group = [i for i, flag in enumerate(uses_cache) if flag == cached]
            if group:
                passes.append((group, *forward(batch.select(group))))
        if len(passes) == 1:  # one kind of pass for the whole batch: its logits as they are, no copy
            _, logits, computed = passes[0]
        else:
            logits = passes[0][1].new_empty((len(rows), *passes[0][1].shape[1:]))  # [B, L, V]
            computed = [0] * len(rows)
            for group, group_logits, group_computed in passes:
                logits[group] = group_logits
                for i, count in zip(group, group_computed, strict=True):
                    computed[i] = count
        return self._decide(rows, batch, logits, computed)

    def _workspace(self, shape: torch.Size) -> torch.Tensor:
        """A float32 tensor of ``shape`` for :func:`confidence_of`, the same memory from step to step."""
        if self.exponentials.numel() < shape.numel():
            self.exponentials = torch.empty(shape.numel(), dtype=torch.float32, device=self.device)
        return self.exponentials[: shape.numel()].view(shape)

    def _block_columns(self, block_start: torch.Tensor) -> torch.Tensor:
        """``[B, block_length]`` column of each block position given each row's ``block_start [B]``."""
        return block_start[:, None] + torch.arange(self.cfg.block_length, device=self.device)

    def _full_pass(self, batch: StepBatch) -> tuple[torch.Tensor, list[int]]:
        """Logits ``[B, block_length, V]`` from a pass over whole sequences (refreshing the cache if there is one)."""
        ids, lengths = batch.ids, batch.lengths  # [B, S], [B]
        attention_mask = (torch.arange(ids.shape[1], device=self.device) < lengths[:, None]).long()  # [B, S]
        kv_cache = None if self.cache is None else self.cache.refresh(batch.slots, lengths, ids.shape[1])
        index = self._block_columns(batch.block_start).clamp(max=ids.shape[1] - 1)  # [B, L]: a cut canvas ends early
        if self.cfg.cfg_scale == 0:
            return self.model(ids, attention_mask, kv_cache=kv_cache, logits_index=index), batch.host_lengths
        # Classifier-free guidance: push the logits away from a pass that cannot see the prompt.
        is_prompt = torch.arange(ids.shape[1], device=self.device) < batch.prompt_length[:, None]
        both = self.model(torch.cat([ids, ids.masked_fill(is_prompt, self.mask_id)]), attention_mask.repeat(2, 1),
                          logits_index=index.repeat(2, 1))
        cond, uncond = both.chunk(2)
        return uncond + (self.cfg.cfg_scale + 1) * (cond - uncond), batch.host_lengths

    def _cached_pass(self, batch: StepBatch) -> tuple[torch.Tensor, list[int]]:
        """Logits ``[B, block_length, V]`` from a pass over each row's query slice against the cache. The slice
        starts ``logit_shift`` positions before the block: a shifted model reads a position's prediction there."""
        shift = self.model.logit_shift
        lengths, start = batch.lengths, batch.block_start - shift  # [B], [B]
        tails = [length - begin + shift for length, begin in zip(batch.host_lengths, batch.host_block_start,
                                                                  strict=True)]
        width = self.cfg.block_length + shift if self.cfg.cache == "dual" else max(tails)
        positions = start[:, None] + torch.arange(width, device=self.device)  # [B, Q]
        ids = batch.ids.gather(1, positions.clamp(max=batch.ids.shape[1] - 1))  # [B, Q]
        kv_cache = self.cache.reuse(batch.slots, batch.host_slots, positions, lengths, batch.ids.shape[1])
        index = self._block_columns(torch.full_like(start, shift)).clamp(max=width - 1)  # [B, L] in the slice
        return self.model(ids, kv_cache=kv_cache, logits_index=index), [min(width, tail) for tail in tails]

    def _decide(self, rows: list[ScheduledRequest], batch: StepBatch, logits: torch.Tensor,
                computed: list[int]) -> RunnerOutput:
        """Token choice and confidence on each block position, then the policy's commit mask."""
        columns = self._block_columns(batch.block_start)  # [B, L]
        live = columns < batch.lengths[:, None]  # [B, L]: false past a truncated canvas's end
        block_tokens = batch.ids.gather(1, columns.clamp(max=batch.ids.shape[1] - 1))  # [B, L]
        prediction, top = choose_tokens(logits, self.mask_id, self.cfg.temperature, self.generator)  # [B, L] each
        confidence = confidence_of(logits, prediction, top, self._workspace(logits.shape))  # [B, L]
        reference = None
        if rows[0].reference is not None:
            reference = torch.stack([r.reference for r in rows])
        # One host-to-device copy for both per-row counters.
        block_step, request_id = torch.tensor([(r.block_step, r.request_id) for r in rows],
                                              device=self.device).unbind(-1)  # [B] each
        # Positions cut off the canvas read as settled and certain (margin and entropy, where read, are read only
        # at masked positions).
        state = StepState(confidence=confidence.masked_fill(~live, 1.0), prediction=prediction,
                          masked=live & (block_tokens == self.mask_id), logits=logits,
                          block_step=block_step, request_id=request_id,
                          block=(batch.block_start - batch.prompt_length) // self.cfg.block_length,
                          noise=torch.rand(confidence.shape, dtype=torch.float64, device=self.device,
                                           generator=self.generator),
                          reference=reference)
        commit_mask = self.policy(state)
        finite = torch.isfinite(confidence).all(-1)  # [B]: NaN or infinite logits make every probability NaN
        return RunnerOutput([r.request_id for r in rows], commit_mask, computed, state, finite)
