"""Rollout labels for filter training: does committing this position now keep a correct decode correct?

Oracle labels (:func:`l2pd_harness.filter.traces.collect`) ask whether a prediction equals one reference decode's
final token, which calls a prediction wrong whenever the reference wrote another, equally valid form (``Then``
where it wrote ``Later``). A rollout asks the question a commit rule faces. :func:`collect_rollouts` decodes the
problems with a confidence threshold, or with a rollout-labelled filter beside one (a DAgger round: the states the
filter itself reaches); in each pass of that trajectory the ``per_pass`` most confident masked positions it left
(confidence at least ``min_confidence``) are each committed in that pass as well, every one in a decode of its own
that then goes on with the same rule (a rollout); the label is whether that decode is still graded correct. Only
problems the trajectory gets right are asked: on the others every verdict would read "wrong" whatever the
commit.

The traces have the ``collect-traces`` format plus ``labelled [N, L]``, the positions with a verdict. A filter
trained on them serves beside the threshold it was collected with (``learned_commit=with_threshold``): it adds the
commits below the threshold that it judges safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.policies import Policy, StepState, top_k_commit
from l2pd_harness.evaluation import grade_rows, iter_decoded
from l2pd_harness.filter.traces import StepRecorder


@dataclass(frozen=True)
class ForcedCommit:
    """``base``'s commits plus one forced commit per request: request ``r`` also commits block position
    ``position[r]`` in pass ``block_step[r]`` of block ``block[r]``, if it is still masked then."""

    base: Policy
    block: torch.Tensor  # [R] long
    block_step: torch.Tensor  # [R] long
    position: torch.Tensor  # [R] long

    def __call__(self, state: StepState) -> torch.Tensor:
        request = state.request_id  # [B]
        due = (state.block == self.block[request]) & (state.block_step == self.block_step[request])  # [B]
        columns = torch.arange(state.masked.shape[1], device=state.masked.device)  # [L]
        forced = (columns == self.position[request][:, None]) & due[:, None] & state.masked  # [B, L]
        return self.base(state) | forced


def candidate_positions(steps: dict[str, torch.Tensor], correct: torch.Tensor, per_pass: int,
                        min_confidence: float) -> torch.Tensor:
    """``[N, L]`` bool: in each recorded pass ``steps`` (``masked``, ``commit``, ``confidence``, ``problem``) of a
    problem whose decode is ``correct [problems]``, the ``per_pass`` most confident positions left masked by the
    pass, confidence at least ``min_confidence``."""
    open_positions = steps["masked"] & ~steps["commit"] & (steps["confidence"] >= min_confidence)  # [N, L]
    open_positions &= correct[steps["problem"]][:, None]
    quota = torch.full((len(open_positions),), per_pass)  # [N]
    return top_k_commit(steps["confidence"], open_positions, quota)


def follows_threshold(cfg: DecodeConfig) -> bool:
    """Whether ``cfg`` decodes with a confidence threshold, alone or with a filter adding commits beside it."""
    return cfg.policy == "threshold" or (cfg.policy == "learned" and cfg.learned_commit == "with_threshold")


def collect_rollouts(model, tokenizer, problems: list[dict], cfg: DecodeConfig, threshold: Policy, per_pass: int,
                     min_confidence: float) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Record the decode of ``problems`` by ``threshold`` (``cfg``'s policy: a threshold, or a filter beside one)
    and label its candidate positions by rollout; returns the step tensors and the problems with that decode as
    their reference (``reference_correct`` is its verdict)."""
    if not follows_threshold(cfg):
        raise ValueError(f"rollouts follow a threshold decode (policy threshold, or learned with learned_commit "
                         f"with_threshold), not policy={cfg.policy!r} with learned_commit={cfg.learned_commit!r}")
    recorder = StepRecorder()
    decoded = list(iter_decoded(model, tokenizer, problems, cfg, desc=f"{cfg.policy} trajectory", policy=threshold,
                                on_step=recorder))
    correct = torch.tensor(grade_rows(decoded))  # [problems]
    steps = recorder.merged()
    block = steps["offset"] // cfg.block_length  # [N]
    labelled = candidate_positions(steps, correct, per_pass, min_confidence)  # [N, L]
    row, position = labelled.nonzero(as_tuple=True)  # [R] each: one rollout per candidate
    device = next(model.parameters()).device
    forced = ForcedCommit(threshold, *(t.to(device) for t in (block[row], steps["block_step"][row], position)))
    rollouts = iter_decoded(model, tokenizer, [problems[p] for p in steps["problem"][row].tolist()], cfg,
                            desc="rollouts", policy=forced)
    label = torch.zeros_like(labelled)
    label[row, position] = torch.tensor(grade_rows(list(rollouts)), dtype=torch.bool)
    trace = {"confidence": steps["confidence"], "margin": steps["margin"], "entropy": steps["entropy"],
             "masked": steps["masked"], "label": label, "labelled": labelled, "problem": steps["problem"],
             "block": block, "block_step": steps["block_step"]}
    problems_out = [{**problem, "reference_text": row["text"], "reference_canvas": row["canvas"],
                     "reference_correct": ok} for problem, row, ok in zip(problems, decoded, correct.tolist(),
                                                                           strict=True)]
    return trace, problems_out
