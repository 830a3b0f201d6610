"""The engine: one decode loop for every policy and cache, with continuous batching.

``request -> Scheduler.schedule -> ModelRunner.execute (forward with cache, policy) -> Scheduler.update_from_output
(commit, EoTP) -> GenerationResult``. Requests finish independently and leave the batch at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from torch import nn

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.memory import check_memory, plan_memory
from l2pd_harness.decoding.policies import Policy, build_policy
from l2pd_harness.decoding.runner import ModelRunner
from l2pd_harness.decoding.scheduler import (
    GenerationResult,
    RunnerOutput,
    Scheduler,
    SchedulerOutput,
    batch_slots,
    check_lengths,
)
from l2pd_harness.models.common import BidirectionalLM

StepObserver = Callable[[SchedulerOutput, RunnerOutput], None]
ProgressObserver = Callable[[int], None]
"""Called after every step with the canvas positions it committed (all requests together)."""


class Engine:
    """Decodes tokenized prompts with ``cfg``'s policy, cache and batch size.

    ``eot_ids``: tokens that end a response (End-of-Text Prediction commits every position after the first
    committed one as end-of-text).
    ``policy``: overrides the policy ``cfg.policy`` names (e.g. a learned filter's).
    """

    def __init__(self, model: nn.Module, cfg: DecodeConfig, eot_ids: set[int] | None = None,
                 policy: Policy | None = None):
        if cfg.cache != "none" and not isinstance(model, BidirectionalLM):
            raise ValueError(f"cache={cfg.cache!r} needs the native backend (this model has no KV cache support)")
        self.model, self.cfg = model, cfg
        self.eot_ids = {model.config.eos_token_id} if eot_ids is None else set(eot_ids)
        self.policy = build_policy(cfg) if policy is None else policy

    def stream(self, prompts: list[list[int]], references: list[list[int]] | None = None,
               on_step: StepObserver | None = None, on_progress: ProgressObserver | None = None
               ) -> Iterator[tuple[int, GenerationResult]]:
        """Yield ``(prompt index, result)`` as sequences finish; ``references`` (the oracle's targets) are
        canvases of a previous decode, one per prompt; ``on_step`` sees every step's schedule and runner output
        (trace collection) before it is committed; ``on_progress`` hears how many positions each step committed
        (``len(prompts) * gen_length`` in all). Bad requests are refused here, before the first step."""
        if self.cfg.policy == "oracle" and references is None:
            raise ValueError("policy 'oracle' needs references: one reference output per prompt")
        check_lengths([len(p) for p in prompts], self.cfg.gen_length,
                      getattr(self.model.config, "max_sequence_length", None))
        self._check_memory(prompts)
        return self._steps(prompts, references, on_step, on_progress)

    def _check_memory(self, prompts: list[list[int]]) -> None:
        """On a GPU, refuse before any work a batch whose cache and step cannot fit the free memory."""
        weight = next(self.model.parameters())
        if weight.device.type != "cuda" or not isinstance(self.model, BidirectionalLM):
            return
        slots, longest = batch_slots(self.cfg.batch_size, len(prompts)), max(map(len, prompts), default=0)
        free, total = torch.cuda.mem_get_info(weight.device)
        plan = plan_memory(self.model.config, self.cfg, slots, longest, weight.dtype)
        check_memory(plan, free, total, slots, longest + self.cfg.gen_length)

    def _steps(self, prompts: list[list[int]], references: list[list[int]] | None, on_step: StepObserver | None,
               on_progress: ProgressObserver | None) -> Iterator[tuple[int, GenerationResult]]:
        device = next(self.model.parameters()).device
        scheduler = Scheduler(self.cfg, self.model.config.mask_token_id, self.model.config.eos_token_id,
                              self.eot_ids, prompts, references, device)
        # Only as many batch slots (and KV cache rows) as there are requests to fill them.
        runner = ModelRunner(self.model, replace(self.cfg, batch_size=scheduler.num_slots), self.policy)
        while scheduler.has_unfinished():
            scheduled = scheduler.schedule()
            output = runner.execute(scheduled)
            if on_step is not None:
                on_step(scheduled, output)
            before = scheduler.committed
            finished = scheduler.update_from_output(output)
            if on_progress is not None:
                on_progress(scheduler.committed - before)
            for request in finished:
                yield request.request_id, request.result()

    def generate(self, prompts: list[list[int]], references: list[list[int]] | None = None
                 ) -> list[GenerationResult]:
        """Results in prompt order."""
        results = dict(self.stream(prompts, references))
        return [results[i] for i in range(len(prompts))]


def generate(model: nn.Module, prompts: list[list[int]], cfg: DecodeConfig,
             references: list[list[int]] | None = None) -> list[GenerationResult]:
    """One-call decode: ``Engine(model, cfg).generate(prompts, references)``."""
    with torch.no_grad():
        return Engine(model, cfg).generate(prompts, references)
