"""Decode policies on hand-made and seeded synthetic step states at batch 1, 2 and 32: no model involved."""

from __future__ import annotations

import math

import pytest
import torch

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.policies import (
    Factor,
    FixedQuota,
    FixedSchedule,
    Isolated,
    Learned,
    Oracle,
    StepState,
    Threshold,
    build_policy,
    top_k_commit,
)

BATCHES = [1, 2, 32]


def synthetic_state(batch: int, length: int = 16, seed: int = 0, masked_share: float = 0.7) -> StepState:
    gen = torch.Generator().manual_seed(seed * 1000 + batch)
    masked = torch.rand(batch, length, generator=gen) < masked_share
    masked[0, :] = True  # a fully masked row
    if batch > 1:
        masked[1, :] = False  # a finished row: nothing to commit
    return StepState(confidence=torch.rand(batch, length, generator=gen, dtype=torch.float64),
                     margin=torch.rand(batch, length, generator=gen, dtype=torch.float64),
                     entropy=torch.rand(batch, length, generator=gen, dtype=torch.float64),
                     prediction=torch.randint(0, 50, (batch, length), generator=gen), masked=masked,
                     block_step=torch.randint(0, 4, (batch,), generator=gen),
                     noise=torch.rand(batch, length, generator=gen, dtype=torch.float64),
                     reference=torch.randint(0, 50, (batch, length), generator=gen))


def state_row(state: StepState, row: int) -> StepState:
    """Row ``row`` of ``state`` as a batch of one (its tensor fields only: what a policy reads)."""
    return StepState(**{k: v[row:row + 1] for k, v in vars(state).items() if isinstance(v, torch.Tensor)})


def hand_state(confidence: list[float], masked: list[bool], **extra) -> StepState:
    conf = torch.tensor([confidence], dtype=torch.float64)
    return StepState(confidence=conf, margin=conf, entropy=1 - conf, prediction=torch.arange(len(confidence))[None],
                     masked=torch.tensor([masked]), block_step=torch.zeros(1, dtype=torch.long),
                     noise=torch.zeros_like(conf), **extra)


POLICIES = [FixedQuota(4), FixedQuota(4, "random"), Threshold(0.9), Threshold(0.5), Factor(1.0), Factor(0.3),
            Isolated(0.9, 0.3), Oracle(), Learned(lambda state: state.confidence.sqrt(), 0.5),
            Learned(lambda state: state.confidence.sqrt(), 0.9, FixedSchedule(16, 16)),
            Learned(lambda state: 1 - state.confidence, 0.9, threshold=0.95),
            Learned(lambda state: state.margin, 0.3, threshold=0.9, candidates=1)]
POLICY_IDS = ["fixed-4", "fixed-4-random", "threshold-0.9", "threshold-0.5", "factor-1", "factor-0.3", "isolated",
              "oracle", "learned-0.5", "learned-paper-0.9", "learned-with-threshold",
              "learned-one-candidate"]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("policy", POLICIES, ids=POLICY_IDS)
def test_commits_only_masked_and_always_progresses(policy, batch: int) -> None:
    state = synthetic_state(batch)
    commit = policy(state)
    assert commit.shape == state.masked.shape and commit.dtype == torch.bool
    assert not (commit & ~state.masked).any()
    has_masked = state.masked.any(-1)
    assert (commit.any(-1) == has_masked).all()  # >= 1 where anything is masked, nothing where nothing is


@pytest.mark.parametrize("batch", BATCHES)
def test_rows_are_independent(batch: int) -> None:
    """Each row's commits depend on that row alone (what makes results independent of batch composition)."""
    state = synthetic_state(batch, seed=1)
    for policy in POLICIES:
        together = policy(state)
        for row in range(batch):
            assert torch.equal(policy(state_row(state, row))[0], together[row]), (policy, row)


def test_fixed_quota_follows_the_linear_schedule() -> None:
    """32 masked positions over 8 passes commit 4 per pass; 10 over 4 passes commit 3, 3, 2, 2; most confident
    first."""
    for masked_count, steps, expected in ((32, 8, [4] * 8), (10, 4, [3, 3, 2, 2]), (5, 5, [1] * 5)):
        policy = FixedQuota(steps)
        conf = torch.linspace(0.1, 0.9, 32, dtype=torch.float64)[None]
        masked = torch.arange(32)[None] < masked_count
        counts = []
        for step in range(steps):
            state = StepState(confidence=conf, margin=conf, entropy=conf,
                              prediction=torch.zeros(1, 32, dtype=torch.long), masked=masked,
                              block_step=torch.tensor([step]), noise=torch.zeros_like(conf))
            commit = policy(state)
            left_out = conf[masked & ~commit]
            if len(left_out):
                assert conf[commit].min() >= left_out.max()
            counts.append(int(commit.sum()))
            masked = masked & ~commit
        assert counts == expected and not masked.any()


def test_fixed_random_remasking_uses_the_noise() -> None:
    state = hand_state([0.9, 0.8, 0.1, 0.2], [True] * 4)
    state.noise = torch.tensor([[0.0, 0.1, 0.9, 0.8]], dtype=torch.float64)
    assert FixedQuota(2, "random")(state).tolist() == [[False, False, True, True]]
    assert FixedQuota(2)(state).tolist() == [[True, True, False, False]]


def test_threshold_commits_everything_above_else_the_best_one() -> None:
    state = hand_state([0.95, 0.5, 0.99, 0.91, 0.97], [True, True, True, True, False])
    assert Threshold(0.9)(state).tolist() == [[True, False, True, True, False]]
    low = hand_state([0.3, 0.6, 0.5], [True, True, True])
    assert Threshold(0.9)(low).tolist() == [[False, True, False]]


def test_factor_rule_by_hand() -> None:
    # sorted: 0.99 (n=1: 2 * 0.01 = 0.02), 0.95 (n=2: 3 * 0.05 = 0.15), 0.7 (n=3: 4 * 0.3 = 1.2), 0.6
    state = hand_state([0.7, 0.99, 0.6, 0.95], [True] * 4)
    assert Factor(1.0)(state).tolist() == [[False, True, False, True]]
    assert Factor(1.5)(state).tolist() == [[True, True, False, True]]
    assert Factor(0.01)(state).tolist() == [[False, True, False, False]]  # at least one


@pytest.mark.parametrize("batch", BATCHES)
def test_factor_matches_a_plain_per_row_loop(batch: int) -> None:
    state = synthetic_state(batch, seed=2)
    state.confidence = 1 - state.confidence**4  # mostly confident, so the rule commits several
    commit = Factor(1.0)(state)
    for row in range(batch):
        conf = sorted(state.confidence[row][state.masked[row]].tolist(), reverse=True)
        count = 0
        for n, c in enumerate(conf, start=1):
            if (n + 1) * (1 - c) >= 1.0:
                break
            count = n
        assert int(commit[row].sum()) == (max(count, 1) if conf else 0)


def test_isolated_lowers_the_bar_only_between_settled_neighbours() -> None:
    state = hand_state([0.4, 0.99, 0.5, 0.95, 0.7, 0.2, 0.8, 0.35], [True, False, True, True, False, True, False, True])
    # 0: block start on its left, settled 1 on its right, 0.4 >= 0.3; 2: masked 3 beside it (settled only after this
    # pass); 3: above 0.9; 5: isolated but below 0.3; 7: the next, masked block on its right.
    assert Isolated(0.9, 0.3)(state).tolist() == [[True, False, False, True, False, False, False, False]]
    assert Isolated(0.9, 0.2)(state).tolist() == [[True, False, False, True, False, True, False, False]]
    lone = hand_state([0.1, 0.2], [True, True])
    assert Isolated(0.9, 0.3)(lone).tolist() == [[False, True]]  # nothing qualifies: the most confident one


def test_oracle_commits_exactly_the_matches() -> None:
    state = hand_state([0.1, 0.2, 0.3, 0.4], [True, True, True, False], reference=torch.tensor([[0, 9, 2, 3]]))
    assert Oracle()(state).tolist() == [[True, False, True, False]]  # position 3 matches but is committed
    none_match = hand_state([0.1, 0.5, 0.3], [True] * 3, reference=torch.tensor([[7, 7, 7]]))
    assert Oracle()(none_match).tolist() == [[False, True, False]]
    with pytest.raises(ValueError, match="policy 'oracle' needs each request's reference output"):
        Oracle()(hand_state([0.5], [True]))


def test_learned_slot_commits_what_the_filter_accepts() -> None:
    state = hand_state([0.2, 0.8, 0.6, 0.9], [True, True, True, True])
    flip = Learned(lambda s: 1 - s.confidence, 0.5)  # a filter that trusts low confidence, to show it decides
    assert flip(state).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("batch", BATCHES)
def test_paper_rule_is_the_union_of_accepted_and_the_schedules_top_k(batch: int) -> None:
    state = synthetic_state(batch)
    accepted = state.confidence > 0.6
    for steps_per_block, block_step in ((16, 0), (4, 1), (5, 0), (5, 3)):
        state.block_step = torch.full((batch,), block_step)
        # LLaDA's schedule for a fully masked block of 16 over 5 passes is [4, 3, 3, 3, 3].
        quota = torch.full((batch,), [4, 3, 3, 3, 3][block_step] if steps_per_block == 5 else 16 // steps_per_block)
        schedule = top_k_commit(state.confidence, state.masked, quota)
        paper = Learned(lambda s: s.confidence, 0.6, FixedSchedule(16, steps_per_block))
        assert torch.equal(paper(state), (accepted & state.masked) | schedule)


def test_paper_rule_commits_the_schedules_token_even_when_the_filter_accepts_others() -> None:
    state = hand_state([0.2, 0.8, 0.6, 0.9], [True, True, True, True])
    trusts_low = Learned(lambda s: 1 - s.confidence, 0.5, FixedSchedule(4, 4))  # accepts position 0 only
    assert trusts_low(state).tolist() == [[True, False, False, True]]  # ... and the schedule adds the best one
    assert Learned(lambda s: 1 - s.confidence, 0.5)(state).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("batch", BATCHES)
def test_with_threshold_commits_what_the_filter_or_the_threshold_accepts(batch: int) -> None:
    state = synthetic_state(batch)
    union = Learned(lambda s: s.margin, 0.7, threshold=0.8)(state)
    either = ((state.margin > 0.7) | (state.confidence > 0.8)) & state.masked
    fallback = top_k_commit(state.confidence, state.masked, torch.ones(batch, dtype=torch.long))
    assert torch.equal(union, either | (fallback & ~either.any(-1, keepdim=True)))


def test_candidates_limit_the_filter_to_the_best_positions_the_threshold_leaves() -> None:
    state = hand_state([0.95, 0.6, 0.5, 0.4, 0.7], [True, True, True, True, False])
    trusts_all = Learned(lambda s: torch.ones_like(s.confidence), 0.5, threshold=0.9, candidates=1)
    assert trusts_all(state).tolist() == [[True, True, False, False, False]]  # 4 is committed already
    assert Learned(trusts_all.filter, 0.5, threshold=0.9, candidates=2)(state).tolist() == [
        [True, True, True, False, False]]
    trusts_low = Learned(lambda s: 1 - s.confidence, 0.45, threshold=0.9, candidates=1)  # rejects 0.6, the candidate
    assert trusts_low(state).tolist() == [[True, False, False, False, False]]


@pytest.mark.parametrize("batch", BATCHES)
def test_candidates_bound_the_filters_commits_per_row(batch: int) -> None:
    state = synthetic_state(batch, seed=3)
    for candidates in (1, 3):
        commit = Learned(lambda s: torch.ones_like(s.confidence), 0.5, threshold=0.9, candidates=candidates)(state)
        below = commit & (state.confidence <= 0.9)  # [B, L]
        left = (state.masked & (state.confidence <= 0.9)).sum(-1)  # [B]
        assert torch.equal(below.sum(-1), left.clamp(max=candidates))


def test_with_threshold_adds_confident_positions_the_filter_rejects() -> None:
    state = hand_state([0.2, 0.97, 0.6, 0.99], [True, True, True, False])
    trusts_low = Learned(lambda s: 1 - s.confidence, 0.5, threshold=0.95)  # accepts position 0 only
    assert trusts_low(state).tolist() == [[True, True, False, False]]  # the threshold adds 1; 3 is committed


def test_build_policy_from_config() -> None:
    assert build_policy(DecodeConfig(gen_length=64, steps=16)) == FixedQuota(8, "low_confidence")
    assert build_policy(DecodeConfig(policy="threshold", threshold=0.7)) == Threshold(0.7)
    assert build_policy(DecodeConfig(policy="factor", factor=2.0)) == Factor(2.0)
    assert build_policy(DecodeConfig(policy="isolated", threshold=0.95, isolated_threshold=0.4)) == Isolated(0.95, 0.4)
    assert isinstance(build_policy(DecodeConfig(policy="oracle")), Oracle)
    def trust_margin(state: StepState) -> torch.Tensor:
        return state.margin

    learned = build_policy(DecodeConfig(policy="learned", accept_threshold=0.8), learned_filter=trust_margin)
    assert learned == Learned(trust_margin, 0.8)
    paper = DecodeConfig(policy="learned", accept_threshold=0.96, learned_commit="with_schedule", gen_length=64,
                         steps=16)
    assert build_policy(paper, learned_filter=trust_margin) == Learned(trust_margin, 0.96, FixedSchedule(32, 8))
    either = DecodeConfig(policy="learned", accept_threshold=0.9, learned_commit="with_threshold", threshold=0.99)
    assert build_policy(either, learned_filter=trust_margin) == Learned(trust_margin, 0.9, threshold=0.99)
    one = DecodeConfig(policy="learned", accept_threshold=0.9, learned_commit="with_threshold", learned_candidates=1)
    assert build_policy(one, learned_filter=trust_margin) == Learned(trust_margin, 0.9, threshold=0.9, candidates=1)
    with pytest.raises(ValueError, match="policy 'learned' needs a trained filter"):
        build_policy(DecodeConfig(policy="learned"))


@pytest.mark.parametrize("batch", BATCHES)
def test_top_k_commit_takes_most_confident_candidates(batch: int) -> None:
    gen = torch.Generator().manual_seed(batch)
    score = torch.rand(batch, 16, generator=gen)
    candidates = torch.rand(batch, 16, generator=gen) < 0.6
    quota = torch.randint(0, 5, (batch,), generator=gen)
    commit = top_k_commit(score, candidates, quota)
    for row in range(batch):
        assert commit[row].sum() == min(int(quota[row]), int(candidates[row].sum()))
        chosen, left_out = score[row][commit[row]], score[row][candidates[row] & ~commit[row]]
        if len(chosen) and len(left_out):
            assert chosen.min() >= left_out.max()


@pytest.mark.parametrize("settings, message", [
    ({"policy": "foo"}, r"policy='foo' is not one of \['fixed', 'threshold', 'factor', 'isolated', 'oracle', "
                       r"'learned'\]"),
    ({"cache": "ring"}, r"cache='ring' is not one of \['none', 'prefix', 'dual'\]"),
    ({"threshold": 1.5}, r"threshold=1.5 must be in \(0, 1\]"),
    ({"isolated_threshold": 0.0}, r"isolated_threshold=0.0 must be in \(0, 1\]"),
    ({"factor": -1.0}, "factor=-1.0 must be > 0"),
    ({"policy": "learned", "accept_threshold": 1.0}, r"accept_threshold=1.0 must be in \(0, 1\)"),
    ({"accept_threshold": 0.9}, "filter and accept_threshold are only used by policy 'learned'"),
    ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
    ({"learned_commit": "with_schedule"}, "learned_commit='with_schedule' is only used by policy 'learned'"),
    ({"eotp_mode": "truncate"}, "eotp_mode='truncate' needs eotp=true"),
    ({"policy": "learned", "learned_commit": "accepted", "learned_candidates": 1},
     "learned_candidates=1 must be a positive integer, used with policy 'learned' and learned_commit 'with_threshold'"),
    ({"policy": "threshold", "learned_candidates": 1}, "learned_candidates=1 must be a positive integer"),
    ({"eotp": True, "eotp_mode": "drop"}, r"eotp_mode='drop' is not one of \['fill', 'truncate'\]"),
    ({"preset": "fast"}, r"preset='fast' is not one of \['learn2pd-paper'\]"),
    *[({name: value, **({"policy": "learned"} if name == "accept_threshold" else {})}, f"{name}={value} must be a "
       "finite number") for name in ("threshold", "isolated_threshold", "factor", "temperature", "cfg_scale",
                                                      "accept_threshold")
      for value in (float("nan"), float("inf"))],
])
def test_bad_settings_name_the_value(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**settings)


def test_margin_and_entropy_come_from_the_distributions_only_when_read() -> None:
    probs = torch.tensor([[[0.7, 0.2, 0.1, 1e-30], [0.25, 0.25, 0.25, 0.25]]], dtype=torch.float64)  # [1, 2, V]
    state = StepState(confidence=probs.amax(-1), prediction=probs.argmax(-1), masked=torch.ones(1, 2, dtype=torch.bool),
                      block_step=torch.zeros(1, dtype=torch.long), noise=torch.zeros(1, 2), logits=probs.log())
    Threshold(0.9)(state)
    FixedQuota(2)(state)
    assert state.margin is None and state.entropy is None  # neither rule reads them: never computed
    margin, entropy = state.spread()
    assert torch.allclose(margin, torch.tensor([[0.5, 0.0]], dtype=torch.float64))
    expected = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1) + 1e-30 * math.log(1e-30))
    assert torch.allclose(entropy, torch.tensor([[expected, math.log(4)]], dtype=torch.float64))
