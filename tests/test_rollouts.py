"""Rollout labels: the forced-commit rule on synthetic states at batch 1, 2 and 32, candidate choice by hand, and
collection on the shipped model checked against rollouts decoded one at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from l2pd_harness.decoding.policies import Threshold, build_policy
from l2pd_harness.evaluation import grade_rows, iter_decoded
from l2pd_harness.filter.model import DEFAULT_FILTER
from l2pd_harness.filter.rollouts import ForcedCommit, candidate_positions, collect_rollouts
from l2pd_harness.filter.traces import load_traces
from l2pd_harness.loading import load_model
from l2pd_harness.settings import make_config
from l2pd_harness.tasks import sample_problems
from tests.test_filter import run_cli  # noqa: F401  (fixture)
from tests.test_policies import BATCHES, state_row, synthetic_state


def with_rows(state, blocks: list[int]):
    state.request_id = torch.arange(len(blocks))
    state.block = torch.tensor(blocks)
    return state


@pytest.mark.parametrize("batch", BATCHES)
def test_forced_commit_adds_exactly_the_due_position(batch: int) -> None:
    state = with_rows(synthetic_state(batch), [i % 3 for i in range(batch)])
    base = Threshold(0.9)
    # Request r is forced at position r % 16, in block 1 at its current block step: due only where its block is 1.
    position = torch.arange(batch) % 16
    forced = ForcedCommit(base, torch.ones(batch, dtype=torch.long), state.block_step.clone(), position)
    commit, plain = forced(state), base(state)
    expected = plain.clone()
    for row in range(batch):
        if state.block[row] == 1 and state.masked[row, position[row]]:
            expected[row, position[row]] = True
    assert torch.equal(commit, expected)
    assert not (commit & ~state.masked).any()


@pytest.mark.parametrize("batch", BATCHES)
def test_forced_commit_rows_are_independent(batch: int) -> None:
    state = with_rows(synthetic_state(batch, seed=3), [0] * batch)
    forced = ForcedCommit(Threshold(0.5), torch.zeros(batch, dtype=torch.long), state.block_step.clone(),
                          torch.arange(batch) % 16)
    whole = forced(state)
    for row in range(batch):
        alone = state_row(state, row)
        alone.request_id, alone.block = state.request_id[row:row + 1], state.block[row:row + 1]
        assert torch.equal(forced(alone)[0], whole[row])


def test_forced_commit_waits_for_its_pass() -> None:
    state = with_rows(synthetic_state(2), [0, 0])
    forced = ForcedCommit(Threshold(1.0), torch.zeros(2, dtype=torch.long), state.block_step + 1,
                          torch.tensor([3, 4]))
    assert torch.equal(forced(state), Threshold(1.0)(state))


def test_candidates_are_the_most_confident_positions_left_on_correct_problems() -> None:
    steps = {"confidence": torch.tensor([[0.95, 0.5, 0.3, 0.1], [0.6, 0.7, 0.8, 0.9], [0.6, 0.7, 0.8, 0.9]]),
             "masked": torch.tensor([[True, True, True, True], [True, True, False, True], [True] * 4]),
             "commit": torch.tensor([[True, False, False, False], [False, False, False, True], [False] * 4]),
             "problem": torch.tensor([0, 0, 1])}
    candidates = candidate_positions(steps, torch.tensor([True, False]), per_pass=2, min_confidence=0.2)
    # Row 0: the threshold took 0.95; 0.5 and 0.3 are the two best left (0.1 is under the floor). Row 1: 0.8 is
    # committed already and 0.9 by this pass: 0.7 and 0.6 remain. Row 2: its problem was decoded wrong.
    assert candidates.tolist() == [[False, True, True, False], [True, True, False, False], [False] * 4]


def test_rollout_labels_match_rollouts_decoded_alone(tmp_path: Path, run_cli) -> None:  # noqa: F811
    """The command on the shipped model, small; then a few labelled positions decoded again, each alone in its
    own batch: the verdict is the label, and the forced token is in the canvas."""
    traces = tmp_path / "rollouts"
    done = run_cli("collect-traces", "--trajectory", "rollout", "--task", "arith", "--n", "3", "--gen-length", "64",
                   "--threshold", "0.9", "--rollouts-per-pass", "2", "--out", str(traces), "--batch-size", "16")
    assert done.returncode == 0, done.stderr
    steps, problems, meta = load_traces(traces)
    assert meta.trajectory == "rollout" and meta.threshold == 0.9 and meta.rollouts_per_pass == 2
    labelled = steps["labelled"].bool()
    assert labelled.any() and not (labelled & ~steps["masked"].bool()).any()
    assert (labelled.sum(-1) <= 2).all() and not (steps["label"].bool() & ~labelled).any()
    model, tokenizer = load_model()
    cfg = make_config({"policy": "threshold", "threshold": 0.9, "eotp": True, "gen_length": 64, "batch_size": 1})
    for row, position in labelled.nonzero().tolist()[:4]:
        problem = problems[int(steps["problem"][row])]
        forced = ForcedCommit(Threshold(0.9), steps["block"][row:row + 1], steps["block_step"][row:row + 1],
                              torch.tensor([position]))
        [decoded] = iter_decoded(model, tokenizer, [problem], cfg, policy=forced)
        assert grade_rows([decoded]) == [bool(steps["label"][row, position])]
    trained = run_cli("train-filter", "--traces", str(traces), "--architecture", "position_mlp", "--out",
                      str(tmp_path / "f.safetensors"), "--val-share", "0.5", "--max-epochs", "3")
    assert trained.returncode == 0, trained.stderr
    card = json.loads((tmp_path / "f.json").read_text())
    assert card["training"]["decode_with"] == {"learned_commit": "with_threshold", "threshold": 0.9,
                                               "learned_candidates": 1}
    assert card["training"]["trajectories"] == ["rollout"]
    # A DAgger round: rollouts along that filter's own decode beside the threshold, trainable with the first ones.
    dagger = tmp_path / "dagger"
    done = run_cli("collect-traces", "--trajectory", "rollout", "--task", "arith", "--n", "2", "--data-seed", "12",
                   "--gen-length", "64", "--filter", str(tmp_path / "f.safetensors"), "--rollouts-per-pass", "1",
                   "--out", str(dagger), "--batch-size", "16")
    assert done.returncode == 0, done.stderr
    steps, _, meta = load_traces(dagger)
    assert meta.filter == str(tmp_path / "f.safetensors") and meta.threshold == 0.9
    assert steps["labelled"].any()
    trained = run_cli("train-filter", "--traces", str(traces), str(dagger), "--architecture", "position_mlp",
                      "--out", str(tmp_path / "f2.safetensors"), "--val-share", "0.5", "--max-epochs", "3")
    assert trained.returncode == 0, trained.stderr


def test_rollouts_beside_a_filter_need_one_that_decodes_beside_a_threshold(tmp_path: Path, run_cli) -> None:  # noqa: F811
    done = run_cli("collect-traces", "--trajectory", "rollout", "--task", "arith", "--n", "1", "--gen-length", "32",
                   "--filter", str(DEFAULT_FILTER), "--out", str(tmp_path / "t"))
    assert done.returncode == 2 and "not accepted" in done.stderr and "Traceback" not in done.stderr


def test_rollouts_follow_a_threshold_decode() -> None:
    model, tokenizer = load_model()
    cfg = make_config({"policy": "fixed", "gen_length": 32})
    with pytest.raises(ValueError, match="not policy='fixed'"):
        collect_rollouts(model, tokenizer, sample_problems("arith", "train", 1, 0), cfg, build_policy(cfg), 1,
                         0.2)
