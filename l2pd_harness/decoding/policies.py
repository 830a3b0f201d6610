"""Decode policies: which still-masked positions of the current block a forward pass commits.

A policy is a pure tensor function of one batched :class:`StepState` (no model, no cache, no per-row loop) that
returns a commit mask ``[B, L]`` over the block's ``L`` positions; it only ever commits masked positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from l2pd_harness.decoding.config import DecodeConfig

Filter = Callable[["StepState"], torch.Tensor]
"""A learned filter: ``StepState -> [B, L]`` probability that each position's prediction is already final."""


@dataclass
class StepState:
    """What a policy sees of one engine step, for every row in flight."""

    confidence: torch.Tensor
    """``[B, L]`` float: probability of the predicted token at each block position."""
    prediction: torch.Tensor
    """``[B, L]`` long: the token each block position would get now."""
    masked: torch.Tensor
    """``[B, L]`` bool: positions still masked (false for committed positions)."""
    block_step: torch.Tensor
    """``[B]`` long: forward passes already spent on this row's current block."""
    noise: torch.Tensor
    """``[B, L]`` float in [0, 1): seeded random scores (``fixed`` with random remasking)."""
    reference: torch.Tensor | None = None
    """``[B, L]`` long: each row's reference output on the block (``oracle`` only)."""
    request_id: torch.Tensor | None = None
    """``[B]`` long: the request each row decodes (its index among the prompts), for rules with per-request
    settings (a rollout's one forced commit)."""
    block: torch.Tensor | None = None
    """``[B]`` long: index of the block each row is decoding."""
    margin: torch.Tensor | None = None
    """``[B, L]`` float: top-1 minus top-2 probability at each block position (:meth:`spread`)."""
    entropy: torch.Tensor | None = None
    """``[B, L]`` float: entropy (nats) of each block position's predicted distribution (:meth:`spread`)."""
    logits: torch.Tensor | None = None
    """``[B, L, V]``: the model's logits, from which :meth:`spread` works out margin and entropy in float64 when
    first asked (at a real vocabulary each is a pass over the largest tensor of a step: never made for a policy that
    does not read them)."""
    filter_inputs: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)
    """``[B, L, F]`` learned-filter inputs by feature names, kept when first made (``LearnedFilter.features``), so
    a step observer recording them for training reads the policy's own instead of making them again."""
    judged: torch.Tensor | None = None
    """``[B, K]`` long: block positions whose filter output the policy reads this step, ``K`` per row (a row with
    fewer repeats some; ``None``: every masked position). ``Learned`` beside a threshold with ``K`` candidates per
    pass sets it on the copy of the state it hands its filter, so a filter judging each position by its own
    features makes margin and entropy at ``K`` positions per row instead of the block's ``L``."""

    def spread(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(margin, entropy)``, each ``[B, L]``, made once per step."""
        if self.margin is None or self.entropy is None:
            self.margin, self.entropy = spread_of(self.logits)
        return self.margin, self.entropy

    def spread_judged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(margin, entropy)``, each ``[B, L]``, made at the ``judged`` positions only (the others read as settled:
        margin 1, entropy 0); not kept. Gathered by index, so no host sync."""
        rows, vocab = self.logits.shape[0], self.logits.shape[-1]
        index = self.judged[:, :, None].expand(rows, self.judged.shape[1], vocab)  # [B, K, V], a view
        margin, entropy = spread_of(self.logits.gather(1, index))  # [B, K] each
        settled_margin = torch.ones(self.masked.shape, dtype=margin.dtype, device=margin.device)  # [B, L]
        return settled_margin.scatter(1, self.judged, margin), torch.zeros_like(settled_margin).scatter(
            1, self.judged, entropy)


def spread_of(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(margin, entropy)`` of ``logits [..., V]``, each ``[...]``: top-1 minus top-2 probability, and entropy in
    nats, worked out in float64."""
    probs = logits.double().softmax(-1)  # [..., V]
    top2 = probs.topk(2, dim=-1).values  # [..., 2]
    return top2[..., 0] - top2[..., 1], torch.special.entr(probs).sum(-1)  # 0 * log 0 read as 0


class Policy(Protocol):
    def __call__(self, state: StepState) -> torch.Tensor:
        """Commit mask ``[B, L]``, a subset of ``state.masked``."""


def top_k_commit(score: torch.Tensor, candidates: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Commit mask ``[B, L]``: the ``quota [B]`` highest-``score`` positions among ``candidates [B, L]``."""
    masked_score = score.masked_fill(~candidates, float("-inf"))
    order = masked_score.argsort(dim=-1, descending=True, stable=True)  # [B, L]
    arange = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, arange)  # rank[b, i]: place of position i in the order
    return (rank < quota[:, None]) & candidates


def shifted(values: torch.Tensor, by: int, fill: float | bool) -> torch.Tensor:
    """``values [B, L]`` moved ``by`` positions along the block (1: each position gets its left neighbour's value),
    the positions moved in from outside the block set to ``fill``."""
    edge = torch.full_like(values[:, :abs(by)], fill)
    return torch.cat([edge, values[:, :-by]], dim=-1) if by > 0 else torch.cat([values[:, -by:], edge], dim=-1)


def at_least_one(commit: torch.Tensor, state: StepState) -> torch.Tensor:
    """``commit`` restricted to masked positions; a row that would commit nothing commits its most confident one,
    so every forward pass makes progress."""
    commit = commit & state.masked
    fallback = top_k_commit(state.confidence, state.masked, torch.ones_like(state.block_step))
    return commit | (fallback & ~commit.any(-1, keepdim=True))


@dataclass(frozen=True)
class FixedQuota:
    """LLaDA's low-confidence (or random) remasking: each block gets ``steps_per_block`` passes, and the masked
    positions are spread evenly over them, the remainder to the first passes."""

    steps_per_block: int
    remasking: str = "low_confidence"

    def __call__(self, state: StepState) -> torch.Tensor:
        # ceil(remaining / passes left) reproduces the linear schedule (remainder first) without keeping it.
        passes_left = (self.steps_per_block - state.block_step).clamp(min=1)  # [B]
        remaining = state.masked.sum(-1)  # [B]
        quota = (remaining + passes_left - 1) // passes_left  # [B]
        score = state.confidence if self.remasking == "low_confidence" else state.noise
        return top_k_commit(score, state.masked, quota)


@dataclass(frozen=True)
class FixedSchedule:
    """LLaDA's schedule as fixed at a block's start: pass i of the block commits the ``quota(i)`` most confident
    masked positions, ``block_length`` spread evenly over ``steps_per_block`` passes, the remainder to the first
    ones. Unlike :class:`FixedQuota` it does not shrink when another rule has committed positions too."""

    block_length: int
    steps_per_block: int

    def __call__(self, state: StepState) -> torch.Tensor:
        base, extra = divmod(self.block_length, self.steps_per_block)
        quota = base + (state.block_step < extra).long()  # [B]
        return top_k_commit(state.confidence, state.masked, quota)


@dataclass(frozen=True)
class Threshold:
    """Fast-dLLM's confidence threshold: every masked position with confidence above ``threshold``."""

    threshold: float = 0.9

    def __call__(self, state: StepState) -> torch.Tensor:
        return at_least_one(state.confidence > self.threshold, state)


@dataclass(frozen=True)
class Factor:
    """Fast-dLLM's factor rule: the n most confident masked positions, n the largest with
    (n + 1) * (1 - c_n) < ``factor`` (c_n the n-th highest confidence)."""

    factor: float = 1.0

    def __call__(self, state: StepState) -> torch.Tensor:
        ranked = state.confidence.masked_fill(~state.masked, float("-inf")).sort(-1, descending=True).values
        n = torch.arange(1, ranked.shape[-1] + 1, device=ranked.device)  # [L]
        # (n + 1) * (1 - c_n) grows with n, so the positions meeting the rule are a prefix of the ranking.
        count = ((n + 1) * (1 - ranked) < self.factor).sum(-1)  # [B]
        return at_least_one(top_k_commit(state.confidence, state.masked, count), state)


@dataclass(frozen=True)
class Isolated:
    """A confidence threshold with a lower bar for isolated positions: every masked position whose confidence
    exceeds ``threshold``, and every masked one whose two neighbours are both settled and whose confidence is at
    least ``isolated_threshold`` (at least one). Parallel decoding loses answers when neighbouring positions are
    committed in one pass, each picking its most likely token without seeing the other's; a position between two
    settled ones has no masked neighbour to disagree with, so it can be committed at a much lower confidence."""

    threshold: float = 0.9
    isolated_threshold: float = 0.3

    def __call__(self, state: StepState) -> torch.Tensor:
        settled = ~state.masked  # [B, L]
        # Left of the block lies the prompt or a finished block (settled); right of it the next, still masked block.
        isolated = shifted(settled, 1, fill=True) & shifted(settled, -1, fill=False)  # [B, L]
        low_bar = isolated & (state.confidence >= self.isolated_threshold)
        return at_least_one((state.confidence > self.threshold) | low_bar, state)


class Oracle:
    """Commit exactly the masked positions whose prediction already equals the reference output (at least one):
    the upper bound a learned filter approximates, and its label source."""

    def __call__(self, state: StepState) -> torch.Tensor:
        if state.reference is None:
            raise ValueError("policy 'oracle' needs each request's reference output")
        return at_least_one(state.prediction == state.reference, state)


@dataclass(frozen=True)
class Learned:
    """Learn2PD: ``filter(state) -> [B, L]`` probability that each position's prediction is already final. A pass
    commits the masked positions above ``accept_threshold`` and, given ``threshold``, every masked position whose
    confidence exceeds it; with ``schedule`` (the paper's rule) together with the schedule's commits, without it at
    least one (the most confident). With ``threshold`` and ``candidates`` the filter judges only the ``candidates``
    most confident masked positions the threshold leaves in each pass: the question rollout labels answer
    (:mod:`l2pd_harness.filter.rollouts`), and a bound on how many uncertain positions one pass commits together;
    the filter is then told which positions it is asked about (``StepState.judged``)."""

    filter: Filter
    accept_threshold: float
    schedule: FixedSchedule | None = None
    threshold: float | None = None
    candidates: int | None = None

    def __call__(self, state: StepState) -> torch.Tensor:
        if self.threshold is None:
            accepted = self.filter(state) > self.accept_threshold  # [B, L]
        else:
            above = state.confidence > self.threshold  # [B, L]
            accepted = self.judge_left_over(state, above) | above
        if self.schedule is None:
            return at_least_one(accepted, state)
        return (accepted & state.masked) | self.schedule(state)

    def judge_left_over(self, state: StepState, above: torch.Tensor) -> torch.Tensor:
        """``[B, L]``: the positions under the threshold that the filter accepts (only the ``candidates`` most
        confident masked ones are asked); the caller keeps masked positions only."""
        if self.candidates is None:
            return self.filter(state) > self.accept_threshold
        quota = torch.full_like(state.block_step, self.candidates)  # [B]
        asked = top_k_commit(state.confidence, state.masked & ~above, quota)  # [B, L]
        positions = asked.float().topk(min(self.candidates, asked.shape[1]), dim=-1).indices  # [B, K]
        return (self.filter(replace(state, judged=positions)) > self.accept_threshold) & asked


def build_learned(cfg: DecodeConfig, learned: Filter) -> Learned:
    schedule = FixedSchedule(cfg.block_length, cfg.steps_per_block) if cfg.learned_commit == "with_schedule" else None
    beside_threshold = cfg.learned_commit == "with_threshold"
    threshold = cfg.threshold if beside_threshold else None
    candidates = cfg.learned_candidates if beside_threshold else None
    return Learned(learned, cfg.accept_threshold, schedule, threshold, candidates)


@dataclass(frozen=True)
class PolicySpec:
    """A policy by name: how to build it from a config, and what the analysis calls its setting."""

    build: Callable[[DecodeConfig, Filter | None], Policy]
    """``(cfg, filter) -> policy``; ``filter`` is given only to a spec with ``needs_filter``."""
    setting: Callable[[dict], str]
    """A config's settings (``asdict(cfg)``) -> the label of what moves it along its family's curve."""
    needs_filter: bool = False
    """True for a policy that reads a trained filter (``filter``, ``accept_threshold``)."""


POLICIES: dict[str, PolicySpec] = {
    "fixed": PolicySpec(lambda cfg, _: FixedQuota(cfg.steps_per_block, cfg.remasking),
                        lambda s: f"{s['gen_length'] // s['steps']} tok/step"),
    "threshold": PolicySpec(lambda cfg, _: Threshold(cfg.threshold), lambda s: f"threshold {s['threshold']}"),
    "factor": PolicySpec(lambda cfg, _: Factor(cfg.factor), lambda s: f"factor {s['factor']}"),
    "isolated": PolicySpec(lambda cfg, _: Isolated(cfg.threshold, cfg.isolated_threshold),
                           lambda s: f"threshold {s['threshold']}, isolated {s['isolated_threshold']}"),
    "oracle": PolicySpec(lambda cfg, _: Oracle(), lambda s: "oracle"),
    "learned": PolicySpec(build_learned, lambda s: f"accept {s['accept_threshold']}", needs_filter=True),
}
"""Every decode policy: adding one is an entry here (plus its class above and its tests)."""


def build_policy(cfg: DecodeConfig, learned_filter: Filter | None = None) -> Policy:
    """The policy ``cfg.policy`` names, with its knobs from ``cfg`` (``learned_filter`` for a policy that reads one;
    front ends get it through :func:`l2pd_harness.settings.decode_setup`, which loads it)."""
    spec = POLICIES[cfg.policy]
    if spec.needs_filter and learned_filter is None:
        raise ValueError(f"policy {cfg.policy!r} needs a trained filter (`l2pd train-filter`; filter=PATH)")
    return spec.build(cfg, learned_filter)
